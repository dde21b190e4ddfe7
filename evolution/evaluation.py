"""Evaluation of published paths on their tasks' splits (test by default), by each task's metrics.

Every task is scored by its own seqio ``metric_fns`` (:mod:`mu2net.tasks.metrics`): the
primary metric (the first scalar of the first metric_fn, top-1 accuracy by default) is the
path's quality; :func:`evaluate_tasks` also reports every other scalar the metric_fns give.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mu2net.evolution import data as evo_data
from mu2net.models.base import get_family
from mu2net.system.state import StateError, System
from mu2net.train.batching import eval_batches


def _predictions(
    system: System, task: str, split: str, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    from mu2net.train.trainer import evaluate

    path = system.best_path(task)
    if path is None:
        raise StateError(f"task {task!r} has no published path")
    family = get_family(path.family)
    arrays = evo_data.eval_arrays(task, split, family, path.hparams)
    batches = eval_batches(arrays, batch_size)
    _, preds = evaluate(family, path.hparams, system.params_of(path), batches)
    return np.asarray(preds).reshape(-1), arrays["targets"].reshape(-1)


def evaluate_path(
    system: System, task: str, split: str = "test", batch_size: int = 64, metric: str | None = None
) -> tuple[float, np.ndarray, np.ndarray]:
    """(quality, predictions, targets) of ``task``'s published path on ``split``.

    The quality is measured by ``metric`` (see :func:`mu2net.tasks.metrics.named_metric`),
    by default the task's primary metric (top-1 accuracy unless the task's first seqio
    metric_fn says otherwise).

    Raises:
        StateError: the task has no published path.
        TaskError: bad data, or a metric_fn that fails.
    """
    from mu2net.tasks.metrics import named_metric

    preds, targets = _predictions(system, task, split, batch_size)
    _, fn = named_metric(task, metric or "primary")
    return float(fn(targets, preds)), preds, targets


def evaluate_tasks(
    system: System, tasks: Sequence[str], split: str = "test", batch_size: int = 64
) -> dict[str, dict[str, Any]]:
    """Each task's metrics on ``split`` next to the quality recorded at publish time.

    Returns:
        ``{task: {"metric": name, "value": primary metric, "metrics": {every scalar},
        "accuracy": top-1, "examples": N, "recorded": recorded quality or None}}``.
    """
    from mu2net.tasks.metrics import accuracy, primary_metric, task_metrics

    out = {}
    for task in tasks:
        preds, targets = _predictions(system, task, split, batch_size)
        name, metric = primary_metric(task)
        key = {"test": "test_quality", "validation": "quality"}.get(split)
        out[task] = {
            "metric": name,
            "value": float(metric(targets, preds)),
            "metrics": task_metrics(task, targets, preds),
            "accuracy": accuracy(targets, preds)["accuracy"],
            "examples": int(len(preds)),
            "recorded": system.best_path(task).metrics.get(key) if key else None,
        }
    return out
