"""Evaluation of published paths on their tasks' splits (test by default)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mu2net.evolution import data as evo_data
from mu2net.models.base import get_family
from mu2net.system.state import StateError, System
from mu2net.train.batching import eval_batches


def evaluate_path(
    system: System, task: str, split: str = "test", batch_size: int = 64
) -> tuple[float, np.ndarray, np.ndarray]:
    """(accuracy, predictions, targets) of ``task``'s published path on ``split``."""
    from mu2net.train.trainer import evaluate

    path = system.best_path(task)
    if path is None:
        raise StateError(f"task {task!r} has no published path")
    family = get_family(path.family)
    arrays = evo_data.eval_arrays(task, split, family, path.hparams)
    batches = eval_batches(arrays, batch_size)
    acc, preds = evaluate(family, path.hparams, system.params_of(path), batches)
    return float(acc), np.asarray(preds), arrays["targets"].reshape(-1)


def evaluate_tasks(
    system: System, tasks: Sequence[str], split: str = "test"
) -> dict[str, dict[str, Any]]:
    """Accuracy of each task's path on ``split`` next to the value recorded at publish time."""
    out = {}
    for task in tasks:
        acc, preds, _ = evaluate_path(system, task, split)
        key = {"test": "test_quality", "validation": "quality"}.get(split)
        out[task] = {
            "accuracy": acc,
            "examples": int(len(preds)),
            "recorded": system.best_path(task).metrics.get(key) if key else None,
        }
    return out
