"""Task metadata next to seqio's registry: class names, modality, split sizes, provenance.

seqio's :class:`seqio.TaskRegistry` knows how to build a dataset; the trainer and evolution
also need facts seqio does not always record (how many classes, what they are called, whether
the labels are real, derived or synthetic). Two ways in:

* any task registered with ``seqio.TaskRegistry.add`` joins as it is: :func:`task_info` reads
  the facts from the task (class count from the ``targets`` vocabulary, split sizes from the
  source's ``num_input_examples``, class names and counts from a TFDS ``ClassLabel``, modality
  from the ``inputs`` feature), and :func:`describe_task` gives or overrides any of them in one
  call; a fact that cannot be found raises :class:`TaskError` naming it;
* :func:`register_classification_task` registers the seqio Task and its facts together.

mu2net's own task names are ``mu2net:<name>``; seqio only allows letters, digits and
``_ . : #`` in names, so TFDS-style names use dots (``mu2net:tfds.vtab1k.clevr.count_all``)
where TFDS uses slashes.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import seqio
import tensorflow as tf

from mu2net.errors import Mu2netError

PREFIX = "mu2net:"
MODALITIES = ("image", "text")
SPLITS = ("train", "validation", "test")
_NAME_RE = re.compile(r"^[\w\d.:_#]+$")


class TaskError(Mu2netError, ValueError):
    """Bad task input: unknown name, empty split, bad labels, shapes, dtypes or pixels."""


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """What the trainer needs to know about a task besides its examples.

    Attributes:
        name: The registered seqio task name (``mu2net:...``).
        num_classes: Number of classes; labels are ints in ``[0, num_classes)``.
        class_names: One human-readable name per class.
        modality: ``"image"`` or ``"text"``.
        split_sizes: Examples per split (``None`` where unknown without the data, e.g. TFDS).
        metadata: Free-form provenance: ``source``, ``synthetic`` (pixels transformed),
            ``derived`` (real inputs, new labels), ``suite``, split strings...
        metric_name: Name of the task's primary metric (the first scalar of its first seqio
            ``metric_fn``; ``"accuracy"`` by default), see :mod:`mu2net.tasks.metrics`.
    """

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    modality: str
    split_sizes: dict[str, int | None]
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    metric_name: str = "accuracy"

    @property
    def synthetic(self) -> bool:
        """True when the inputs were transformed (not real pixels/text)."""
        return bool(self.metadata.get("synthetic", False))

    @property
    def derived(self) -> bool:
        """True when real inputs carry labels we constructed (parity, pairs, halves...)."""
        return bool(self.metadata.get("derived", False))


_INFOS: dict[str, TaskInfo] = {}


def image_output_features(num_classes: int) -> dict[str, seqio.Feature]:
    """Seqio output features of an image classification task (stack.md, verified)."""
    return {
        "inputs": seqio.ContinuousFeature(dtype=tf.float32, rank=3),
        "targets": label_feature(num_classes),
    }


def label_feature(num_classes: int) -> seqio.Feature:
    """Labels as int32 ``[1]``: seqio's Evaluator indexes ``shape[0]``, so never scalars."""
    return seqio.Feature(
        seqio.PassThroughVocabulary(size=num_classes), add_eos=False, dtype=tf.int32, rank=1
    )


def normalize_name(name: str) -> str:
    """Adds the ``mu2net:`` prefix when missing (``digits`` -> ``mu2net:digits``).

    A name without a colon that seqio knows as it is (a plain seqio task such as ``my_task``)
    stays as it is, unless a ``mu2net:`` task of that name exists.
    """
    if ":" in name or PREFIX + name in _INFOS:
        return name if ":" in name else PREFIX + name
    return name if name in seqio.TaskRegistry.names() else PREFIX + name


def suggest(name: str, candidates: Sequence[str] | None = None) -> str:
    """A ``" Did you mean ...?"`` suffix with close registered names, or ``""``."""
    pool = list(candidates) if candidates is not None else list(_INFOS)
    close = difflib.get_close_matches(name, pool, n=3, cutoff=0.6)
    if not close:
        bare = [p.split(":", 1)[-1] for p in pool]
        close = [
            pool[bare.index(m)]
            for m in difflib.get_close_matches(name.split(":", 1)[-1], bare, n=3, cutoff=0.6)
        ]
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def task_info(name: str) -> TaskInfo:
    """Metadata of a registered task (accepts names without the ``mu2net:`` prefix).

    A plain seqio task (registered with ``seqio.TaskRegistry.add``) gets its facts read from
    the task on first use (see :func:`describe_task`); they are cached.

    Raises:
        TaskError: unknown task, with close registered names suggested; or a plain seqio task
        missing a fact mu2net needs (the message names it and how to give it).
    """
    full = normalize_name(name)
    if full not in _INFOS:
        if full not in seqio.TaskRegistry.names():
            pool = sorted(set(_INFOS) | set(seqio.TaskRegistry.names()))
            raise TaskError(
                f"Unknown task {name!r}: not registered (import mu2net.tasks, or the module that "
                f"registers it, e.g. `--module my_tasks`).{suggest(full, pool)}"
            )
        describe_task(full)
    return _INFOS[full]


