"""The multipath agent (µ4Net, reference §7.3) as a strategy of the task-iteration runner.

A multipath child of task T combines ``path_0`` (T's published single-path model, head kept)
with ``num_paths - 1`` published single-path models of other tasks (headless), all frozen, and
trains only a router and one connector per other path (:mod:`mu2net.models.multipath`).

* Parent: the decay rule over the agent's own (composite) paths in the population; when it
  accepts none, a new child of ``path_0`` with the hparams of the best multipath path if any,
  else the defaults.
* Mutations: ``_mu_`` and ``opt_*`` as µ2Net, ``router_lr_mult`` and ``num_paths`` (values
  capped by the paths available). The inputs stay path_0's (image size) and, as in µ4Net's
  defaults, unaugmented: every generation's ``ds_*`` turn crop, flip and colour jitter off.
* Sub-path slots reuse the parent's path in that slot, else draw uniformly among the other
  tasks' published single-path models not yet selected (a task whose published path is
  composite offers its own ``path_0``). Router and connectors are cloned from the parent when
  their shapes (and, for a connector, its slot's path) match, else created fresh.
* No size or FLOPs penalty unless the config asks for one; never creates roots.

Cheap by construction: the composite family has two stages, the frozen sub-paths and the
trainable head, so with deterministic inputs the runner's frozen-prefix cache computes the
sub-paths' outputs once per generation's examples and every candidate trains only the head on
them. The task's published path becomes the composite one only when it beats ``path_0``
(keep-best against the parent), and a task evolved by this agent stays a multipath task: a
single-path agent refuses it, as it refuses any other class's task.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mu2net.evolution.config import EvolutionConfig
from mu2net.evolution.hparams import (
    MU,
    bernoulli,
    incremental_mutation,
    mutate_model_hparams,
)
from mu2net.evolution.mutations import ANCESTRY_KEY, Child, ancestry_of
from mu2net.evolution.roots import path_class
from mu2net.evolution.strategy import (
    GenerationSpec,
    IterationContext,
    Proposal,
    Strategy,
    register_strategy,
)
from mu2net.models.base import shape_signature
from mu2net.models.multipath import (
    DEFAULTS,
    MAIN_SLOT,
    SUBPATHS_KEY,
    MultipathError,
    MultipathFamily,
    SubPath,
    check_compatible,
    connector_slot,
    encode_subpaths,
    multipath_family,
    slot_name,
    subpath_names,
)
from mu2net.system.state import Path, System

ROUTER_LR_MULTS = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
NUM_PATHS = [2, 3]
# Input-defining ds keys stay path_0's: its head was trained at that size.
_FIXED_DS = ("ds_image_size", "ds_max_length")
# µ4Net's defaults: no augmentation. The sub-paths' outputs are then a function of each
# example, which the frozen-prefix cache needs to compute them once per generation.
NO_AUGMENTATION = {
    "ds_crop": False,
    "ds_flip_left_right": False,
    "ds_brightness_delta": 0.0,
    "ds_contrast_delta": 0.0,
    "ds_saturation_delta": 0.0,
    "ds_hue_delta": 0.0,
    "ds_quality_delta": 0.0,
}


def main_path(system: System, task: str) -> Path | None:
    """``task``'s published single-path model (a composite path's ``path_0``), or None."""
    best = system.best_path(task)
    if best is None:
        return None
    return best.subpath(MAIN_SLOT) if best.is_composite else best


def subpath_pool(system: System, task: str, main: Path) -> list[Path]:
    """Other tasks' published single-path models usable next to ``main``, by task order.

    Private tasks offer none; incompatible ones (another input modality, a family with no
    headless representation) are left out.
    """
    pool = []
    main_spec = as_subpath(main, MAIN_SLOT)
    for other in system.tasks:
        path = main_path(system, other) if other != task else None
        if path is None or path.private:
            continue
        try:
            check_compatible(main_spec, as_subpath(path, slot_name(1)))
        except MultipathError:
            continue
        pool.append(path)
    return pool


def as_subpath(path: Path, slot: str) -> SubPath:
    """The spec of ``path`` in ``slot``."""
    return SubPath(slot, path.id, path.task, path.family, dict(path.hparams), path.agent)


class MultipathStrategy(Strategy):
    """Router + connectors over frozen paths of several tasks (the µ4Net MultiVit agent)."""

    name = "multipath"

    def __init__(self, name: str | None = None):
        super().__init__(name)
        self.main: Path | None = None
        self.family: MultipathFamily | None = None
        self.pool: list[Path] = []

    def search_space(self, config: EvolutionConfig) -> dict[str, list]:
        """The config's ``_mu_`` and ``opt_*`` and the multipath keys (reference §7.3 values)."""
        space = {k: v for k, v in config.search_space().items() if k == MU or k.startswith("opt_")}
        return {**space, "router_lr_mult": ROUTER_LR_MULTS, "num_paths": NUM_PATHS}

    def continues(self, best: Path, root: Path) -> bool:
        """A task whose main path is of the agent's class (single-path or already multipath)."""
        main = best.subpath(MAIN_SLOT) if best.is_composite else best
        return path_class(main) == path_class(root)

    def begin(self, ctx: IterationContext) -> None:
        """Finds path_0 and the sub-path pool; errors before anything trains.

        The iteration's data and candidates then use the composite family: its frozen stage
        is what the runner's frozen-prefix cache computes once per generation.

        Raises:
            MultipathError: no single-path published path of the task, too few other paths
              for ``num_paths``, or a main path of another family than the agent's.
        """
        main = main_path(ctx.system, ctx.task)
        if main is None:
            raise MultipathError(
                f"task {ctx.task!r} has no published single-path model to be path_0: evolve "
                "it with a single-path strategy (e.g. 'mu2net') first"
            )
        if main.family != ctx.family.name:
            raise MultipathError(
                f"task {ctx.task!r}: path_0 {main.id} is of family {main.family!r}, the agent's "
                f"is {ctx.family.name!r}"
            )
        self.main, self.pool = main, subpath_pool(ctx.system, ctx.task, main)
        wanted = int(self.defaults(ctx)["num_paths"])
        if wanted - 1 > len(self.pool):
            raise MultipathError(
                f"task {ctx.task!r}: num_paths={wanted} needs {wanted - 1} other tasks' "
                f"published single-path models compatible with {main.id}; there are "
                f"{len(self.pool)} ({[p.task for p in self.pool]})"
            )
        self.family = multipath_family(main.family)
        ctx.family = self.family

    def defaults(self, ctx: IterationContext) -> dict[str, Any]:
        """Hparams of a brand-new multipath path (before the generation's ds)."""
        keys = [MU, *DEFAULTS, *(k for k in ctx.defaults if k.startswith("opt_"))]
        merged = {**DEFAULTS, **ctx.defaults}
        return {k: merged[k] for k in keys if k in merged}

    def propose(self, ctx: IterationContext, gen: GenerationSpec, n: int) -> list[Proposal]:
        """All ``n`` parents first (decay rule over own paths, else path_0), then children.

        The generation's inputs are made unaugmented before the runner builds its data.
        """
        assert self.main is not None, "begin() was not called"
        gen.ds.update(NO_AUGMENTATION)
        parents = [self._draw_parent(ctx, gen.rng) for _ in range(n)]
        own = [p for p in ctx.population if p.is_composite]
        best = max(own, key=lambda p: ctx.score(p, None)) if own else None
        proposals = []
        for parent in parents:
            child = self._child(ctx, gen, parent, best)
            proposals.append(Proposal(parent or self.main, child))
        return proposals

    def _draw_parent(self, ctx: IterationContext, rng: np.random.Generator) -> Path | None:
        own = [p for p in ctx.population if p.is_composite]
        ranked = sorted(own, key=lambda p: (-ctx.score(p, None), -p.metrics.get("created", 0.0)))
        for p in ranked:
            if rng.random() < 0.5 ** ctx.offspring.get(p.id, 0):
                ctx.offspring[p.id] = ctx.offspring.get(p.id, 0) + 1
                return p
        ctx.offspring[self.main.id] = ctx.offspring.get(self.main.id, 0) + 1
        return None

    def _hparams(self, ctx, gen, template: Path | None) -> tuple[dict[str, Any], dict]:
        hp = dict(template.hparams) if template is not None else self.defaults(ctx)
        changes = mutate_model_hparams(hp, ctx.space, gen.rng)
        mu = float(hp.get(MU, ctx.defaults.get(MU, 0.1)))
        allowed = {
            "router_lr_mult": ctx.space.get("router_lr_mult", []),
            "num_paths": [v for v in ctx.space.get("num_paths", []) if v - 1 <= len(self.pool)],
        }
        for key, values in allowed.items():
            if values and bernoulli(mu, gen.rng):
                old = hp[key]
                hp[key] = incremental_mutation(old, values, gen.rng)
                if hp[key] != old:
                    changes[key] = (old, hp[key])
        hp.update(gen.ds)
        hp.update({k: self.main.hparams[k] for k in _FIXED_DS if k in self.main.hparams})
        hp["num_classes"] = int(ctx.info.num_classes)
        return hp, changes

    def _slots(self, parent: Path | None, n: int, rng: np.random.Generator) -> list[Path]:
        """path_0, then the parent's sub-paths slot by slot, then fresh draws from the pool."""
        chosen = [self.main]
        if parent is not None and parent.is_composite:
            chosen += [parent.subpath(slot_name(i)) for i in range(1, min(n, len(parent.subpaths)))]
        while len(chosen) < n:
            free = [p for p in self.pool if p.id not in {c.id for c in chosen}]
            chosen.append(free[int(rng.integers(len(free)))])
        return chosen

    def _child(self, ctx, gen, parent: Path | None, best: Path | None) -> Child:
        assert self.family is not None
        hp, mutations = self._hparams(ctx, gen, parent if parent is not None else best)
        chosen = self._slots(parent, int(hp["num_paths"]), gen.rng)
        subs = [as_subpath(p, slot_name(i)) for i, p in enumerate(chosen)]
        hp[SUBPATHS_KEY] = encode_subpaths(subs)
        self.family.validate_hparams(hp)
        system, agent = ctx.system, ctx.agent
        components, frozen = {}, {}
        for sub, path in zip(subs, chosen, strict=True):
            for name in subpath_names(sub):
                components[f"{sub.slot}/{name}"] = path.components[name]
                frozen[f"{sub.slot}/{name}"] = system.component(path.components[name]).params
        fresh = self.family.init_own(hp)
        trainable, momentum, actions = {}, {}, {}
        for name, params in fresh.items():
            source = _reusable(system, parent, name, params, subs)
            if source is None:
                comp = system.new_component(name, self.family.name, params, agent)
                actions[name] = "fresh"
            else:
                comp = system.clone_component(source, agent)
                actions[name] = "clone"
                if comp.momentum is not None:
                    momentum[name] = comp.momentum
            components[name] = comp.id
            trainable[name] = comp.params
        mutations["components"] = actions
        mutations["subpaths"] = [s.path for s in subs]
        source = parent if parent is not None else self.main
        path = Path(
            id=system.new_id(agent, "p"), task=ctx.task, family=self.family.name,
            components=components, hparams=hp, agent=agent, parent=source.id,
            metrics={"generation": source.generation + 1, "parent_task": source.task,
                     ANCESTRY_KEY: ancestry_of(source)},
        )  # fmt: skip
        return Child(path, trainable, frozen, momentum, actions, mutations)


def _reusable(
    system: System, parent: Path | None, name: str, params: Any, subs: Sequence[SubPath]
) -> str | None:
    """The parent's component ``name`` when it fits (same shapes; a connector: same path)."""
    if parent is None or not parent.is_composite or name not in parent.components:
        return None
    slot = connector_slot(name)
    if slot is not None:
        theirs = {s.slot: s.path for s in parent.subpaths}
        if theirs.get(slot) != next(s.path for s in subs if s.slot == slot):
            return None
    cid = parent.components[name]
    return cid if system.component(cid).signature == shape_signature(params) else None


register_strategy("multipath", MultipathStrategy)
