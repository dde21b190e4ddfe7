"""Vision Transformer (ViT) as a model family, in vit_jax / big_vision naming and maths.

The network is vit_jax's ``VisionTransformer`` with ``classifier="token"`` and no representation
layer (reference §1.1): a patch-embedding conv (kernel = stride = patch, ``embedding``), a learnt
class token (``cls``), learnt position embeddings (``posembed_input``, shape ``(1, 1 + grid**2,
hidden)``), pre-LN encoder blocks (``encoderblock_i``: LayerNorm -> MHA -> residual; LayerNorm ->
MLP(GELU) -> residual), a final norm (``encoder_norm``) and a zero-initialised ``head`` on the class
token. Sub-module names inside a block are flax linen's (``LayerNorm_0``,
``MultiHeadDotProductAttention_0``, ``LayerNorm_1``, ``MlpBlock_0``) as in vit_jax after
``convert_pre_linen`` and in big_vision; the pre-linen names of AugReg ``.npz`` files are mapped at
import (:mod:`mu2net.models.npz_checkpoint`).

Components are the top-level keys of the flax tree after hoisting the ``Transformer`` children
(reference §1.1); ``residual_adapter_i`` (§2.3) sits before ``encoderblock_i``; a zero-initialised
output kernel makes inserting one function-preserving.

Two options exist for the function-preserving expansions (§7.4, :mod:`mu2net.models.expansions`):
``vit_norm="rmsnorm"`` (RMSNorm, scale only, in every norm; needed for exact hidden-dimension
expansion), and per-head key/query and value dims ``vit_qk_dim`` / ``vit_v_dim`` that may differ
(default ``hidden // heads``), which is why attention is a small custom module whose parameters
keep flax's ``query/key/value/out`` names and shapes.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import zlib
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mu2net.models import npz_checkpoint
from mu2net.models.base import (
    Family,
    FamilyError,
    Params,
    ParamsByComponent,
    parse_adapter_layers,
    register_family,
    shape_signature,
)
from mu2net.models.npz_checkpoint import interpolate_posembed

# name -> (hidden, mlp_dim, heads, patch, layers); vit_jax configs/models.py, plus a tiny test size.
VIT_SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "test": (32, 64, 2, 4, 2),
    "Ti/16": (192, 768, 3, 16, 12),
    "S/16": (384, 1536, 6, 16, 12),
    "B/16": (768, 3072, 12, 16, 12),
    "L/16": (1024, 4096, 16, 16, 24),
}
NORMS = ("layernorm", "rmsnorm")
NORM_EPS = 1e-6  # flax's LayerNorm default, which vit_jax and big_vision use
# Components living under the flax ``Transformer`` sub-tree.
_TRANSFORMER_RE = re.compile(
    r"^(posembed_input|encoder_norm|encoderblock_\d+|residual_adapter_\d+)$"
)
_BLOCK_RE = re.compile(r"^encoderblock_(\d+)$")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Every static quantity of one ViT architecture (resolved from hparams)."""

    hidden: int
    mlp_dim: int
    heads: int
    qk_dim: int
    v_dim: int
    patch: int
    num_layers: int
    num_classes: int
    adapter_layers: tuple[int, ...]
    adapter_dim: int
    image_size: int
    norm: str

    @property
    def grid(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch


def _int_or(hparams: Mapping[str, Any], key: str, default: int) -> int:
    value = hparams.get(key)
    if value is None:
        return default
    try:
        out = int(value)
    except (TypeError, ValueError) as e:
        raise FamilyError(f"vit: hparam {key}={value!r} is not an integer") from e
    if out < 0:
        raise FamilyError(f"vit: hparam {key}={value!r} must be >= 0")
    return out


def vit_config(hparams: Mapping[str, Any]) -> ViTConfig:
    """Resolves ``hparams`` (size name plus explicit overrides) into a :class:`ViTConfig`.

    Raises:
        FamilyError: naming the offending key (unknown ``vit_size``, bad ``vit_norm``, image size
            not divisible by the patch size, head dims that don't divide, adapter index out of
            range).
    """
    size = hparams.get("vit_size", "test")
    if size not in VIT_SIZES:
        raise FamilyError(f"vit: unknown vit_size {size!r}; known: {sorted(VIT_SIZES)}")
    hidden0, mlp0, heads0, patch0, layers0 = VIT_SIZES[size]
    hidden = _int_or(hparams, "vit_hidden", hidden0)
    heads = _int_or(hparams, "vit_heads", heads0)
    if heads < 1:
        raise FamilyError(f"vit: vit_heads={heads} must be >= 1")
    qk_default = v_default = None
    if hparams.get("vit_qk_dim") is None or hparams.get("vit_v_dim") is None:
        if hidden % heads:
            raise FamilyError(
                f"vit: vit_hidden={hidden} is not divisible by vit_heads={heads}; "
                "set vit_qk_dim and vit_v_dim explicitly"
            )
        qk_default = v_default = hidden // heads
    norm = hparams.get("vit_norm") or "layernorm"
    if norm not in NORMS:
        raise FamilyError(f"vit: vit_norm={norm!r}; expected one of {NORMS}")
    patch = _int_or(hparams, "vit_patch", patch0)
    image_size = _int_or(hparams, "ds_image_size", 224)
    if patch < 1 or image_size < patch or image_size % patch:
        raise FamilyError(
            f"vit: ds_image_size={image_size} is not a positive multiple of the patch size {patch}"
        )
    adapters = parse_adapter_layers(hparams.get("adapter_layers", ""))
    num_layers = _int_or(hparams, "num_layers", layers0)
    for i in adapters:
        if not 0 <= i < num_layers:
            raise FamilyError(
                f"vit: adapter_layers index {i} out of range for num_layers={num_layers}"
            )
    dims = {
        "vit_hidden": hidden,
        "vit_mlp_dim": _int_or(hparams, "vit_mlp_dim", mlp0),
        "vit_qk_dim": _int_or(hparams, "vit_qk_dim", qk_default or 0),
        "vit_v_dim": _int_or(hparams, "vit_v_dim", v_default or 0),
    }
    for key, value in dims.items():
        if value < 1:
            raise FamilyError(f"vit: {key}={value} must be >= 1")
    return ViTConfig(
        hidden=hidden,
        mlp_dim=dims["vit_mlp_dim"],
        heads=heads,
        qk_dim=dims["vit_qk_dim"],
        v_dim=dims["vit_v_dim"],
        patch=patch,
        num_layers=num_layers,
        num_classes=_int_or(hparams, "num_classes", 0),
        adapter_layers=adapters,
        adapter_dim=_int_or(hparams, "adapter_dim", 32),
        image_size=image_size,
        norm=norm,
    )


# ----------------------------------------------------------------------------- flax modules


def _norm(norm: str, name: str) -> nn.Module:
    if norm == "rmsnorm":
        return nn.RMSNorm(epsilon=NORM_EPS, name=name)
    return nn.LayerNorm(epsilon=NORM_EPS, name=name)


class MultiHeadAttention(nn.Module):
    """Self-attention with per-head key/query dim ``qk_dim`` and value dim ``v_dim``.

    Parameter names and shapes are those of ``flax.linen.MultiHeadDotProductAttention``
    (``query/kernel`` is ``(hidden, heads, qk_dim)``, ``out/kernel`` is ``(heads, v_dim, hidden)``),
    so vit_jax / big_vision checkpoints load unchanged when ``qk_dim == v_dim``.
    """

    heads: int
    qk_dim: int
    v_dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Attends over the tokens of ``x`` ``[B, T, hidden]``."""
        dense = functools.partial(nn.DenseGeneral, kernel_init=nn.initializers.xavier_uniform())
        q = dense((self.heads, self.qk_dim), name="query")(x)
        k = dense((self.heads, self.qk_dim), name="key")(x)
        v = dense((self.heads, self.v_dim), name="value")(x)
        q = q / np.sqrt(self.qk_dim).astype(np.float32)
        weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return dense(x.shape[-1], axis=(-2, -1), name="out")(out)


class MlpBlock(nn.Module):
    """vit_jax's MLP: Dense -> GELU -> Dense (xavier kernels, tiny normal biases)."""

    mlp_dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the MLP token-wise."""
        dense = functools.partial(
            nn.Dense,
            kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.normal(stddev=1e-6),
        )
        y = nn.gelu(dense(self.mlp_dim, name="Dense_0")(x))
        return dense(x.shape[-1], name="Dense_1")(y)


class Encoder1DBlock(nn.Module):
    """Pre-norm transformer block (dropout is always 0 in the reference, so there is none)."""

    cfg: ViTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the block to ``x`` ``[B, T, hidden]``."""
        c = self.cfg
        y = _norm(c.norm, "LayerNorm_0")(x)
        x = x + MultiHeadAttention(
            c.heads, c.qk_dim, c.v_dim, name="MultiHeadDotProductAttention_0"
        )(y)
        y = _norm(c.norm, "LayerNorm_1")(x)
        return x + MlpBlock(c.mlp_dim, name="MlpBlock_0")(y)


class ResidualAdapter(nn.Module):
    """x + Dense(GELU(Dense(norm(x)))) with a zero output kernel (reference §2.3)."""

    dim: int
    norm: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Adds the adapter output to ``x``."""
        y = _norm(self.norm, "LayerNorm_0")(x)
        y = nn.gelu(nn.Dense(self.dim, name="Dense_0")(y))
        return x + nn.Dense(x.shape[-1], kernel_init=nn.initializers.zeros, name="Dense_1")(y)


class AddPositionEmbs(nn.Module):
    """Learnt additive position embeddings (BERT init, as vit_jax)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Adds the position embeddings to ``x``."""
        shape = (1, x.shape[1], x.shape[2])
        return x + self.param("pos_embedding", nn.initializers.normal(stddev=0.02), shape)


class Encoder(nn.Module):
    """The ``Transformer`` sub-tree: posembed, adapters + blocks, final norm."""

    cfg: ViTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Encodes the token sequence ``x``."""
        c = self.cfg
        x = AddPositionEmbs(name="posembed_input")(x)
        for i in range(c.num_layers):
            if i in c.adapter_layers:
                x = ResidualAdapter(c.adapter_dim, c.norm, name=f"residual_adapter_{i}")(x)
            x = Encoder1DBlock(c, name=f"encoderblock_{i}")(x)
        return _norm(c.norm, "encoder_norm")(x)


class VisionTransformer(nn.Module):
    """ViT classifier on the class token; ``num_classes == 0`` returns the representation."""

    cfg: ViTConfig

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        """Logits (or the representation) for ``images`` ``[B, H, W, 3]``."""
        c = self.cfg
        x = nn.Conv(
            c.hidden,
            (c.patch, c.patch),
            strides=(c.patch, c.patch),
            padding="VALID",
            name="embedding",
        )(images)
        n, h, w, d = x.shape
        x = jnp.reshape(x, (n, h * w, d))
        cls = self.param("cls", nn.initializers.zeros, (1, 1, d))
        x = jnp.concatenate([jnp.tile(cls, (n, 1, 1)), x], axis=1)
        x = Encoder(c, name="Transformer")(x)[:, 0]
        if c.num_classes:
            x = nn.Dense(c.num_classes, kernel_init=nn.initializers.zeros, name="head")(x)
        return x


def _apply_stage(c: ViTConfig, stage: tuple[str, ...], params: ParamsByComponent, x: jax.Array):
    """One stage of :meth:`ViTFamily.stages`, with the same maths as :class:`VisionTransformer`."""
    if stage[0] == "embedding":
        emb = nn.Conv(c.hidden, (c.patch, c.patch), strides=(c.patch, c.patch), padding="VALID")
        x = emb.apply({"params": params["embedding"]}, x)
        n, h, w, d = x.shape
        x = jnp.reshape(x, (n, h * w, d))
        x = jnp.concatenate([jnp.tile(params["cls"], (n, 1, 1)), x], axis=1)
        return AddPositionEmbs().apply({"params": params["posembed_input"]}, x)
    if stage == ("encoder_norm",):
        return _norm(c.norm, "encoder_norm").apply({"params": params["encoder_norm"]}, x)[:, 0]
    if stage == ("head",):
        return nn.Dense(c.num_classes).apply({"params": params["head"]}, x)
    for name in stage:
        if name.startswith("residual_adapter_"):
            module = ResidualAdapter(c.adapter_dim, c.norm)
        else:
            module = Encoder1DBlock(c)
        x = module.apply({"params": params[name]}, x)
    return x


@functools.lru_cache(maxsize=128)
def _module(cfg: ViTConfig) -> VisionTransformer:
    return VisionTransformer(cfg)


# Jitted per architecture: op-by-op dispatch of a flax model is ~100x slower on CPU, and a jit
# nested in the trainer's own jit is simply inlined.
@functools.lru_cache(maxsize=128)
def _jit_apply(cfg: ViTConfig) -> Any:
    return jax.jit(_module(cfg).apply)


def tree_from_components(params: ParamsByComponent) -> dict[str, Params]:
    """Moves ``Transformer`` children back under ``Transformer`` (the flax tree layout)."""
    tree: dict[str, Any] = {}
    inner: dict[str, Any] = {}
    for name, p in params.items():
        (inner if _TRANSFORMER_RE.match(name) else tree)[name] = p
    tree["Transformer"] = inner
    return tree


def components_from_tree(tree: Mapping[str, Params]) -> dict[str, Params]:
    """Hoists the ``Transformer`` children to the top level (reference §1.1)."""
    out = {k: v for k, v in tree.items() if k != "Transformer"}
    out.update(tree.get("Transformer", {}))
    return out


# ----------------------------------------------------------------------------- numpy init


def _seed_words(rng: jax.Array) -> list[int]:
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    return [int(w) for w in np.asarray(rng, dtype=np.uint32).ravel()]


def _fans(component: str, leaf: str, shape: tuple[int, ...]) -> tuple[int, int]:
    # flax DenseGeneral flattens (in..., out...) kernels; ``out`` has two input axes.
    if "/out/" in f"/{leaf}":
        return shape[0] * shape[1], shape[2]
    if len(shape) == 3:  # query/key/value: (hidden, heads, dim)
        return shape[0], shape[1] * shape[2]
    if len(shape) == 4:  # patch-embedding conv (p, p, 3, hidden)
        return shape[0] * shape[1] * shape[2], shape[3]
    return shape[0], shape[1]


def _init_leaf(
    gen: np.random.Generator, component: str, leaf: str, shape: tuple[int, ...]
) -> np.ndarray:
    """One parameter drawn like vit_jax / flax would (distribution, not bits)."""
    name = leaf.rsplit("/", 1)[-1]
    zero_out = component == "head" or (
        component.startswith("residual_adapter_") and leaf.startswith("Dense_1/")
    )
    if component == "cls" or zero_out:
        return np.zeros(shape, np.float32)
    if name == "scale":
        return np.ones(shape, np.float32)
    if component == "posembed_input":
        return (0.02 * gen.standard_normal(shape)).astype(np.float32)
    if name == "bias":
        if component.startswith("encoderblock_") and leaf.startswith("MlpBlock_0/"):
            return (1e-6 * gen.standard_normal(shape)).astype(np.float32)
        return np.zeros(shape, np.float32)
    fan_in, fan_out = _fans(component, leaf, shape)
    if component.startswith("encoderblock_"):  # xavier_uniform (attention and MLP kernels)
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        return gen.uniform(-limit, limit, shape).astype(np.float32)
    # flax's default lecun_normal: truncated normal on [-2, 2] rescaled to variance 1/fan_in.
    std = np.sqrt(1.0 / fan_in) / 0.87962566103423978
    draw = gen.standard_normal(shape)
    bad = np.abs(draw) > 2
    while bad.any():
        draw[bad] = gen.standard_normal(int(bad.sum()))
        bad = np.abs(draw) > 2
    return (std * draw).astype(np.float32)


def init_numpy(cfg: ViTConfig, rng: jax.Array) -> dict[str, Params]:
    """Fresh params of every component, drawn with numpy from ``rng`` (one stream per component).

    Seeding per component name means a component's fresh value does not depend on which other
    components the architecture has (e.g. inserting an adapter leaves the fresh head unchanged).
    """
    words = _seed_words(rng)
    out: dict[str, Params] = {}
    for component, tree in _expected_shapes(cfg).items():
        gen = np.random.default_rng([*words, zlib.crc32(component.encode())])
        if not isinstance(tree, Mapping):
            out[component] = jnp.asarray(_init_leaf(gen, component, "", tree.shape))
            continue
        leaves = flax.traverse_util.flatten_dict(tree, sep="/")
        values = {k: jnp.asarray(_init_leaf(gen, component, k, v.shape)) for k, v in leaves.items()}
        out[component] = flax.traverse_util.unflatten_dict(values, sep="/")
    return out


# ----------------------------------------------------------------------------- family


class ViTFamily(Family):
    """The reference's root family (vit_jax ViT); see the module docstring."""

    name = "vit"
    modality = "image"
    shape_keys = Family.shape_keys + (
        "vit_size",
        "vit_hidden",
        "vit_mlp_dim",
        "vit_heads",
        "vit_qk_dim",
        "vit_v_dim",
        "vit_patch",
        "vit_norm",
    )
    force_clone = ("encoder_norm",)
    supports_expansions = True
    root_keys = ("vit_size",)
    block_prefix = "encoderblock_"
    above_blocks = ("encoder_norm",)

    def default_hparams(self) -> dict[str, Any]:
        """Tiny ``test`` size; set ``vit_size`` (and ``num_layers``) for the real roots."""
        return {
            "vit_size": "test",
            "vit_norm": "layernorm",
            "vit_hidden": None,
            "vit_mlp_dim": None,
            "vit_heads": None,
            "vit_qk_dim": None,
            "vit_v_dim": None,
            "vit_patch": None,
            "num_classes": 10,
            "num_layers": VIT_SIZES["test"][4],
            "adapter_layers": "",
            "adapter_dim": 32,
            "ds_image_size": 32,
        }

    def config(self, hparams: Mapping[str, Any]) -> ViTConfig:
        """:func:`vit_config` of ``hparams`` over :meth:`default_hparams`."""
        return vit_config({**self.default_hparams(), **hparams})

    def validate_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Raises :class:`FamilyError` naming the key when hparams are inconsistent."""
        super().validate_hparams(hparams)
        self.config(hparams)

    def component_names(self, hparams: Mapping[str, Any]) -> list[str]:
        """Input side first: embedding, cls, posembed, [adapter_i,] block_i ..., norm, head."""
        c = self.config(hparams)
        names = ["embedding", "cls", "posembed_input"]
        for i in range(c.num_layers):
            if i in c.adapter_layers:
                names.append(f"residual_adapter_{i}")
            names.append(f"encoderblock_{i}")
        names.append("encoder_norm")
        if c.num_classes:
            names.append("head")
        return names

    def init(self, rng: jax.Array, hparams: Mapping[str, Any]) -> dict[str, Params]:
        """vit_jax's initialisers; ``head``, ``cls`` and adapter output kernels are zeros.

        With a concrete ``rng`` the values are drawn by :func:`init_numpy` (same distributions as
        flax's initialisers, one seed per component; compiling flax's init costs seconds per
        architecture on CPU). Under a jax transformation flax's own init runs instead.
        """
        c = self.config(hparams)
        if isinstance(rng, jax.core.Tracer):  # under jit / eval_shape: flax's own init
            images = jnp.zeros((1, c.image_size, c.image_size, 3), jnp.float32)
            return components_from_tree(dict(_module(c).init(rng, images)["params"]))
        return init_numpy(c, rng)

    def apply(
        self, params: ParamsByComponent, inputs: jax.Array, hparams: Mapping[str, Any]
    ) -> jax.Array:
        """Logits ``[B, num_classes]`` (or the ``[B, hidden]`` representation if no head)."""
        c = self.config(hparams)
        expected = self.component_names(hparams)
        missing = [n for n in expected if n not in params]
        extra = sorted(set(params) - set(expected))
        if missing or extra:
            raise FamilyError(
                f"vit: params do not match hparams: missing components {missing}, "
                f"unexpected components {extra}"
            )
        shape = tuple(np.shape(inputs))
        if len(shape) != 4 or shape[1:] != (c.image_size, c.image_size, 3):
            raise FamilyError(
                f"vit: inputs of shape {shape}, expected [B, {c.image_size}, {c.image_size}, 3] "
                f"(ds_image_size={c.image_size})"
            )
        return _jit_apply(c)({"params": tree_from_components(params)}, inputs)

    def stages(self, hparams: Mapping[str, Any]) -> list[tuple[str, ...]]:
        """Tokens (embedding, cls, posembed), then [adapter_i,] block_i, the norm, the head."""
        c = self.config(hparams)
        out = [("embedding", "cls", "posembed_input")]
        for i in range(c.num_layers):
            adapter = (f"residual_adapter_{i}",) if i in c.adapter_layers else ()
            out.append((*adapter, f"encoderblock_{i}"))
        out.append(("encoder_norm",))
        if c.num_classes:
            out.append(("head",))
        return out

    def apply_stages(
        self,
        params: ParamsByComponent,
        inputs: jax.Array,
        hparams: Mapping[str, Any],
        start: int,
        stop: int | None = None,
    ) -> jax.Array:
        """Stages ``start..stop-1``: tokens [B, T, hidden], then the pooled [B, hidden], logits."""
        c = self.config(hparams)
        stages = self.stages(hparams)
        x = inputs
        for i in range(start, len(stages) if stop is None else stop):
            x = _apply_stage(c, stages[i], params, x)
        return x

    def dummy_inputs(self, hparams: Mapping[str, Any], batch_size: int = 1) -> np.ndarray:
        """Zero images at the configured size (``ds_image_size`` may come from the defaults)."""
        size = self.config(hparams).image_size
        return np.zeros((batch_size, size, size, 3), np.float32)

    def expected_shapes(self, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """``jax.ShapeDtypeStruct`` trees of every component (no computation)."""
        return _expected_shapes(self.config(hparams))

    def adapt_component(
        self,
        name: str,
        params: Params,
        old_hparams: Mapping[str, Any],
        new_hparams: Mapping[str, Any],
    ) -> Params | None:
        """``posembed_input``: grid interpolated to the new image size; others: as-is or None."""
        want = self.expected_shapes(new_hparams).get(name)
        if want is None:
            return None
        if name == "posembed_input":
            old = np.asarray(params["pos_embedding"])
            new_shape = want["pos_embedding"].shape
            if old.ndim != 3 or old.shape[2] != new_shape[2]:
                return None
            return {"pos_embedding": jnp.asarray(interpolate_posembed(old, new_shape[1]))}
        zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), want)
        try:
            same = shape_signature(params) == shape_signature(zeros)
        except (TypeError, ValueError):
            same = False
        return params if same else None

    def fresh_allowed(self, name: str, hparams: Mapping[str, Any]) -> bool:
        """Head, adapters, and blocks no ancestor has (beyond the root depth)."""
        if name == "head" or name.startswith("residual_adapter_"):
            return True
        match = _BLOCK_RE.match(name)
        return bool(match) and int(match.group(1)) < self.config(hparams).num_layers

    def load_pretrained(
        self, hparams: Mapping[str, Any], path: str | None = None
    ) -> dict[str, Params]:
        """Root params from an AugReg (vit_jax) or big_vision ``.npz`` checkpoint.

        Only blocks ``0..num_layers-1`` are read; ``posembed_input`` is interpolated to
        ``ds_image_size``; the head is never read (a zero head with ``num_classes`` outputs), and
        adapters named in ``adapter_layers`` start as zero-output adapters.

        Raises:
            FamilyError: no path, unreadable file, a missing or mis-shaped key (named), or
                ``vit_norm="rmsnorm"`` (the checkpoints hold LayerNorms).
        """
        c = self.config(hparams)
        if path is None:
            raise FamilyError(
                "vit: no bundled ViT checkpoint ships with mu2net; pass path= to an AugReg / "
                "big_vision .npz (e.g. a copy of gs://vit_models/augreg/<name>.npz), or start "
                "from a random root with ViTFamily.init()"
            )
        if c.norm != "layernorm":
            raise FamilyError(
                f"vit: {path}: checkpoints hold LayerNorm params; vit_norm={c.norm!r} cannot load "
                "them (use vit_norm='layernorm')"
            )
        shapes = self.expected_shapes(hparams)
        wanted = {  # in architecture order, so errors name the input-most bad key
            n: shapes[n]
            for n in self.component_names(hparams)
            if n != "head" and not n.startswith("residual_adapter_")
        }
        loaded = npz_checkpoint.load_vit_components(path, wanted)
        # New parts: a zero head (as init), and zero-output adapters (only then pay for an init).
        if c.adapter_layers:
            fresh = self.init(jax.random.PRNGKey(0), hparams)
            loaded.update({n: p for n, p in fresh.items() if n not in loaded})
        elif "head" in shapes:
            loaded["head"] = jax.tree_util.tree_map(
                lambda s: jnp.zeros(s.shape, s.dtype), shapes["head"]
            )
        return {n: loaded[n] for n in self.component_names(hparams)}


@functools.lru_cache(maxsize=128)
def _expected_shapes(cfg: ViTConfig) -> dict[str, Any]:
    images = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
    variables = jax.eval_shape(_module(cfg).init, jax.random.PRNGKey(0), images)
    return components_from_tree(dict(variables["params"]))


FAMILY = register_family(ViTFamily())
