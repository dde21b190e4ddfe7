"""Raw examples -> model inputs, exactly as the evaluation pipeline makes them (numpy only).

The training/eval pipeline (``mu2net.tasks.preprocessing``) turns a decoded image into a base
image (float32 ``[H, W, 3]`` in ``[0, 1]``: ``pixels / 255``, grey replicated, alpha dropped),
resizes it with ``tf.image.resize(method="bilinear")`` (half-pixel centres, no antialiasing,
aspect ratio not kept), clips to ``[0, 1]`` and normalises with the family's mean/std. The
functions here reproduce each float32 operation of TensorFlow's kernel in the same order, so the
result is bit-identical without importing TensorFlow (a test compares them with the seqio
pipeline). Inference and serving use them through :meth:`mu2net.models.base.Family.prepare_inputs`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mu2net.errors import Mu2netError


class RawInputError(Mu2netError, ValueError):
    """A raw example that cannot become a model input (rank, channels, size)."""


MAX_IMAGE_SIDE = 8192  # a decoded image larger than this is refused (memory)


def to_unit_image(image: np.ndarray, scale: float = 255.0) -> np.ndarray:
    """A decoded ``[H, W]`` / ``[H, W, 1|3|4]`` image -> float32 ``[H, W, 3]`` in ``[0, 1]``."""
    x = np.asarray(image)
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3 or x.shape[-1] not in (1, 3, 4):
        raise RawInputError(
            f"image of shape {tuple(x.shape)}: expected [H, W] or [H, W, 1|3|4] pixels"
        )
    if min(x.shape[:2]) < 1 or max(x.shape[:2]) > MAX_IMAGE_SIDE:
        raise RawInputError(f"image of size {x.shape[:2]}: sides must be in [1, {MAX_IMAGE_SIDE}]")
    if x.dtype.kind not in "uif":
        raise RawInputError(f"image of dtype {x.dtype}: expected integer or float pixels")
    x = x.astype(np.float32) / np.float32(scale)
    if x.shape[-1] == 1:
        x = np.tile(x, (1, 1, 3))
    elif x.shape[-1] == 4:
        x = x[..., :3]
    return np.clip(x, np.float32(0.0), np.float32(1.0))


def _weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # TensorFlow's compute_interpolation_weights with the HalfPixelScaler, in float32.
    scale = np.float32(in_size) / np.float32(out_size)
    x = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    floor = np.floor(x)
    lower = np.maximum(floor, 0).astype(np.int64)
    upper = np.minimum(np.ceil(x), in_size - 1).astype(np.int64)
    return lower, upper, (x - floor).astype(np.float32)


def resize_bilinear(image: np.ndarray, size: int) -> np.ndarray:
    """``tf.image.resize(image, [size, size], "bilinear")`` of a float32 ``[H, W, C]`` image."""
    image = np.asarray(image, np.float32)
    h, w = image.shape[:2]
    y0, y1, yl = _weights(h, size)
    x0, x1, xl = _weights(w, size)
    xl = xl[None, :, None]
    top_left, top_right = image[y0][:, x0], image[y0][:, x1]
    bottom_left, bottom_right = image[y1][:, x0], image[y1][:, x1]
    top = top_left + (top_right - top_left) * xl
    bottom = bottom_left + (bottom_right - bottom_left) * xl
    return top + (bottom - top) * yl[:, None, None]


def images_to_inputs(
    images: Sequence[np.ndarray],
    size: int,
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
    scale: float = 255.0,
) -> np.ndarray:
    """A float32 ``[N, size, size, 3]`` batch from decoded images (the eval transform).

    Args:
        images: decoded images, pixels in ``[0, scale]``.
        size: the path's ``ds_image_size``.
        pixel_mean: the family's per-channel mean on ``[0, 1]`` pixels.
        pixel_std: the family's per-channel std.
        scale: the pixel value of white (255 for 8-bit images).

    Raises:
        RawInputError: an image of the wrong rank, channels or size; no image at all.
    """
    if len(images) == 0:
        raise RawInputError("no images given")
    mean = np.asarray(pixel_mean, np.float32)
    std = np.asarray(pixel_std, np.float32)
    out = []
    for image in images:
        x = resize_bilinear(to_unit_image(image, scale), int(size))
        x = np.clip(x, np.float32(0.0), np.float32(1.0))
        out.append((x - mean) / std)
    return np.stack(out).astype(np.float32)
