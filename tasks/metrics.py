"""Classification metrics and the seqio glue the Evaluator needs.

Tasks emit ``targets`` as int32 ``[1]`` with a ``seqio.PassThroughVocabulary``; the Evaluator
decodes them (and the model's predicted ``[label]`` token lists) with that vocabulary, then
:func:`label_postprocessor` turns each into a plain ``int`` and :func:`accuracy` compares them.
seqio's text feature converters do not fit image or label features, and its
``PassThroughFeatureConverter`` lacks the ``TASK_FEATURES``/``MODEL_FEATURES`` the Evaluator
reads, hence :class:`ClassificationFeatureConverter`.

**A task's own metrics** (the API evolution, ``mu2net eval`` and the report use):

* :func:`task_metrics` ``(task_name, targets, predictions) -> {name: float}`` runs every
  seqio ``predict_metric_fns`` of the task (its ``metric_fns=[...]``) and keeps their scalar
  results (floats, or ``seqio.metrics.Scalar``);
* :func:`primary_metric` ``(task_name) -> (name, fn)``: the metric a system selects on: the
  first scalar of the task's first metric_fn (top-1 ``"accuracy"`` for mu2net's own tasks);
  ``fn(targets, predictions) -> float``, higher is better;
* :func:`metric_name_of` gives that name for a seqio Task (``TaskInfo.metric_name`` holds it).

``targets`` and ``predictions`` are 1-D int arrays of class labels (what
:func:`label_postprocessor` makes of seqio's decoded ``[label]``), the same for every task,
so a user's metric_fn is written as for seqio: ``def macro_f1(targets, predictions) -> dict``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import seqio
import tensorflow as tf

from mu2net.tasks.registry import TaskError, task_info


def label_postprocessor(output: Any, example: Any = None, is_target: bool = False) -> int:
    """Decoded ``[label]`` (list, array, bytes or int) -> ``int``; seqio ``postprocess_fn``."""
    del example, is_target
    if isinstance(output, bytes):
        output = output.decode("utf-8")
    if isinstance(output, str):
        return int(output.strip() or -1)
    arr = np.asarray(output).reshape(-1)
    if arr.size == 0:
        return -1  # an empty prediction never matches a label
    return int(arr[0])


def accuracy(targets: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
    """Top-1 accuracy as a seqio metric function: ``{"accuracy": fraction in [0, 1]}``."""
    t = np.asarray(targets).reshape(-1)
    p = np.asarray(predictions).reshape(-1)
    if t.shape != p.shape:
        raise ValueError(f"accuracy: {t.size} targets but {p.size} predictions")
    if t.size == 0:
        return {"accuracy": float("nan")}
    return {"accuracy": float(np.mean(t == p))}


MetricFn = Callable[[np.ndarray, np.ndarray], float]


def _scalars(result: Any, where: str) -> dict[str, float]:
    if not isinstance(result, Mapping):
        raise TaskError(f"{where}: returned {type(result).__name__}, expected a dict of metrics")
    out = {}
    for key, value in result.items():
        value = getattr(value, "value", value)  # seqio.metrics.Scalar
        if isinstance(value, (int, float, np.integer, np.floating)) or (
            isinstance(value, np.ndarray) and value.size == 1
        ):
            out[str(key)] = float(np.asarray(value).reshape(()))
    return out


def _fn_name(fn: Any) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def _predict_fns(task_name: str) -> tuple[str, list[Any]]:
    name = task_info(task_name).name
    return name, list(seqio.get_mixture_or_task(name).predict_metric_fns)


def _labels(targets: Any, predictions: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(targets).reshape(-1).astype(np.int64)
    p = np.asarray(predictions).reshape(-1).astype(np.int64)
    if t.shape != p.shape:
        raise TaskError(f"{where}: {t.size} targets but {p.size} predictions")
    return t, p


def task_metrics(task_name: str, targets: Any, predictions: Any) -> dict[str, float]:
    """Every scalar of every seqio metric_fn of a task, on class-label arrays.

    Args:
        task_name: A registered task (``mu2net:`` prefix optional, or a plain seqio name).
        targets: True labels, ``[N]`` ints.
        predictions: Predicted labels, ``[N]`` ints.

    Returns:
        ``{metric name: value}``; accuracy alone for a task without metric_fns.

    Raises:
        TaskError: unknown task, mismatched lengths, or a metric_fn that fails (named).
    """
    name, fns = _predict_fns(task_name)
    t, p = _labels(targets, predictions, f"Task {name!r} metrics")
    out: dict[str, float] = {}
    for fn in fns or [accuracy]:
        where = f"Task {name!r} metric_fn {_fn_name(fn)!r}"
        try:
            result = fn(t, p)
        except Exception as e:  # noqa: BLE001 - user code: name it, keep the cause
            raise TaskError(f"{where} failed: {type(e).__name__}: {e}") from e
        out.update(_scalars(result, where))
    return out


def metric_name_of(task: seqio.Task) -> str:
    """Name of a seqio Task's primary metric: its first metric_fn's first scalar key.

    The name is found by calling that metric_fn once on two tiny label arrays (metric_fns
    are pure functions of targets and predictions); ``"accuracy"`` without metric_fns.

    Raises:
        TaskError: the first metric_fn fails on labels or returns no scalar.
    """
    fns = list(task.predict_metric_fns)
    if not fns:
        return "accuracy"
    where = f"Task {task.name!r} metric_fn {_fn_name(fns[0])!r}"
    try:
        result = fns[0](np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0]))
    except Exception as e:  # noqa: BLE001 - user code: name it, keep the cause
        raise TaskError(f"{where} failed on labels [0 1 1 0]: {type(e).__name__}: {e}") from e
    scalars = _scalars(result, where)
    if not scalars:
        raise TaskError(f"{where}: returned no scalar metric; mu2net selects on a number")
    return next(iter(scalars))


def primary_metric(task_name: str) -> tuple[str, MetricFn]:
    """The metric a system scores a task by: ``(name, fn(targets, predictions) -> float)``.

    The first scalar of the task's first seqio metric_fn (default top-1 accuracy); higher is
    better. ``fn`` takes 1-D int label arrays and raises TaskError as :func:`task_metrics`.

    Raises:
        TaskError: unknown task, or a metric_fn without a scalar result.
    """
    info = task_info(task_name)
    name, fns = _predict_fns(info.name)
    key, first = info.metric_name, (fns or [accuracy])[0]

    def fn(targets: Any, predictions: Any) -> float:
        where = f"Task {name!r} metric_fn {_fn_name(first)!r}"
        t, p = _labels(targets, predictions, where)
        try:
            result = first(t, p)
        except Exception as e:  # noqa: BLE001 - user code: name it, keep the cause
            raise TaskError(f"{where} failed: {type(e).__name__}: {e}") from e
        scalars = _scalars(result, where)
        if key not in scalars:
            raise TaskError(f"{where}: result has no {key!r} (got {sorted(scalars)})")
        return scalars[key]

    fn.__name__ = key
    return key, fn


def named_metric(task_name: str, name: str) -> tuple[str, MetricFn]:
    """The metric called ``name`` of a task: ``(name, fn(targets, predictions) -> float)``.

    ``"accuracy"`` is top-1 accuracy for every task; ``"primary"`` is the task's
    :func:`primary_metric`; any other name is that scalar of the task's seqio metric_fns.

    Raises:
        TaskError: unknown task, or no metric_fn of the task gives a scalar called ``name``
        (the message lists those it gives).
    """
    if name == "accuracy":
        return name, lambda t, p: accuracy(t, p)["accuracy"]
    if name == "primary":
        return primary_metric(task_name)
    have = task_metrics(task_name, np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0]))
    if name not in have:
        raise TaskError(
            f"quality_metric {name!r}: task {task_name!r} has no such metric; its metric_fns "
            f"give {sorted(have)} (or use 'accuracy' / 'primary')"
        )

    def fn(targets: Any, predictions: Any) -> float:
        return task_metrics(task_name, targets, predictions)[name]

    fn.__name__ = name
    return name, fn


def confusion_matrix(
    targets: Sequence[int] | np.ndarray, predictions: Sequence[int] | np.ndarray, num_classes: int
) -> np.ndarray:
    """Counts ``[num_classes, num_classes]``: row = true label, column = predicted label.

    Raises:
        ValueError: mismatched lengths, or a label/prediction outside ``[0, num_classes)``.
    """
    t = np.asarray(targets, np.int64).reshape(-1)
    p = np.asarray(predictions, np.int64).reshape(-1)
    if t.shape != p.shape:
        raise ValueError(f"confusion_matrix: {t.size} targets but {p.size} predictions")
    for what, arr in (("targets", t), ("predictions", p)):
        bad = arr[(arr < 0) | (arr >= num_classes)]
        if bad.size:
            raise ValueError(
                f"confusion_matrix: {what} value {int(bad[0])} outside [0, {num_classes})"
            )
    out = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(out, (t, p), 1)
    return out


def per_class_accuracy(conf: np.ndarray) -> np.ndarray:
    """Recall per class from a confusion matrix (NaN for classes without examples)."""
    totals = conf.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.diag(conf) / totals


class ClassificationFeatureConverter(seqio.FeatureConverter):
    """Passes ``inputs``/``targets`` through unchanged, padding rank-1 ``inputs`` (text).

    Image ``inputs`` must share one size within a task (true for the bundled tasks; the
    Evaluator batches them as they are). Args as :class:`seqio.FeatureConverter`;
    ``pack`` must stay False.
    """

    TASK_FEATURES: Mapping[str, seqio.FeatureConverter.FeatureSpec] = {
        "inputs": seqio.FeatureConverter.FeatureSpec(dtype=tf.float32, rank=3),
        "targets": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32, rank=1),
    }
    MODEL_FEATURES: Mapping[str, seqio.FeatureConverter.FeatureSpec] = TASK_FEATURES
    PACKING_FEATURE_DTYPES: Mapping[str, tf.dtypes.DType] = {}

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("pack", False)
        super().__init__(**kwargs)

    def _convert_features(
        self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
    ) -> tf.data.Dataset:
        rank = self.TASK_FEATURES["inputs"].rank

        def convert(ex):
            out = {"inputs": ex["inputs"], "targets": ex["targets"]}
            if rank == 1:
                length = task_feature_lengths["inputs"]
                ids = out["inputs"][:length]
                out["inputs"] = tf.pad(ids, [[0, length - tf.shape(ids)[0]]])
            return out

        return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]):
        """Model lengths equal task lengths (no packing, no decoder shift)."""
        return dict(task_feature_lengths)


class TextClassificationFeatureConverter(ClassificationFeatureConverter):
    """:class:`ClassificationFeatureConverter` for token-id ``inputs`` (int32, rank 1)."""

    TASK_FEATURES: Mapping[str, seqio.FeatureConverter.FeatureSpec] = {
        "inputs": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32, rank=1),
        "targets": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32, rank=1),
    }
    MODEL_FEATURES: Mapping[str, seqio.FeatureConverter.FeatureSpec] = TASK_FEATURES
