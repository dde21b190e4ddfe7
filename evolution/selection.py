"""Parent selection (reference §4.3): the decay rule, seeds, and muNet's linear-probe seeding."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import numpy as np

from mu2net.system.state import Path


def seed_paths(paths: Sequence[Path], task: str, family: str, rng: np.random.Generator) -> list:
    """Other tasks' non-private paths and the roots of ``family``, shuffled once (µ2Net)."""
    seeds = [p for p in paths if p.task != task and not p.private and p.family == family]
    seeds.sort(key=lambda p: p.id)
    order = rng.permutation(len(seeds))
    return [seeds[i] for i in order]


class DecaySelector:
    """Samples parents for the active task with the decay rule.

    1. Walk the task's population by score (best first); accept path p with probability
       0.5 ** offspring(p), where offspring counts children already made for this task.
    2. Else walk the seed list (other tasks' paths and roots) the same way; an accepted
       seed rotates to the end of the list.
    3. Else pick uniformly over population and seeds.

    With ``linear_probe_seeding`` (muNet), every seed is first used once, in order, as a parent
    whose child is trained *without mutations* (effectively a linear probe of that path).
    """

    def __init__(
        self,
        task: str,
        population: list[Path],
        seeds: list[Path],
        score: Callable[[Path], float],
        rng: np.random.Generator,
        linear_probe_seeding: bool = False,
    ):
        self.task = task
        self.population = population
        self.seeds = list(seeds)
        self.score = score
        self.rng = rng
        self.offspring: dict[str, int] = {}
        for p in [*population, *seeds]:
            counts = p.metrics.get("offsprings_per_task") or "{}"
            counts = json.loads(counts) if isinstance(counts, str) else dict(counts)
            self.offspring[p.id] = int(counts.get(task, 0))
        self._unprobed = list(seeds) if linear_probe_seeding else []

    def select(self) -> tuple[Path, bool]:
        """Returns (parent, mutate): ``mutate`` is False only for muNet's seed probes."""
        if self._unprobed:
            parent = self._unprobed.pop(0)
            self._count(parent)
            return parent, False
        ranked = sorted(enumerate(self.population), key=lambda ip: (-self.score(ip[1]), -ip[0]))
        for _, p in ranked:
            if self._accept(p):
                return p, True
        for i, p in enumerate(self.seeds):
            if self._accept(p):
                self.seeds.append(self.seeds.pop(i))
                return p, True
        pool = [*self.population, *self.seeds]
        if not pool:
            raise ValueError(f"task {self.task!r}: no parent available (no root in the system?)")
        p = pool[int(self.rng.integers(len(pool)))]
        self._count(p)
        return p, True

    def _accept(self, p: Path) -> bool:
        if self.rng.random() < 0.5 ** self.offspring.get(p.id, 0):
            self._count(p)
            return True
        return False

    def _count(self, p: Path) -> None:
        self.offspring[p.id] = self.offspring.get(p.id, 0) + 1

    def offspring_metrics(self, p: Path) -> str:
        """``offsprings_per_task`` JSON of ``p`` with this iteration's counts merged in."""
        counts = p.metrics.get("offsprings_per_task") or "{}"
        counts = json.loads(counts) if isinstance(counts, str) else dict(counts)
        counts[self.task] = self.offspring.get(p.id, 0)
        return json.dumps(counts, sort_keys=True)
