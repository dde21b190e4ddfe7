"""The data API the trainer uses: preprocessed tf.data / numpy streams of a registered task.

Every function takes the dataset hyperparameters (``ds_*``, method.md §3.1; see
:mod:`mu2net.tasks.preprocessing`) and the model family's ``pixel_mean``/``pixel_std``.
The seqio Task provides base examples (optionally from seqio's cache, ``use_cached=True``);
the ds-hparam ops run here, after the cache point:

    seqio task (source -> base example -> CacheDatasetPlaceholder)
      -> [train: seeded shuffle] -> [repeat] -> enumerate -> ds-hparam ops -> checks

Train streams are deterministic given ``seed`` (shuffle order and every random crop/flip/
colour op, across epochs). Eval streams are deterministic, in the split's fixed order.
Bad data fails with :class:`~mu2net.tasks.registry.TaskError` naming task, split and field.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import seqio
import tensorflow as tf

from mu2net.tasks import preprocessing
from mu2net.tasks.registry import SPLITS, TaskError, TaskInfo, task_info

_SHUFFLE_BUFFER = 10_000


def _check_split(info: TaskInfo, split: str) -> None:
    if split not in SPLITS:
        raise TaskError(f"Task {info.name!r}: unknown split {split!r}; expected one of {SPLITS}")


def _check_spec(info: TaskInfo, split: str, spec: Mapping[str, tf.TensorSpec]) -> None:
    for key in ("inputs", "targets"):
        if key not in spec:
            raise TaskError(f"Task {info.name!r} split {split!r}: feature {key!r} missing")
    want_dtype, want_rank = (tf.float32, 3) if info.modality == "image" else (tf.int32, 1)
    got = spec["inputs"]
    if got.dtype != want_dtype or got.shape.rank != want_rank:
        raise TaskError(
            f"Task {info.name!r} split {split!r}: feature 'inputs' is {got.dtype.name} rank "
            f"{got.shape.rank}, expected {want_dtype.name} rank {want_rank}"
        )
    if info.modality == "image" and got.shape[-1] not in (None, 3):
        raise TaskError(
            f"Task {info.name!r} split {split!r}: feature 'inputs' has {got.shape[-1]} channels, "
            "expected 3"
        )
    t = spec["targets"]
    if t.dtype != tf.int32 or t.shape.rank != 1:
        raise TaskError(
            f"Task {info.name!r} split {split!r}: feature 'targets' is {t.dtype.name} rank "
            f"{t.shape.rank}, expected int32 shape [1]"
        )


def base_dataset(name: str, split: str, *, use_cached: bool = False) -> tf.data.Dataset:
    """Base examples of a task (before any ds-hparam op), in the split's fixed order."""
    info = task_info(name)
    _check_split(info, split)
    task = seqio.get_mixture_or_task(info.name)
    try:
        # try_in_mem_cache=False: seqio would ask TFDS for split sizes (unknown for sliced or
        # mocked splits), and the bundled sources are in memory already.
        ds = task.get_dataset(
            sequence_length=None, split=split, use_cached=use_cached, shuffle=False,
            num_epochs=1, try_in_mem_cache=False,
        )  # fmt: skip
    except ValueError as e:
        if "missing expected output feature" in str(e) and "targets" in str(e):
            raise TaskError(
                f"Task {info.name!r} split {split!r} is unlabelled: its examples have no "
                "'targets' (class labels); every split needs them"
            ) from e
        raise TaskError(f"Task {info.name!r} split {split!r}: {e}") from e
    _check_spec(info, split, ds.element_spec)
    return ds.map(lambda ex: {"inputs": ex["inputs"], "targets": ex["targets"]})


