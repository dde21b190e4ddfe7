"""The agent-strategy interface: what a task iteration tries, decided apart from how it runs.

The task-iteration runner (:mod:`mu2net.evolution.runner`) owns the reference's mechanics:
reload, unlock, per-generation data, training with keep-best, acceptance against the parent,
population updates after each generation, publish + lock, test eval, commits and history. A
:class:`Strategy` only decides *what to try*: for each generation it proposes children (parent,
child path, which components train), all parents drawn before any child trains (§4.3, §4.6).
It may bring its own search space and scorer and its own budget shape.

Strategies are registered by name (``EvolutionConfig.strategy``): ``mu2net`` (µ2Net/muNet
search, the default) and the fixed baselines ``finetune_all``, ``linear_probe``,
``freeze_bottom:K``, ``adapters:D``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from mu2net.evolution.budget import MAX_GENERATIONS, Budget
from mu2net.evolution.config import ConfigError, EvolutionConfig
from mu2net.evolution.mutations import Child, Lineage
from mu2net.evolution.prefix import ActivationMemo
from mu2net.evolution.roots import path_class
from mu2net.models.base import Family
from mu2net.system.state import Path, System


@dataclasses.dataclass
class IterationContext:
    """What a strategy sees during one task iteration (built by the runner).

    Attributes:
      task: the active task.
      iteration: the task iteration's index for this task.
      agent: the shard that owns the new components and paths.
      info: the task's :class:`mu2net.tasks.registry.TaskInfo`.
      system: the live system (children's new components are added to it).
      family: the agent class's model family.
      config: the evolution config.
      space: the strategy's search space.
      defaults: hparams of a brand-new path.
      root: the root of the agent's class.
      population: the task's population; improved children join it after each generation.
      seeds: other tasks' paths of the agent's classes and the root, shuffled once.
      offspring: the task's children per parent id (persisted in the task's published path).
      lineage: the ancestor walk (nearest live ancestor, then the root).
      score: (path, quality or None) -> score, the same function for candidates and parents.
      activations: frozen-prefix activations kept by the runner across generations and
        iterations (None: computed again each generation).
    """

    task: str
    iteration: int
    agent: str
    info: Any
    system: System
    family: Family
    config: EvolutionConfig
    space: dict[str, list]
    defaults: dict[str, Any]
    root: Path
    population: list[Path]
    seeds: list[Path]
    offspring: dict[str, int]
    lineage: Lineage
    score: Callable[[Path, float | None], float]
    activations: ActivationMemo | None = None


@dataclasses.dataclass
class GenerationSpec:
    """What every candidate of one generation shares (reference §4.4).

    Attributes:
      index: the generation's index in the task iteration.
      ds: the generation's dataset hparams (imposed on every child).
      ds_mutations: ds hparams that changed from the task's best path, {key: (old, new)}.
      rng: the generation's generator (parents, mutations, seeds of training).
    """

    index: int
    ds: dict[str, Any]
    ds_mutations: dict[str, Any]
    rng: np.random.Generator


@dataclasses.dataclass
class Proposal:
    """One child to train: its parent and what it is.

    Attributes:
      parent: the parent path.
      child: the child and its trainable/frozen split.
      num_validations: validations of its training (None: the config's V).
      budget_share: with a compute budget, the fraction of what is left of it that this
        child's training is sized to (its ``num_validations`` is then computed from its
        compiled step's cost); None: trained for ``num_validations``.
    """

    parent: Path
    child: Child
    num_validations: int | None = None
    budget_share: float | None = None


class Strategy:
    """Base of every agent strategy; subclasses implement :meth:`propose`.

    Attributes:
      name: registry name (``EvolutionConfig.strategy``).
      publishes: whether the best path is published and committed (False for baselines,
        which exist to be compared with).
    """

    name = "base"
    publishes = True

    def __init__(self, name: str | None = None):
        # Parametrised strategies (``freeze_bottom:4``) keep the name they were asked by.
        if name is not None:
            self.name = name

    def search_space(self, config: EvolutionConfig) -> dict[str, list]:
        """The hparam space of this strategy (default: the config's)."""
        return config.search_space()

    def generations(self, config: EvolutionConfig) -> int:
        """Generations per task iteration (a compute budget stops them instead)."""
        if Budget.of(config).active:
            return MAX_GENERATIONS
        return config.generations_per_task_iteration()

    def candidates(self, config: EvolutionConfig, generation: int) -> int:
        """Children of generation ``generation`` (before the compute budget's cut)."""
        if Budget.of(config).active:
            return config.candidates_per_generation
        done = generation * config.candidates_per_generation
        return max(
            0, min(config.candidates_per_generation, config.samples_per_task_iteration - done)
        )

    def continues(self, best: Path, root: Path) -> bool:
        """Whether this strategy may evolve a task whose published path is ``best``.

        Default: ``best`` is of the agent's class, the class of ``root``.
        """
        return path_class(best) == path_class(root)

    def begin(self, ctx: IterationContext) -> None:
        """Called once per task iteration before its first generation."""

    def propose(self, ctx: IterationContext, gen: GenerationSpec, n: int) -> list[Proposal]:
        """Draws ``n`` parents, then builds their children; nothing trains yet."""
        raise NotImplementedError

    def score(self, ctx: IterationContext, path: Path, quality: float | None = None) -> float:
        """Score of ``path`` (or of a candidate at validation ``quality``), reference §4.7."""
        cfg = ctx.config
        base = cfg.params_base or float(ctx.system.path_params(ctx.root))
        flops = path.metrics.get("flops") if cfg.flops_base else None
        return ctx.system.score(path, quality, cfg.scale, base, flops, cfg.flops_base or None)


_FACTORIES: dict[str, Callable[[str], Strategy]] = {}


def register_strategy(pattern: str, factory: Callable[[str], Strategy]) -> None:
    """Registers ``factory(name)`` for strategy names fully matching regex ``pattern``."""
    _FACTORIES[pattern] = factory


def get_strategy(name: str) -> Strategy:
    """The strategy called ``name``; unknown names raise :class:`ConfigError` listing the known."""
    for pattern, factory in _FACTORIES.items():
        if re.fullmatch(pattern, name):
            return factory(name)
    known = ", ".join(p.replace(r"(\d+)", "N") for p in _FACTORIES)
    raise ConfigError(f"EvolutionConfig.strategy: unknown strategy {name!r}; known: {known}")


def finite_or_none(x: Any) -> float | None:
    """``x`` as a float, or None when missing or not finite (JSON-safe metrics)."""
    return float(x) if x is not None and math.isfinite(float(x)) else None
