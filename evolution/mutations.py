"""Making a child path from a parent (reference §2): hparam, adapter and component mutations.

``make_child`` returns an unpublished :class:`~mu2net.system.state.Path` whose components are
either shared by reference (frozen) or new trainable components (clones of an ancestor's, fresh
inits, or function-preserving conversions). The parent's components are never modified: any
component that is still unlocked (the active task's own) is always *cloned* (reference §5).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from mu2net.errors import Mu2netError
from mu2net.evolution.hparams import bernoulli, mutate_model_hparams, mutation_probability
from mu2net.models.base import Family, format_adapter_layers, parse_adapter_layers, shape_signature
from mu2net.system.state import Path, System

Lookup = Callable[[str], Path | None]


class MutationError(Mu2netError, ValueError):
    """A child that cannot be built (e.g. a component with no source and no fresh init)."""


@dataclasses.dataclass
class Child:
    """An unpublished child and what training it needs."""

    path: Path
    trainable: dict[str, Any]  # component name -> params (new components)
    frozen: dict[str, Any]  # component name -> params (shared by reference)
    momentum: dict[str, Any]  # component name -> momentum trace carried from the source
    actions: dict[str, str]  # component name -> share | clone | fresh | adapt | expand
    mutations: dict[str, Any]  # hparam key -> (old, new), plus structural records


@functools.lru_cache(maxsize=128)
def _expected_signatures(family: Family, arch_key: tuple, frozen: tuple) -> dict[str, str]:
    del arch_key
    shapes = jax.eval_shape(lambda: family.init(jax.random.PRNGKey(0), dict(frozen)))
    return {name: shape_signature(tree) for name, tree in shapes.items()}


def expected_signatures(family: Family, hparams: Mapping[str, Any]) -> dict[str, str]:
    """Shape signature of every component of an architecture (no params materialised)."""
    frozen = tuple(sorted((k, v) for k, v in hparams.items() if not isinstance(v, dict | list)))
    return _expected_signatures(family, family.architecture_key(hparams), frozen)


def ancestors(path: Path, lookup: Lookup):
    """``path`` and then its live ancestors, nearest first."""
    seen = set()
    p: Path | None = path
    while p is not None and p.id not in seen:
        seen.add(p.id)
        yield p
        p = lookup(p.parent) if p.parent else None


def mutate_adapters(
    hparams: dict[str, Any], space: Mapping, rng: np.random.Generator, per_type: bool
) -> dict[str, Any]:
    """Adds an adapter before block i with probability mu for each i < num_layers (§2.3)."""
    layers = set(parse_adapter_layers(hparams.get("adapter_layers", "")))
    before = set(layers)
    n = int(hparams.get("num_layers", 0))
    for i in range(n):
        name = f"add:residual_adapter_{i}"
        if i not in layers and bernoulli(
            mutation_probability(hparams, name, space, rng, per_type), rng
        ):
            layers.add(i)
    layers = {i for i in layers if i < n}
    hparams["adapter_layers"] = format_adapter_layers(layers)
    if layers != before:
        return {"adapter_layers": (format_adapter_layers(before), hparams["adapter_layers"])}
    return {}


def make_child(
    *,
    system: System,
    family: Family,
    parent: Path,
    task: str,
    num_classes: int,
    ds_hparams: Mapping[str, Any],
    space: Mapping[str, list],
    rng: np.random.Generator,
    agent: str,
    lookup: Lookup,
    mutate: bool = True,
    per_type_mu: bool = False,
    adapters: bool = False,
    expansions: tuple[str, ...] = (),
    force_clone: tuple[str, ...] = (),
    fixed_hparams: Mapping[str, Any] | None = None,
    clone_names: Callable[[str], bool] | None = None,
) -> Child:
    """Builds a child of ``parent`` for ``task`` (reference §2, ``Path.clone``).

    Args:
      system: the live system (new components are added to it, unlocked).
      family: the model family (must be the parent's).
      parent: the parent path (same task, another task's, or a root).
      task: the active task.
      num_classes: the active task's class count.
      ds_hparams: this generation's dataset hparams (imposed on every child).
      space: the search space.
      rng: numpy generator (all randomness of the child comes from it).
      agent: the agent that owns the new components.
      lookup: path id -> Path for the ancestor walk (None when retired).
      mutate: False for muNet's unmutated seed probes (only unlocked parts and heads train).
      per_type_mu: µ3Net per-mutation-type probabilities.
      adapters: whether adapter mutations are enabled.
      expansions: function-preserving expansions allowed as mutation types.
      force_clone: names always cloned.
      fixed_hparams: hparams imposed after mutation (baselines).
      clone_names: if given, decides clone (True) or share for every locked component,
        replacing the random draws (baselines: fine-tune all, freeze bottom k, ...).

    Returns:
      The :class:`Child`.
    """
    if parent.family != family.name:
        raise MutationError(f"parent {parent.id} is a {parent.family!r} path, not {family.name!r}")
    hparams = copy.deepcopy(dict(parent.hparams))
    hparams["num_classes"] = int(num_classes)
    hparams.update(ds_hparams)
    mutations: dict[str, Any] = {}
    if mutate:
        mutations.update(mutate_model_hparams(hparams, space, rng, per_type_mu))
        if adapters:
            mutations.update(mutate_adapters(hparams, space, rng, per_type_mu))
    if fixed_hparams:
        hparams.update(fixed_hparams)
    layers = parse_adapter_layers(hparams.get("adapter_layers", ""))
    hparams["adapter_layers"] = format_adapter_layers(
        [i for i in layers if i < int(hparams.get("num_layers", 0))]
    )
    family.validate_hparams(hparams)
    expected = expected_signatures(family, hparams)
    forced = set(force_clone) | set(family.force_clone)
    fresh_params: dict[str, Any] | None = None
    trainable, frozen, momentum, actions, sources = {}, {}, {}, {}, {}
    for name in family.component_names(hparams):
        found = _find_source(system, family, parent, name, task, expected[name], hparams, lookup)
        if found is None:
            if not family.fresh_allowed(name, hparams):
                raise MutationError(
                    f"component {name!r}: no ancestor of path {parent.id} provides it with the "
                    f"right shape, and family {family.name!r} cannot initialise it afresh"
                )
            if fresh_params is None:
                key = jax.random.PRNGKey(int(rng.integers(2**31)))
                fresh_params = jax.device_get(family.init(key, hparams))
            trainable[name] = fresh_params[name]
            actions[name] = "fresh"
            continue
        comp, adapted = found
        sources[name] = comp.id
        if adapted is not None:
            trainable[name], actions[name] = adapted, "adapt"
            continue
        if not comp.locks:
            clone = True  # the active task's own component: never modify it in place
        elif clone_names is not None:
            clone = clone_names(name)
        elif name in forced:
            clone = True
        elif mutate:
            p = mutation_probability(hparams, f"clone:{name}", space, rng, per_type_mu)
            clone = bernoulli(p, rng)
        else:
            clone = False
        if clone:
            trainable[name] = copy.deepcopy(comp.params)
            if comp.momentum is not None:
                momentum[name] = copy.deepcopy(comp.momentum)
            actions[name] = "clone"
        else:
            frozen[name] = comp.params
            actions[name] = "share"
    if mutate and expansions:
        hparams, trainable, frozen, momentum = _apply_expansions(
            family,
            hparams,
            trainable,
            frozen,
            momentum,
            actions,
            expansions,
            space,
            rng,
            per_type_mu,
            mutations,
        )
    components = {}
    for name in family.component_names(hparams):
        if name in trainable:
            lineage = sources.get(name)
            c = system.new_component(
                name,
                family.name,
                trainable[name],
                agent,
                lineage=lineage,
                momentum=momentum.get(name),
            )
            trainable[name] = c.params
            components[name] = c.id
        else:
            components[name] = sources[name]
    mutations["components"] = {n: a for n, a in actions.items() if a != "share"}
    path = Path(
        id=system.new_id(agent, "p"),
        task=task,
        family=family.name,
        components=components,
        hparams=hparams,
        agent=agent,
        parent=parent.id,
        metrics={"generation": parent.generation + 1, "parent_task": parent.task},
    )
    return Child(path, trainable, frozen, momentum, actions, mutations)


def _find_source(system, family, parent, name, task, expected_sig, hparams, lookup):
    """Nearest ancestor component for ``name`` (reference §2.2), or None.

    Returns (component, adapted_params_or_None).
    """
    for anc in ancestors(parent, lookup):
        cid = anc.components.get(name)
        if cid is None or cid not in system.components:
            continue
        comp = system.components[cid]
        if name == "head" and (comp.locks - {task} or anc.task != task):
            continue  # never share or inherit another task's (or the root's) head
        if comp.signature == expected_sig:
            return comp, None
        adapted = family.adapt_component(name, comp.params, anc.hparams, hparams)
        if adapted is not None and shape_signature(adapted) == expected_sig:
            return comp, adapted
    return None


def _apply_expansions(
    family, hparams, trainable, frozen, momentum, actions, names, space, rng, per_type_mu, mutations
):
    """Applies each allowed expansion with probability mu; changed components become clones."""
    from mu2net.models import expansions as exp

    params = {**frozen, **trainable}
    fired = []
    for name in sorted(names):
        p = mutation_probability(hparams, f"expand:{name}", space, rng, per_type_mu)
        if bernoulli(p, rng):
            key = jax.random.PRNGKey(int(rng.integers(2**31)))
            hparams, params = exp.EXPANSIONS[name](hparams, params, key)
            fired.append(name)
    if not fired:
        return hparams, trainable, frozen, momentum
    mutations["expansions"] = fired
    params = jax.device_get(params)
    new_trainable, new_frozen = {}, {}
    for n, tree in params.items():
        same = (
            n in frozen
            and shape_signature(tree) == shape_signature(frozen[n])
            and all(
                np.array_equal(a, b)
                for a, b in zip(
                    jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(frozen[n])
                )
            )
        )
        if same:
            new_frozen[n] = frozen[n]
        else:
            new_trainable[n] = tree
            if n not in trainable or actions.get(n) == "share":
                actions[n] = "expand"
            if n in momentum and shape_signature(momentum[n]) != shape_signature(tree):
                del momentum[n]
    return hparams, new_trainable, new_frozen, momentum
