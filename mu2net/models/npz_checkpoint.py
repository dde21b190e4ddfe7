"""Reading vit_jax (AugReg) and big_vision ViT ``.npz`` checkpoints into ViT components.

Both projects save a flat ``np.savez`` archive whose keys are the flax tree paths joined by
``/``; this module maps those keys onto the components of :mod:`mu2net.models.vit`:

- **vit_jax / AugReg** (``gs://vit_models/augreg/*.npz``): ``embedding/kernel``, ``cls``,
  ``Transformer/posembed_input/pos_embedding`` (class-token row included),
  ``Transformer/encoderblock_i/{LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2,
  MlpBlock_3}/...`` -- pre-linen sub-module numbering, which vit_jax renames on load with
  ``flax.training.checkpoints.convert_pre_linen`` to the linen names used in memory
  (``..._0, ..._0, LayerNorm_1, MlpBlock_0``); files already in linen numbering load too.
  Older files prefix every key with ``opt/target/``.
- **big_vision** (``params/`` or ``params/img/`` prefix): linen numbering, and the position
  embedding ``pos_embedding`` has no class-token row (big_vision adds it before concatenating the
  class token), so a zero row is prepended -- the same function. Scanned encoders
  (``Transformer/encoderblock/...`` with a leading layer axis) are sliced per block.

The position-embedding grid is resized to the target image size as vit_jax does
(:func:`interpolate_posembed`). Heads and ``pre_logits`` are never read (every task gets its
own zero head, reference §1.1). Arrays are read with ``allow_pickle=False``: a checkpoint can
never execute code.
"""

from __future__ import annotations

import math
import re
import zipfile
from collections.abc import Mapping
from typing import Any

import flax
import jax.numpy as jnp
import numpy as np

from mu2net.models.base import FamilyError, Params

_PREFIXES = ("", "opt/target/", "params/", "params/img/", "img/")
# linen name (in memory) -> pre-linen name (vit_jax .npz files), inside an encoder block.
_PRE_LINEN = {
    "LayerNorm_0": "LayerNorm_0",
    "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
    "LayerNorm_1": "LayerNorm_2",
    "MlpBlock_0": "MlpBlock_3",
}
_BLOCK_RE = re.compile(r"^encoderblock_(\d+)$")


