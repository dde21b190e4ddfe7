"""Compute budgets of a task iteration: FLOPs and seconds, besides the reference's counts.

With ``EvolutionConfig.budget_flops`` or ``budget_seconds`` set, a task iteration runs as many
candidates as fit: before each generation the runner asks :meth:`Spending.fit` how many of
the strategy's candidates the rest of the budget pays for, at the mean cost of the candidates
so far (the first generation always runs). A strategy that trains one long candidate (the
baselines) instead sizes it from its compiled step's cost
(:func:`mu2net.train.cost.step_cost`), so every method can be given the same budget.

FLOPs are XLA's count of what ran (train steps x steps, validation passes, frozen-prefix
activations computed once per generation); seconds are wall time from the start of the task
iteration, compiles and input pipelines included.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

# A compute budget bounds the generations; this only stops a strategy whose candidates cost 0.
MAX_GENERATIONS = 10_000


@dataclasses.dataclass(frozen=True)
class Budget:
    """A task iteration's compute budget; 0 means unbounded in that unit."""

    flops: float = 0.0
    seconds: float = 0.0

    @classmethod
    def of(cls, config: Any) -> Budget:
        """The budget of an :class:`~mu2net.evolution.config.EvolutionConfig`."""
        return cls(float(config.budget_flops), float(config.budget_seconds))

    @property
    def active(self) -> bool:
        """Whether the iteration is bounded by compute rather than by counts."""
        return self.flops > 0 or self.seconds > 0

    def limits(self) -> dict[str, float]:
        """{unit: limit} of the bounded units."""
        return {u: v for u, v in (("flops", self.flops), ("seconds", self.seconds)) if v > 0}

    def describe(self) -> str:
        """``1.2e+12 FLOPs, 300 s`` (for logs)."""
        parts = [f"{self.flops:.3g} FLOPs"] if self.flops else []
        parts += [f"{self.seconds:.0f} s"] if self.seconds else []
        return ", ".join(parts) or "counts only"


@dataclasses.dataclass
class Spending:
    """What a task iteration has spent so far (persisted with its progress for resumes)."""

    flops: float = 0.0
    seconds: float = 0.0
    candidates: int = 0
    start_best: str | None = None  # the task's best path when the iteration started

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | None) -> Spending:
        """Inverse of :meth:`to_json` (empty for a fresh iteration)."""
        d = d or {}
        return cls(
            float(d.get("flops", 0.0)),
            float(d.get("seconds", 0.0)),
            int(d.get("candidates", 0)),
            d.get("start_best"),
        )

    def to_json(self) -> dict[str, Any]:
        """JSON-safe form."""
        return dataclasses.asdict(self)

    def add(self, records: Iterable[Mapping[str, Any]], seconds: float) -> None:
        """Adds a generation's candidate records and its wall time."""
        for r in records:
            self.flops += sum(float(v) for v in r.get("flops", {}).values())
            self.candidates += 1
        self.seconds += seconds

    def left(self, budget: Budget, unit: str) -> float:
        """What is left of ``budget`` in ``unit`` (inf when that unit is unbounded)."""
        limit = budget.limits().get(unit)
        return math.inf if limit is None else limit - getattr(self, unit)

    def fit(self, budget: Budget, wanted: int) -> int:
        """How many of ``wanted`` candidates the rest of the budget pays for (0: stop)."""
        if not budget.active or wanted <= 0:
            return wanted
        if any(self.left(budget, u) <= 0 for u in budget.limits()):
            return 0
        if self.candidates == 0:
            return wanted
        fits = wanted
        for unit in budget.limits():
            mean = getattr(self, unit) / self.candidates
            if mean > 0:
                fits = min(fits, int(self.left(budget, unit) // mean))
        return max(0, fits)


def compute_by_task(history: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """{task: candidates, examples, flops, seconds} summed over its task-iteration records."""
    out: dict[str, dict[str, float]] = {}
    for rec in history:
        if rec.get("event") != "task_iteration":
            continue
        acc = out.setdefault(
            rec["task"],
            {"iterations": 0, "candidates": 0, "examples": 0, "flops": 0.0, "seconds": 0.0},
        )
        acc["iterations"] += 1
        for key in ("candidates", "examples", "flops", "seconds"):
            acc[key] += float(rec.get(key) or 0)
    return out
