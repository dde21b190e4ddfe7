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
from mu2net.models.base import (
    Family,
    format_adapter_layers,
    freeze_hparams,
    parse_adapter_layers,
    shape_signature,
)
from mu2net.system.state import Path, System

ANCESTRY_KEY = "ancestry"
_MAX_ANCESTRY = 32


class MutationError(Mu2netError, ValueError):
    """A child that cannot be built (e.g. a component with no source and no fresh init)."""


class Lineage:
    """Path id -> live path, for the ancestor walk (reference §2.2).

    Candidates of the running iteration come first, then published paths. Every path records
    its ancestry (nearest first), so when a parent was retired (replaced by its task, possibly
    by a concurrent agent) the walk continues at the *nearest live ancestor*; the agent's root
    closes every walk (µ3Net), so components come from the root rather than a fresh init.

    Args:
      system: the live system.
      candidates: this iteration's improved candidates by id (extended by the runner).
      root: the root of the agent's class, or None.
    """

    def __init__(self, system: System, candidates: Mapping[str, Path], root: Path | None):
        self.system = system
        self.candidates = candidates
        self.root = root

    def get(self, pid: str | None) -> Path | None:
        """The live path ``pid``, or None when it was retired (or is None)."""
        if not pid:
            return None
        return self.candidates.get(pid) or self.system.paths.get(pid)

    def ancestors(self, path: Path):
        """``path``, then its live ancestors nearest first, then the root."""
        seen: set[str] = set()
        p: Path | None = path
        while p is not None and p.id not in seen:
            seen.add(p.id)
            yield p
            chain = [p.parent, *p.metrics.get(ANCESTRY_KEY, ())]
            p = next((q for q in map(self.get, chain) if q is not None and q.id not in seen), None)
        if self.root is not None and self.root.id not in seen:
            yield self.root


def ancestry_of(parent: Path) -> list[str]:
    """Ancestry recorded in a child of ``parent``: the parent, then its own ancestry."""
    return [parent.id, *parent.metrics.get(ANCESTRY_KEY, ())][:_MAX_ANCESTRY]


@dataclasses.dataclass(frozen=True)
class MutationPolicy:
    """Which mutations a child may receive.

    Attributes:
      mutate: False for unmutated children (muNet's seed probes, fixed baselines).
      per_type_mu: µ3Net per-mutation-type probabilities.
      adapters: adapter insertion mutations enabled.
      expansions: function-preserving expansions allowed as mutation types.
      force_clone: names always cloned (the family's own list is added).
      fixed_hparams: hparams imposed after mutation (baselines).
      clone_names: if given, decides clone (True) or share for every locked component,
        replacing the random draws (baselines: fine-tune all, freeze bottom k, ...).
    """

    mutate: bool = True
    per_type_mu: bool = False
    adapters: bool = False
    expansions: tuple[str, ...] = ()
    force_clone: tuple[str, ...] = ()
    fixed_hparams: Mapping[str, Any] | None = None
    clone_names: Callable[[str], bool] | None = None


@dataclasses.dataclass(frozen=True)
class ChildTarget:
    """What the child is for: the active task, its class count, its owner, its generation data."""

    task: str
    num_classes: int
    agent: str
    ds_hparams: Mapping[str, Any]


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
    frozen = freeze_hparams(hparams)
    return _expected_signatures(family, family.architecture_key(hparams), frozen)


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
    system: System,
    family: Family,
    parent: Path,
    target: ChildTarget,
    space: Mapping[str, list],
    rng: np.random.Generator,
    lineage: Lineage,
    policy: MutationPolicy | None = None,
) -> Child:
    """Builds a child of ``parent`` for ``target.task`` (reference §2, ``Path.clone``).

    New components are added to ``system``, unlocked and owned by ``target.agent``; all
    randomness comes from ``rng``.

    Args:
      system: the live system.
      family: the model family (must be the parent's).
      parent: the parent path (same task, another task's, or a root).
      target: the active task, its class count, the agent and this generation's ds hparams.
      space: the search space.
      rng: numpy generator.
      lineage: the ancestor walk.
      policy: which mutations may fire (default: every standard mutation).

    Returns:
      The :class:`Child`.
    """
    policy = policy or MutationPolicy()
    if parent.family != family.name:
        raise MutationError(f"parent {parent.id} is a {parent.family!r} path, not {family.name!r}")
    hparams, mutations = _child_hparams(family, parent, target, space, rng, policy)
    parts = _choose_components(
        system, family, parent, target.task, hparams, space, rng, lineage, policy
    )
    if policy.mutate and policy.expansions:
        hparams = _apply_expansions(family, hparams, parts, policy, space, rng, mutations)
    components = _register_components(system, family, hparams, parts, target.agent)
    mutations["components"] = {n: a for n, a in parts.actions.items() if a != "share"}
    path = Path(
        id=system.new_id(target.agent, "p"),
        task=target.task,
        family=family.name,
        components=components,
        hparams=hparams,
        agent=target.agent,
        parent=parent.id,
        metrics={
            "generation": parent.generation + 1,
            "parent_task": parent.task,
            ANCESTRY_KEY: ancestry_of(parent),
        },
    )
    return Child(path, parts.trainable, parts.frozen, parts.momentum, parts.actions, mutations)


