"""Classification metrics and the seqio glue the Evaluator needs.

Tasks emit ``targets`` as int32 ``[1]`` with a ``seqio.PassThroughVocabulary``; the Evaluator
decodes them (and the model's predicted ``[label]`` token lists) with that vocabulary, then
:func:`label_postprocessor` turns each into a plain ``int`` and :func:`accuracy` compares them.
seqio's text feature converters do not fit image or label features, and its
``PassThroughFeatureConverter`` lacks the ``TASK_FEATURES``/``MODEL_FEATURES`` the Evaluator
reads, hence :class:`ClassificationFeatureConverter`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import seqio
import tensorflow as tf


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
