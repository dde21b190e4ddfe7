"""Shared preprocessing: cache-able base examples, then the dataset-hyperparameter ops.

Design (two stages, split at ``seqio.CacheDatasetPlaceholder()``):

1. **Base examples** (inside every seqio Task, before the placeholder, so seqio's Beam cache
   job can store them): images become float32 ``[H, W, 3]`` in ``[0, 1]`` at their native size
   (grayscale replicated to 3 channels); text becomes int32 MiniLM token ids (``[CLS] ... [SEP]``,
   untruncated); labels become int32 ``[1]``. Nothing here depends on a hyperparameter.
2. **ds-hparam ops** (:func:`preprocess_image`, :func:`preprocess_text`, applied by
   :mod:`mu2net.tasks.data` on the tf.data pipeline *after* the cache point): the reference's
   dataset hyperparameters (method.md §3.1, §6.4) that evolution mutates per generation:
   ``ds_image_size``, ``ds_crop``, ``ds_area_range_min``, ``ds_aspect_ratio_range_min``,
   ``ds_flip_left_right``, ``ds_{brightness,contrast,saturation,hue,quality}_delta`` and, for text,
   ``ds_max_length``. Keeping them out of the seqio Task means one cache serves every
   generation, and hparam changes never re-register tasks.

Train-time random ops use TF's *stateless* image ops with a per-example seed derived from
``(seed, example index)``, so a given seed reproduces every crop, flip and colour jitter bit
for bit. Eval is deterministic: resize only. Colour ops run on ``[0, 1]`` pixels (the reference
ran them on ``[-1, 1]``, method.md §9 quirk 7). Output pixels are ``(x01 - pixel_mean) /
pixel_std`` with the model family's mean/std, passed in by the caller.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow as tf

from mu2net.tasks.registry import TaskError

# Reference defaults (method.md §3.2, Ti3/B column) plus the text length.
DEFAULT_DS_HPARAMS: dict[str, Any] = {
    "ds_image_size": 32,
    "ds_crop": True,
    "ds_area_range_min": 0.05,
    "ds_aspect_ratio_range_min": 0.75,
    "ds_flip_left_right": True,
    "ds_brightness_delta": 0.0,
    "ds_contrast_delta": 0.0,
    "ds_saturation_delta": 0.0,
    "ds_hue_delta": 0.0,
    "ds_quality_delta": 0.0,
    "ds_max_length": 64,
}


def resolve_ds_hparams(ds_hparams: Mapping[str, Any] | None, task: str = "?") -> dict[str, Any]:
    """Defaults overlaid with the ``ds_*`` keys of ``ds_hparams`` (other keys are ignored).

    A path's full hparams dict can be passed as is. Unknown ``ds_*`` keys are refused so a
    typo cannot silently switch an augmentation off.

    Raises:
        TaskError: an unknown ``ds_*`` key or an out-of-range value, naming the key.
    """
    out = dict(DEFAULT_DS_HPARAMS)
    for key, value in (ds_hparams or {}).items():
        if not key.startswith("ds_"):
            continue
        if key not in DEFAULT_DS_HPARAMS:
            raise TaskError(
                f"Task {task!r}: unknown dataset hyperparameter {key!r}; known: "
                f"{sorted(DEFAULT_DS_HPARAMS)}"
            )
        out[key] = value
    checks = [
        ("ds_image_size", int(out["ds_image_size"]) >= 1),
        ("ds_max_length", int(out["ds_max_length"]) >= 2),
        ("ds_area_range_min", 0.0 < float(out["ds_area_range_min"]) <= 1.0),
        ("ds_aspect_ratio_range_min", 0.0 < float(out["ds_aspect_ratio_range_min"]) <= 1.0),
        ("ds_hue_delta", 0.0 <= float(out["ds_hue_delta"]) <= 0.5),
        ("ds_quality_delta", 0.0 <= float(out["ds_quality_delta"]) <= 1.0),
    ]
    checks += [
        (k, float(out[k]) >= 0.0)
        for k in ("ds_brightness_delta", "ds_contrast_delta", "ds_saturation_delta")
    ]
    for key, ok in checks:
        if not ok:
            raise TaskError(
                f"Task {task!r}: dataset hyperparameter {key}={out[key]!r} out of range"
            )
    return out


# ----------------------------------------------------------------------------- base examples


def to_base_image(image: tf.Tensor, scale: float = 255.0) -> tf.Tensor:
    """Any ``[H, W]``/``[H, W, 1|3|4]`` image -> float32 ``[H, W, 3]`` in ``[0, 1]``."""
    image = tf.convert_to_tensor(image)
    if image.shape.rank == 2:
        image = image[..., None]
    image = tf.cast(image, tf.float32) / scale
    channels = image.shape[-1]
    if channels == 1:
        image = tf.tile(image, [1, 1, 3])
    elif channels == 4:
        image = image[..., :3]  # RGBA (e.g. CLEVR): drop alpha
    elif channels is None:
        image = tf.cond(
            tf.shape(image)[-1] == 1, lambda: tf.tile(image, [1, 1, 3]), lambda: image[..., :3]
        )
    image = tf.ensure_shape(image, [None, None, 3])
    return tf.clip_by_value(image, 0.0, 1.0)


def to_base_label(label: tf.Tensor) -> tf.Tensor:
    """A scalar label -> int32 ``[1]``."""
    return tf.reshape(tf.cast(label, tf.int32), [1])


def base_image_example(scale: float = 255.0):
    """A seqio preprocessor: ``{"image", "label"}`` -> base ``{"inputs", "targets"}``."""

    def fn(ds: tf.data.Dataset) -> tf.data.Dataset:
        return ds.map(
            lambda ex: {
                "inputs": to_base_image(ex["image"], scale),
                "targets": to_base_label(ex["label"]),
            },
            num_parallel_calls=tf.data.AUTOTUNE,
        )

    fn.__name__ = "base_image_example"
    return fn


# ----------------------------------------------------------------------------- ds-hparam ops


def _seeds(seed: tf.Tensor, n: int) -> tf.Tensor:
    return tf.random.experimental.stateless_split(seed, num=n)


def _augment(image: tf.Tensor, hp: Mapping[str, Any], seed: tf.Tensor) -> tf.Tensor:
    s = _seeds(seed, 7)
    area_min = float(hp["ds_area_range_min"])
    if hp["ds_crop"] and area_min < 1.0:
        ar = float(hp["ds_aspect_ratio_range_min"])
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.shape(image),
            bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
            seed=s[0],
            min_object_covered=0.0,
            aspect_ratio_range=(ar, 1.0 / ar),
            area_range=(area_min, 1.0),
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        image = tf.slice(image, begin, size)
    if hp["ds_flip_left_right"]:
        image = tf.image.stateless_random_flip_left_right(image, seed=s[1])
    if float(hp["ds_brightness_delta"]) > 0:
        image = tf.image.stateless_random_brightness(image, hp["ds_brightness_delta"], s[2])
    if float(hp["ds_contrast_delta"]) > 0:
        d = float(hp["ds_contrast_delta"])
        image = tf.image.stateless_random_contrast(image, 1.0 - d, 1.0 + d, s[3])
    if float(hp["ds_saturation_delta"]) > 0:
        d = float(hp["ds_saturation_delta"])
        image = tf.image.stateless_random_saturation(image, max(0.0, 1.0 - d), 1.0 + d, s[4])
    if float(hp["ds_hue_delta"]) > 0:
        image = tf.image.stateless_random_hue(image, hp["ds_hue_delta"], s[5])
    if float(hp["ds_quality_delta"]) > 0:
        lo = int(round(100 * (1.0 - float(hp["ds_quality_delta"]))))
        image = tf.clip_by_value(image, 0.0, 1.0)
        image = tf.image.stateless_random_jpeg_quality(image, max(lo, 0), 100, s[6])
    return image


def preprocess_image(
    image: tf.Tensor,
    hp: Mapping[str, Any],
    *,
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
    train: bool,
    seed: tf.Tensor | None = None,
) -> tf.Tensor:
    """Base image (float32 ``[H, W, 3]`` in [0, 1]) -> normalised ``[S, S, 3]``.

    Args:
        image: A base image.
        hp: Resolved ds hparams (:func:`resolve_ds_hparams`).
        pixel_mean: Per-channel mean of the model family (on ``[0, 1]`` pixels).
        pixel_std: Per-channel std of the model family.
        train: Apply the random train-time ops (crop, flip, colour, JPEG quality).
        seed: int64 ``[2]`` stateless seed (required when ``train``).

    Returns:
        float32 ``[ds_image_size, ds_image_size, 3]``.
    """
    if train:
        if seed is None:
            raise ValueError("preprocess_image(train=True) needs a stateless seed")
        image = _augment(image, hp, seed)
    size = int(hp["ds_image_size"])
    # Aspect ratio is not preserved (reference §6.4: plain resize, no centre crop).
    image = tf.image.resize(image, [size, size], method="bilinear")
    image = tf.clip_by_value(image, 0.0, 1.0)
    mean = tf.constant(list(pixel_mean), tf.float32)
    std = tf.constant(list(pixel_std), tf.float32)
    return tf.ensure_shape((image - mean) / std, [size, size, 3])


def preprocess_text(ids: tf.Tensor, hp: Mapping[str, Any]) -> tf.Tensor:
    """Base ids ``[CLS] ... [SEP]`` -> int32 ``[ds_max_length]``, 0-padded.

    Long sequences keep their final ``[SEP]`` (truncate the middle-to-end, as BERT
    tokenizers do), so the model always sees a well-formed sequence.
    """
    length = int(hp["ds_max_length"])
    ids = tf.cast(ids, tf.int32)
    n = tf.shape(ids)[0]
    ids = tf.cond(n > length, lambda: tf.concat([ids[: length - 1], ids[-1:]], 0), lambda: ids)
    ids = tf.pad(ids, [[0, length - tf.shape(ids)[0]]])
    return tf.ensure_shape(ids, [length])


def example_seed(seed: int, index: tf.Tensor) -> tf.Tensor:
    """The stateless seed of example ``index`` in a stream seeded with ``seed``."""
    return tf.stack([tf.constant(seed, tf.int64), tf.cast(index, tf.int64)])