def _checked(info: TaskInfo, split: str, ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    # Per-example guards: cheap next to the image ops, and they name the culprit.
    label = ex["targets"]
    ops = [
        tf.debugging.assert_equal(
            tf.shape(label), [1],
            message=f"task {info.name!r} split {split!r}: field 'targets' must have shape [1]",
        ),
        tf.debugging.assert_less(
            label, info.num_classes,
            message=f"task {info.name!r} split {split!r}: field 'targets' label >= "
            f"num_classes={info.num_classes}",
        ),
        tf.debugging.assert_non_negative(
            label, message=f"task {info.name!r} split {split!r}: field 'targets' label < 0"
        ),
    ]  # fmt: skip
    if info.modality == "image":
        ops.append(
            tf.debugging.assert_equal(
                tf.reduce_all(tf.math.is_finite(ex["inputs"])),
                True,
                message=f"task {info.name!r} split {split!r}: field 'inputs' has NaN/inf pixels",
            )  # fmt: skip
        )
    with tf.control_dependencies(ops):
        return {"inputs": tf.identity(ex["inputs"]), "targets": tf.identity(label)}


def _pipeline(
    name: str,
    split: str,
    *,
    ds_hparams: Mapping[str, Any] | None,
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
    train: bool,
    seed: int | None,
    use_cached: bool,
    repeat: bool,
) -> tf.data.Dataset:
    info = task_info(name)
    hp = preprocessing.resolve_ds_hparams(ds_hparams, info.name)
    if info.modality == "image" and (len(pixel_mean) != 3 or len(pixel_std) != 3):
        raise TaskError(f"Task {info.name!r}: pixel_mean/pixel_std need 3 values each")
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    ds = base_dataset(info.name, split, use_cached=use_cached)
    ds = ds.map(lambda ex: _checked(info, split, ex), num_parallel_calls=tf.data.AUTOTUNE)
    if train:
        # Shuffle before caching would defeat the cache; here it is cheap (small examples).
        ds = ds.shuffle(_SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()

    def prep(index, ex):
        if info.modality == "text":
            return {"inputs": preprocessing.preprocess_text(ex["inputs"], hp),
                    "targets": ex["targets"]}  # fmt: skip
        image = preprocessing.preprocess_image(
            ex["inputs"], hp, pixel_mean=pixel_mean, pixel_std=pixel_std, train=train,
            seed=preprocessing.example_seed(seed, index) if train else None,
        )  # fmt: skip
        return {"inputs": image, "targets": ex["targets"]}

    # Deterministic map: output order (and so per-example seeds) never depends on threads.
    return ds.enumerate().map(prep, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def get_dataset(
    name: str,
    split: str,
    *,
    ds_hparams: Mapping[str, Any] | None,
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
    train: bool,
    seed: int | None = None,
    use_cached: bool = False,
) -> tf.data.Dataset:
    """One pass over a split, preprocessed: ``{"inputs", "targets" int32 [1]}``, unbatched.

    Args:
        name: Registered task name (``mu2net:`` prefix optional).
        split: ``"train"``, ``"validation"`` or ``"test"``.
        ds_hparams: ``ds_*`` hyperparameters (others ignored; defaults fill the gaps).
        pixel_mean: The model family's per-channel mean on ``[0, 1]`` pixels.
        pixel_std: The model family's per-channel std.
        train: Shuffle and apply the random train-time ops.
        seed: Makes shuffle and augmentation reproducible (random when None).
        use_cached: Read base examples from seqio's cache (see :mod:`mu2net.tasks.cache`).

    Returns:
        A tf.data.Dataset; image ``inputs`` are float32 ``[S, S, 3]``, text ``inputs`` int32
        ``[ds_max_length]``.

    Raises:
        TaskError: unknown task/split/hparam, wrong feature dtype/rank. Bad labels or pixels
        raise ``tf.errors.InvalidArgumentError`` naming the task while iterating (the numpy
        helpers convert it to TaskError).
    """
    return _pipeline(
        name, split, ds_hparams=ds_hparams, pixel_mean=pixel_mean, pixel_std=pixel_std,
        train=train, seed=seed, use_cached=use_cached, repeat=False,
    )  # fmt: skip


def _assertion_text(message: str) -> str:
    # TF wraps our assertion text in iterator noise; keep just the text we wrote.
    m = re.search(r"assertion failed: \[(.*?)\]", message)
    return m.group(1).replace("\\'", "'") if m else message.splitlines()[0]


def _iterate(name: str, ds: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
    it = ds.as_numpy_iterator()
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except tf.errors.InvalidArgumentError as e:
            raise TaskError(f"Task {name!r}: {_assertion_text(e.message)}") from e
        yield batch


def numpy_batches(
    name: str,
    split: str,
    *,
    batch_size: int,
    ds_hparams: Mapping[str, Any] | None,
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
    train: bool,
    seed: int | None = None,
    repeat: bool = False,
    drop_remainder: bool = False,
    use_cached: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches as numpy: ``inputs`` ``[B, ...]``, ``targets`` int32 ``[B]``.

    With ``repeat=True`` the stream is endless, reshuffled (deterministically from ``seed``)
    every epoch, with fresh (also seeded) augmentations.

    Raises:
        TaskError: as :func:`get_dataset`, plus bad labels/pixels met while iterating.
    """
    if batch_size < 1:
        raise TaskError(f"Task {name!r}: batch_size={batch_size}, expected >= 1")
    ds = _pipeline(
        name, split, ds_hparams=ds_hparams, pixel_mean=pixel_mean, pixel_std=pixel_std,
        train=train, seed=seed, use_cached=use_cached, repeat=repeat,
    )  # fmt: skip
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    ds = ds.map(lambda b: {"inputs": b["inputs"], "targets": tf.reshape(b["targets"], [-1])})
    ds = ds.prefetch(2)
    yielded = False
    for batch in _iterate(task_info(name).name, ds):
        yielded = True
        yield batch
    if not yielded:
        raise TaskError(
            f"Task {task_info(name).name!r} split {split!r}: no batches (empty split, or fewer "
            f"than batch_size={batch_size} examples with drop_remainder=True)"
        )


def load_split(
    name: str,
    split: str,
    *,
    ds_hparams: Mapping[str, Any] | None,
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
    max_examples: int | None = None,
    use_cached: bool = False,
) -> dict[str, np.ndarray]:
    """A whole eval split in memory, deterministic order: ``inputs [N, ...]``, ``targets [N]``.

    Raises:
        TaskError: as :func:`numpy_batches`, or an empty split.
    """
    ds = _pipeline(
        name, split, ds_hparams=ds_hparams, pixel_mean=pixel_mean, pixel_std=pixel_std,
        train=False, seed=0, use_cached=use_cached, repeat=False,
    )  # fmt: skip
    if max_examples is not None:
        ds = ds.take(max_examples)
    full = task_info(name).name
    parts = list(_iterate(full, ds.batch(1024)))
    if not parts:
        raise TaskError(f"Task {full!r} split {split!r}: empty split")
    return {
        "inputs": np.concatenate([p["inputs"] for p in parts]),
        "targets": np.concatenate([p["targets"].reshape(-1) for p in parts]).astype(np.int32),
    }


def validate_task(name: str, *, max_examples: int = 256, use_cached: bool = False) -> TaskInfo:
    """Checks a task before it joins a system (on a sample of each split).

    Checks: registered, every split non-empty, features of the declared dtype/rank, labels in
    ``[0, num_classes)``, finite pixels in ``[0, 1]``. Only the first ``max_examples`` base
    examples of each split are inspected.

    Returns:
        The task's :class:`TaskInfo`.

    Raises:
        TaskError: naming the task, split and offending field.
    """
    info = task_info(name)
    for split in SPLITS:
        ds = base_dataset(info.name, split, use_cached=use_cached).take(max_examples)
        count = 0
        for ex in _iterate(info.name, ds):
            count += 1
            where = f"Task {info.name!r} split {split!r} example {count - 1}"
            x, y = ex["inputs"], np.asarray(ex["targets"])
            if y.shape != (1,):
                raise TaskError(f"{where}: field 'targets' has shape {y.shape}, expected (1,)")
            if not 0 <= int(y[0]) < info.num_classes:
                raise TaskError(
                    f"{where}: field 'targets' label {int(y[0])} outside [0, {info.num_classes})"
                )
            if info.modality == "image":
                if not np.all(np.isfinite(x)):
                    raise TaskError(f"{where}: field 'inputs' has NaN/inf pixels")
                if x.size and (x.min() < 0.0 or x.max() > 1.0):
                    raise TaskError(
                        f"{where}: field 'inputs' pixels outside [0, 1] "
                        f"(min {x.min():.3g}, max {x.max():.3g})"
                    )
                if x.ndim != 3 or x.shape[-1] != 3 or 0 in x.shape:
                    raise TaskError(
                        f"{where}: field 'inputs' has shape {x.shape}, expected [H, W, 3]"
                    )
            elif x.ndim != 1 or x.size == 0:
                raise TaskError(f"{where}: field 'inputs' has shape {x.shape}, expected [T>0]")
        if count == 0:
            raise TaskError(f"Task {info.name!r} split {split!r}: empty split")
    return info
