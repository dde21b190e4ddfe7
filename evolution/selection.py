"""Parent selection (reference §4.3): the decay rule, seeds, and muNet's linear-probe seeding.

Offspring counts are the active task's own record: how many children it made from each parent
(its own paths, other tasks' paths, roots). They are persisted in the task's published path
(``parent_offspring``), i.e. in the agent's own shard, so a later task iteration or a restart
sees every parent it already used, including paths other agents own.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from mu2net.errors import Mu2netError
from mu2net.system.state import Path

OFFSPRING_KEY = "parent_offspring"
_LEGACY_KEY = "offsprings_per_task"


class SelectionError(Mu2netError, ValueError):
    """No parent can be drawn (e.g. a system without a root of the agent's class)."""


def seed_paths(paths: Sequence[Path], task: str, rng: np.random.Generator) -> list[Path]:
    """Other tasks' non-private paths (and roots) among ``paths``, shuffled once (µ2Net)."""
    seeds = sorted((p for p in paths if p.task != task and not p.private), key=lambda p: p.id)
    order = rng.permutation(len(seeds))
    return [seeds[i] for i in order]


def load_offspring(task: str, best: Path | None, parents: Sequence[Path]) -> dict[str, int]:
    """The task's offspring counts: its published record, else legacy per-path counters."""
    counts: dict[str, int] = {}
    for p in parents:  # stores written before the per-task record kept counts on each parent
        legacy = _as_dict(p.metrics.get(_LEGACY_KEY))
        if task in legacy:
            counts[p.id] = int(legacy[task])
    if best is not None:
        counts.update({k: int(v) for k, v in _as_dict(best.metrics.get(OFFSPRING_KEY)).items()})
    return counts


def dump_offspring(counts: Mapping[str, int]) -> str:
    """JSON of the counts, as stored in the task's path metrics."""
    return json.dumps({k: int(v) for k, v in counts.items() if v}, sort_keys=True)


def _as_dict(value) -> dict:
    if not value:
        return {}
    return json.loads(value) if isinstance(value, str) else dict(value)


class DecaySelector:
    """Samples parents for the active task with the decay rule.

    1. Walk the task's population by score (best first); accept path p with probability
       0.5 ** offspring(p), where offspring counts children already made for this task.
    2. Else walk the seed list (other tasks' paths and roots) the same way; an accepted
       seed rotates to the end of the list.
    3. Else pick uniformly over population and seeds.

    Counts grow as parents are drawn, so later draws of the same generation see them (§4.3).
    With ``linear_probe_seeding`` (muNet), every seed is first used once, in order, as a parent
    whose child is trained *without mutations* (effectively a linear probe of that path).

    Args:
      task: the active task.
      population: the task's population (the caller extends it after each generation).
      seeds: other tasks' paths and roots, shuffled.
      score: path -> score.
      offspring: the task's offspring counts (updated in place).
      linear_probe_seeding: muNet's seed policy.
    """

    def __init__(
        self,
        task: str,
        population: list[Path],
        seeds: list[Path],
        score: Callable[[Path], float],
        offspring: dict[str, int],
        linear_probe_seeding: bool = False,
    ):
        self.task = task
        self.population = population
        self.seeds = list(seeds)
        self.score = score
        self.offspring = offspring
        self._unprobed = list(seeds) if linear_probe_seeding else []

    def select(self, rng: np.random.Generator) -> tuple[Path, bool]:
        """Returns (parent, mutate): ``mutate`` is False only for muNet's seed probes."""
        if self._unprobed:
            parent = self._unprobed.pop(0)
            self._count(parent)
            return parent, False
        ranked = sorted(enumerate(self.population), key=lambda ip: (-self.score(ip[1]), -ip[0]))
        for _, p in ranked:
            if self._accept(p, rng):
                return p, True
        for i, p in enumerate(self.seeds):
            if self._accept(p, rng):
                self.seeds.append(self.seeds.pop(i))
                return p, True
        pool = [*self.population, *self.seeds]
        if not pool:
            raise SelectionError(
                f"task {self.task!r}: no parent available (no root of this agent's class?)"
            )
        p = pool[int(rng.integers(len(pool)))]
        self._count(p)
        return p, True

    def _accept(self, p: Path, rng: np.random.Generator) -> bool:
        if rng.random() < 0.5 ** self.offspring.get(p.id, 0):
            self._count(p)
            return True
        return False

    def _count(self, p: Path) -> None:
        self.offspring[p.id] = self.offspring.get(p.id, 0) + 1