def describe_task(
    name: str,
    *,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    modality: str | None = None,
    split_sizes: Mapping[str, int | None] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> TaskInfo:
    """Records (or overrides) the facts of a task registered with ``seqio.TaskRegistry.add``.

    Every argument left as None is read from the seqio task: ``num_classes`` from the
    ``targets`` vocabulary size (``seqio.PassThroughVocabulary(size=N)``) or a TFDS
    ``ClassLabel``; ``class_names`` from that ``ClassLabel`` (else ``"0".."N-1"``);
    ``modality`` from the ``inputs`` feature (float rank 3: image, int rank 1: text);
    ``split_sizes`` from the source's ``num_input_examples`` (None where unknown).

    Args:
        name: The seqio task name, as registered.
        num_classes: Number of classes (labels are ints in ``[0, num_classes)``).
        class_names: One name per class.
        modality: ``"image"`` or ``"text"``.
        split_sizes: Examples per split.
        metadata: Provenance to record.

    Returns:
        The recorded :class:`TaskInfo`.

    Raises:
        TaskError: the task is not registered with seqio, or a fact is missing or wrong (no
        ``targets`` feature, float targets, no class count anywhere, a missing split...).
    """
    from mu2net.tasks import inference  # local: inference reads seqio tasks, imports registry

    if name not in seqio.TaskRegistry.names():
        raise TaskError(f"Task {name!r}: not registered with seqio.TaskRegistry{suggest(name)}")
    facts = inference.infer_facts(
        seqio.get_mixture_or_task(name),
        num_classes=num_classes,
        class_names=class_names,
        modality=modality,
        split_sizes=split_sizes,
    )
    info = TaskInfo(name=name, metadata={"source": "seqio", **dict(metadata or {})}, **facts)
    _check_info(info)
    _INFOS[name] = info
    return info


def _check_info(info: TaskInfo) -> None:
    if info.modality not in MODALITIES:
        raise TaskError(f"Task {info.name!r}: modality={info.modality!r}, expected {MODALITIES}")
    if info.num_classes < 2:
        raise TaskError(f"Task {info.name!r}: num_classes={info.num_classes}, expected >= 2")
    if len(info.class_names) != info.num_classes:
        raise TaskError(
            f"Task {info.name!r}: {len(info.class_names)} class_names for "
            f"num_classes={info.num_classes}"
        )


def list_tasks(prefix: str = "") -> list[str]:
    """Sorted names of registered tasks that start with ``prefix``."""
    return sorted(n for n in _INFOS if n.startswith(prefix))


def is_registered(name: str) -> bool:
    """Whether ``name`` (prefix optional) is a task mu2net can use (ours or plain seqio)."""
    full = normalize_name(name)
    return full in _INFOS or full in seqio.TaskRegistry.names()


def register_classification_task(
    name: str,
    source: seqio.DataSource,
    preprocessors: Sequence[Any],
    *,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    modality: str = "image",
    split_sizes: Mapping[str, int | None] | None = None,
    output_features: Mapping[str, seqio.Feature] | None = None,
    metric_fns: Sequence[Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> seqio.Task:
    """Registers a seqio Task and its :class:`TaskInfo` together.

    Args:
        name: Full task name, ``mu2net:<name>``.
        source: The seqio data source (raw examples).
        preprocessors: seqio preprocessors; include ``seqio.CacheDatasetPlaceholder()``.
        num_classes: Number of classes.
        class_names: Names of the classes (default ``"0"..``).
        modality: ``"image"`` or ``"text"``.
        split_sizes: Examples per split, ``None`` where unknown.
        output_features: Defaults to :func:`image_output_features`.
        metric_fns: Defaults to top-1 accuracy.
        metadata: Provenance (``source``, ``synthetic``, ``derived``...).

    Returns:
        The registered seqio Task.

    Raises:
        TaskError: invalid name/modality/class names, or a duplicate registration.
    """
    from mu2net.tasks import metrics  # local: metrics imports this module

    if not name.startswith(PREFIX) or not _NAME_RE.match(name):
        raise TaskError(
            f"Task name {name!r}: must start with {PREFIX!r} and use only letters, digits, "
            "'_', '.', ':' or '#' (seqio's allowed characters)"
        )
    names = tuple(class_names) if class_names is not None else tuple(map(str, range(num_classes)))
    sizes = {s: None for s in SPLITS}
    sizes.update(split_sizes or {})
    info = TaskInfo(
        name=name,
        num_classes=int(num_classes),
        class_names=names,
        modality=modality,
        split_sizes=sizes,
        metadata=dict(metadata or {}),
    )
    _check_info(info)
    if name in _INFOS or name in seqio.TaskRegistry.names():
        raise TaskError(f"Task {name!r} is already registered (duplicate registration)")
    task = seqio.TaskRegistry.add(
        name,
        source=source,
        preprocessors=list(preprocessors),
        output_features=dict(output_features or image_output_features(num_classes)),
        postprocess_fn=metrics.label_postprocessor,
        metric_fns=list(metric_fns) if metric_fns is not None else [metrics.accuracy],
    )
    if metric_fns is not None:
        info = dataclasses.replace(info, metric_name=metrics.metric_name_of(task))
    _INFOS[name] = info
    return task


def unregister(name: str) -> None:
    """Removes a task from both registries (tests and interactive sessions)."""
    full = normalize_name(name)
    _INFOS.pop(full, None)
    seqio.TaskRegistry.remove(full)