def _child_hparams(family, parent, target, space, rng, policy) -> tuple[dict, dict]:
    """The child's hparams: the parent's, the generation's ds hparams, then mutations."""
    hparams = copy.deepcopy(dict(parent.hparams))
    hparams["num_classes"] = int(target.num_classes)
    hparams.update(target.ds_hparams)
    mutations: dict[str, Any] = {}
    if policy.mutate:
        mutations.update(mutate_model_hparams(hparams, space, rng, policy.per_type_mu))
        if policy.adapters:
            mutations.update(mutate_adapters(hparams, space, rng, policy.per_type_mu))
    if policy.fixed_hparams:
        hparams.update(policy.fixed_hparams)
    layers = parse_adapter_layers(hparams.get("adapter_layers", ""))
    hparams["adapter_layers"] = format_adapter_layers(
        [i for i in layers if i < int(hparams.get("num_layers", 0))]
    )
    family.validate_hparams(hparams)
    return hparams, mutations


@dataclasses.dataclass
class _Parts:
    trainable: dict[str, Any] = dataclasses.field(default_factory=dict)
    frozen: dict[str, Any] = dataclasses.field(default_factory=dict)
    momentum: dict[str, Any] = dataclasses.field(default_factory=dict)
    actions: dict[str, str] = dataclasses.field(default_factory=dict)
    sources: dict[str, str] = dataclasses.field(default_factory=dict)


def _choose_components(system, family, parent, task, hparams, space, rng, lineage, policy):
    """Share, clone, adapt or freshly initialise every component of the child (§2.2)."""
    expected = expected_signatures(family, hparams)
    forced = set(policy.force_clone) | set(family.force_clone)
    parts = _Parts()
    fresh_params: dict[str, Any] | None = None
    for name in family.component_names(hparams):
        found = _find_source(system, family, parent, name, task, expected[name], hparams, lineage)
        if found is None:
            if not family.fresh_allowed(name, hparams):
                raise MutationError(
                    f"component {name!r}: no ancestor of path {parent.id} provides it with the "
                    f"right shape, and family {family.name!r} cannot initialise it afresh"
                )
            if fresh_params is None:
                key = jax.random.PRNGKey(int(rng.integers(2**31)))
                fresh_params = jax.device_get(family.init(key, hparams))
            parts.trainable[name], parts.actions[name] = fresh_params[name], "fresh"
            continue
        comp, adapted = found
        parts.sources[name] = comp.id
        if adapted is not None:
            parts.trainable[name], parts.actions[name] = adapted, "adapt"
        elif _clone(comp, name, forced, hparams, space, rng, policy):
            parts.trainable[name] = copy.deepcopy(comp.params)
            if comp.momentum is not None:
                parts.momentum[name] = copy.deepcopy(comp.momentum)
            parts.actions[name] = "clone"
        else:
            parts.frozen[name], parts.actions[name] = comp.params, "share"
    return parts


def _clone(comp, name, forced, hparams, space, rng, policy) -> bool:
    if not comp.locks:
        return True  # the active task's own component: never modify it in place
    if policy.clone_names is not None:
        return bool(policy.clone_names(name))
    if name in forced:
        return True
    if not policy.mutate:
        return False
    p = mutation_probability(hparams, f"clone:{name}", space, rng, policy.per_type_mu)
    return bernoulli(p, rng)


def _register_components(system, family, hparams, parts, agent) -> dict[str, str]:
    """Adds the child's new components to the system; returns name -> component id."""
    components = {}
    for name in family.component_names(hparams):
        if name in parts.trainable:
            c = system.new_component(
                name,
                family.name,
                parts.trainable[name],
                agent,
                lineage=parts.sources.get(name),
                momentum=parts.momentum.get(name),
            )
            parts.trainable[name] = c.params
            components[name] = c.id
        else:
            components[name] = parts.sources[name]
    return components


def _find_source(system, family, parent, name, task, expected_sig, hparams, lineage):
    """Nearest ancestor component for ``name`` (reference §2.2), or None.

    Returns (component, adapted_params_or_None).
    """
    for anc in lineage.ancestors(parent):
        cid = anc.components.get(name)
        if cid is None or cid not in system.components:
            continue
        comp = system.components[cid]
        if name == family.head_name and (comp.locks - {task} or anc.task != task):
            continue  # never share or inherit another task's (or the root's) head
        if comp.signature == expected_sig:
            return comp, None
        adapted = family.adapt_component(name, comp.params, anc.hparams, hparams)
        if adapted is not None and shape_signature(adapted) == expected_sig:
            return comp, adapted
    return None


def _apply_expansions(family, hparams, parts, policy, space, rng, mutations) -> dict:
    """Applies each allowed expansion with probability mu; changed components become clones."""
    from mu2net.models import expansions as exp

    params = {**parts.frozen, **parts.trainable}
    fired = []
    for name in sorted(policy.expansions):
        p = mutation_probability(hparams, f"expand:{name}", space, rng, policy.per_type_mu)
        if bernoulli(p, rng):
            key = jax.random.PRNGKey(int(rng.integers(2**31)))
            hparams, params = exp.EXPANSIONS[name](hparams, params, key)
            fired.append(name)
    if not fired:
        return hparams
    mutations["expansions"] = fired
    params = jax.device_get(params)
    trainable, frozen = {}, {}
    for n, tree in params.items():
        if n in parts.frozen and _identical(tree, parts.frozen[n]):
            frozen[n] = parts.frozen[n]
            continue
        trainable[n] = tree
        if n not in parts.trainable or parts.actions.get(n) == "share":
            parts.actions[n] = "expand"
        mom = parts.momentum.get(n)
        if mom is not None and shape_signature(mom) != shape_signature(tree):
            del parts.momentum[n]
    parts.trainable, parts.frozen = trainable, frozen
    return hparams


def _identical(a: Any, b: Any) -> bool:
    if shape_signature(a) != shape_signature(b):
        return False
    leaves = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    return all(np.array_equal(x, y) for x, y in leaves)