def read_npz(path: str) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` file (local path or any fsspec URL), without unpickling.

    Raises:
        FamilyError: naming ``path`` when it is missing or not a plain-array ``.npz``.
    """
    try:
        if "://" in path:
            import fsspec  # local import: only remote checkpoints need it

            with fsspec.open(path, "rb") as f:
                return _read_arrays(f)
        with open(path, "rb") as f:
            return _read_arrays(f)
    except FileNotFoundError as e:
        raise FamilyError(f"{path}: checkpoint file not found") from e
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise FamilyError(f"{path}: not a readable .npz of plain arrays ({e})") from e


def _read_arrays(f: Any) -> dict[str, np.ndarray]:
    with np.load(f, allow_pickle=False) as data:
        if not hasattr(data, "files"):
            raise ValueError("a single .npy array, expected an .npz archive")
        return {k: np.asarray(data[k]) for k in data.files}


class _Layout:
    """Where each ViT parameter lives in one checkpoint's key space."""

    def __init__(self, flat: Mapping[str, np.ndarray], path: str):
        self.flat, self.path = flat, path
        found = [p for p in _PREFIXES if f"{p}embedding/kernel" in flat]
        if not found:
            keys = sorted(flat)[:8]
            raise FamilyError(
                f"{path}: no 'embedding/kernel' key under any of the prefixes {list(_PREFIXES)}; "
                f"not a ViT checkpoint (first keys: {keys})"
            )
        self.prefix = found[0]
        p = self.prefix
        self.big_vision = (
            f"{p}pos_embedding" in flat
            and f"{p}Transformer/posembed_input/pos_embedding" not in flat
        )
        self.scan = any(k.startswith(f"{p}Transformer/encoderblock/") for k in flat)
        self.pre_linen = any("/MlpBlock_3/" in k for k in flat)

    def key(self, component: str, leaf: str) -> tuple[str, int | None]:
        """The file key of ``component/leaf`` and, for scanned encoders, the layer index."""
        if component in ("embedding", "cls"):
            return self.prefix + "/".join(x for x in (component, leaf) if x), None
        if component == "posembed_input" and self.big_vision:
            return f"{self.prefix}pos_embedding", None
        match = _BLOCK_RE.match(component)
        if match:
            first, _, rest = leaf.partition("/")
            if self.pre_linen:
                first = _PRE_LINEN.get(first, first)
            leaf = f"{first}/{rest}" if rest else first
            if self.scan:
                return f"{self.prefix}Transformer/encoderblock/{leaf}", int(match.group(1))
        return f"{self.prefix}Transformer/{component}/{leaf}", None

    def read(self, component: str, leaf: str) -> tuple[str, np.ndarray]:
        key, layer = self.key(component, leaf)
        if key not in self.flat:
            raise FamilyError(
                f"{self.path}: checkpoint has no key {key!r} (needed for {component})"
            )
        value = self.flat[key]
        if layer is not None:
            if value.ndim == 0 or value.shape[0] <= layer:
                raise FamilyError(
                    f"{self.path}: key {key!r} of shape {value.shape} has no layer {layer} "
                    f"(needed for {component})"
                )
            value = value[layer]
        if component == "posembed_input" and self.big_vision and value.ndim == 3:
            value = np.concatenate([np.zeros_like(value[:, :1]), value], axis=1)
        return key, value


def load_vit_components(
    path: str,
    wanted: Mapping[str, Params],
) -> dict[str, Params]:
    """Reads the components named in ``wanted`` from a ViT ``.npz``.

    Args:
        path: checkpoint file (local or fsspec URL).
        wanted: component name -> tree of arrays or ``jax.ShapeDtypeStruct`` of the target
            architecture; gives the names, leaves, shapes and dtypes to read.

    Returns:
        Component name -> params tree with the same structure as ``wanted``.

    Raises:
        FamilyError: naming the file key that is missing or has the wrong shape.
    """
    layout = _Layout(read_npz(path), path)
    out: dict[str, Params] = {}
    for component, tree in wanted.items():
        is_leaf = not isinstance(tree, Mapping)
        leaves = {"": tree} if is_leaf else flax.traverse_util.flatten_dict(tree, sep="/")
        loaded = {}
        for leaf, expected in leaves.items():
            key, value = layout.read(component, leaf)
            want = tuple(expected.shape)
            if component == "posembed_input":
                if value.ndim != 3 or value.shape[0] != 1 or value.shape[2] != want[2]:
                    raise _shape_error(path, key, value.shape, want, component)
                try:
                    value = interpolate_posembed(value, want[1])
                except FamilyError as e:
                    raise FamilyError(f"{path}: key {key!r}: {e}") from e
            if tuple(value.shape) != want:
                raise _shape_error(path, key, value.shape, want, component)
            loaded[leaf] = jnp.asarray(value, dtype=expected.dtype)
        out[component] = (
            loaded[""] if is_leaf else flax.traverse_util.unflatten_dict(loaded, sep="/")
        )
    return out


def _shape_error(
    path: str, key: str, got: tuple[int, ...], want: tuple[int, ...], component: str
) -> FamilyError:
    return FamilyError(
        f"{path}: key {key!r} has shape {tuple(got)} but the configured ViT expects {want} "
        f"for {component} (check vit_size / vit_* overrides)"
    )


def interpolate_posembed(posemb: np.ndarray, num_tokens: int) -> np.ndarray:
    """Resizes a ``(1, 1 + g**2, d)`` position embedding to ``num_tokens`` tokens.

    Same maths as vit_jax's ``load_pretrained`` (``scipy.ndimage.zoom(order=1)``): the class-token
    row is kept, the ``g x g`` grid is resized linearly with aligned corners, without scipy.

    Raises:
        FamilyError: if either token count is not ``1 + square``.
    """
    posemb = np.asarray(posemb)
    if posemb.shape[1] == num_tokens:
        return posemb
    tok, grid = posemb[:, :1], posemb[0, 1:]
    gs_old, gs_new = math.isqrt(len(grid)), math.isqrt(num_tokens - 1)
    if gs_old**2 != len(grid) or gs_new**2 != num_tokens - 1:
        raise FamilyError(
            f"posembed_input: cannot resize {posemb.shape[1]} tokens to {num_tokens} "
            "(token counts must be 1 + a square grid)"
        )
    grid = grid.reshape(gs_old, gs_old, -1).astype(np.float64)
    lo, hi, frac = _linear_taps(gs_old, gs_new)
    grid = grid[lo] * (1 - frac)[:, None, None] + grid[hi] * frac[:, None, None]
    grid = grid[:, lo] * (1 - frac)[None, :, None] + grid[:, hi] * frac[None, :, None]
    grid = grid.reshape(1, gs_new * gs_new, -1).astype(posemb.dtype)
    return np.concatenate([tok, grid], axis=1)


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Aligned corners: output i samples input coordinate i * (n_in - 1) / (n_out - 1).
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    coords = np.arange(n_out, dtype=np.float64) * scale
    lo = np.minimum(np.floor(coords).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, coords - lo
