"""Reads the facts mu2net needs from a plain seqio Task (one registered with seqio alone).

:func:`infer_facts` looks where seqio keeps each fact: the ``targets`` feature's vocabulary
(``seqio.PassThroughVocabulary(size=N)`` gives the class count), a TFDS source's ``ClassLabel``
(count and names), the ``inputs`` feature (modality) and the source's ``num_input_examples``
(split sizes). What it cannot find raises :class:`~mu2net.tasks.registry.TaskError` naming the
fact and the one call that gives it (:func:`mu2net.tasks.describe_task`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import seqio
import tensorflow as tf

from mu2net.tasks.registry import SPLITS, TaskError

_HOW = "give it with mu2net.tasks.describe_task({name!r}, {arg}=...) after registering the task"


def _feature(task: seqio.Task, key: str, what: str) -> seqio.Feature:
    feature = task.output_features.get(key)
    if feature is None:
        raise TaskError(
            f"Task {task.name!r}: no {key!r} output feature ({what}); mu2net needs "
            "output_features={'inputs': ..., 'targets': ...}"
        )
    return feature


def _modality(task: seqio.Task, given: str | None) -> str:
    inputs = _feature(task, "inputs", "the examples")
    dtype, rank = tf.as_dtype(inputs.dtype), inputs.rank
    if dtype.is_floating and rank == 3:
        found = "image"
    elif dtype.is_integer and rank == 1:
        found = "text"
    else:
        raise TaskError(
            f"Task {task.name!r}: feature 'inputs' is {dtype.name} rank {rank}; mu2net needs "
            "float32 rank 3 images [H, W, 3] or int32 rank 1 token ids"
        )
    if given is not None and given != found:
        raise TaskError(f"Task {task.name!r}: modality={given!r} but 'inputs' look like {found}")
    return found


def _tfds_label(task: seqio.Task) -> Any:
    """The TFDS ``ClassLabel`` of a TfdsDataSource task, or None (never raises)."""
    source = task.source
    if not isinstance(source, seqio.TfdsDataSource):
        return None
    try:
        features = source.tfds_dataset.info.features
        for key in ("label", "labels", "targets"):
            if key in features and hasattr(features[key], "num_classes"):
                return features[key]
    except Exception:  # noqa: BLE001 - data not prepared, or no such feature: not a fact
        return None
    return None


def _num_classes(task: seqio.Task, given: int | None, label: Any) -> int:
    targets = _feature(task, "targets", "the class labels: an unlabelled task cannot be trained")
    dtype = tf.as_dtype(targets.dtype)
    if not dtype.is_integer:
        raise TaskError(
            f"Task {task.name!r}: feature 'targets' is {dtype.name}; mu2net needs integer class "
            "labels (int32, shape [1])"
        )
    if given is not None:
        return int(given)
    vocab = targets.vocabulary
    if isinstance(vocab, seqio.PassThroughVocabulary) and vocab.vocab_size >= 2:
        return int(vocab.vocab_size)
    if label is not None:
        return int(label.num_classes)
    raise TaskError(
        f"Task {task.name!r}: the number of classes (num_classes) is unknown: the 'targets' "
        f"vocabulary is {type(vocab).__name__}, not seqio.PassThroughVocabulary(size=N), and "
        f"the source has no TFDS ClassLabel; {_HOW.format(name=task.name, arg='num_classes')}"
    )


def _split_sizes(task: seqio.Task, given: Mapping[str, int | None] | None) -> dict:
    splits = list(task.source.splits or ())
    missing = [s for s in SPLITS if s not in splits]
    if missing:
        raise TaskError(
            f"Task {task.name!r}: split(s) {missing} missing (the source has {splits}); mu2net "
            f"trains on 'train', selects on 'validation' and reports on 'test'"
        )
    sizes: dict[str, int | None] = {}
    for split in SPLITS:
        try:
            n = task.source.num_input_examples(split)
        except Exception:  # noqa: BLE001 - unknown without the data: a fact we can live without
            n = None
        sizes[split] = int(n) if n is not None else None
    sizes.update(given or {})
    return sizes


def infer_facts(
    task: seqio.Task,
    *,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    modality: str | None = None,
    split_sizes: Mapping[str, int | None] | None = None,
) -> dict[str, Any]:
    """The :class:`~mu2net.tasks.registry.TaskInfo` fields of ``task`` (name and metadata aside).

    Args:
        task: A registered seqio Task.
        num_classes: Given class count (else read from the task).
        class_names: Given class names (else the TFDS ClassLabel's, else ``"0".."N-1"``).
        modality: Given modality (checked against the ``inputs`` feature).
        split_sizes: Given split sizes (override the source's ``num_input_examples``).

    Returns:
        ``num_classes``, ``class_names``, ``modality``, ``split_sizes``, ``metric_name``.

    Raises:
        TaskError: a missing or wrong fact, named.
    """
    from mu2net.tasks import metrics  # local: metrics imports the registry's TaskError

    label = _tfds_label(task) if num_classes is None or class_names is None else None
    found_modality = _modality(task, modality)
    n = _num_classes(task, num_classes, label)
    if class_names is None:
        names = getattr(label, "names", None) if label is not None else None
        class_names = names if names and len(names) == n else [str(i) for i in range(n)]
    return {
        "num_classes": n,
        "class_names": tuple(str(c) for c in class_names),
        "modality": found_modality,
        "split_sizes": _split_sizes(task, split_sizes),
        "metric_name": metrics.metric_name_of(task),
    }
