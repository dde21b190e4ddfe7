"""The six function-preserving transformer expansions (reference §7.4) for the ViT family.

Each expansion is a pure function ``(hparams, params_by_component, rng, new_size=None) ->
(new_hparams, new_params_by_component)`` (``new_size=None``: one default step, see
:func:`default_new_size`): the new architecture computes exactly the same
function (up to float rounding) as the old one, and its new parameters are trainable. They follow
the reference's generic procedure (``params_pad_to_shape``): take a fresh init of the larger
architecture (``rng``), put every old tensor in the leading corner, keep the fresh random values
in the new "arbitrary" entries, and zero or rescale only where exactness needs it:

============== ================ ====================================================================
name           size hparam      constraint (everything else new is random)
============== ================ ====================================================================
mlp_width      ``vit_mlp_dim``  new rows of ``MlpBlock_0/Dense_1/kernel`` = 0
add_heads      ``vit_heads``    new heads' rows of ``out/kernel`` = 0
value_dim      ``vit_v_dim``    new value rows of ``out/kernel`` = 0
key_query_dim  ``vit_qk_dim``   new ``key`` columns = 0; old ``key`` kernel/bias x sqrt(k'/k)
hidden_dim     ``vit_hidden``   new output columns of ``embedding``, ``cls``, ``posembed``,
                                ``out``, MLP/adapter ``Dense_1`` (kernel and bias) = 0; every
                                RMSNorm scale x sqrt(h/h') (needs ``vit_norm="rmsnorm"``)
add_layers     ``num_layers``   new blocks with ``out`` and ``MlpBlock_0/Dense_1`` = 0 (identity)
============== ================ ====================================================================

The attention biases of vit_jax are kept; the constraints above cover them (a zero ``key``
column has a zero bias too, output biases live in the hidden space). Only the hidden-dimension
expansion needs RMSNorm (LayerNorm's centring mixes the new zero coordinates into the mean); the
other five are exact with either norm. RMSNorm's epsilon makes the hidden expansion exact only up
to ``eps * (h'/h - 1) / mean(x**2)`` relative (~1e-6), far below float32 training noise.

Every new hparams dict pins the resolved dims (``vit_hidden``, ``vit_heads``, ``vit_qk_dim``...)
so that changing one of them never silently changes a derived default of another.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mu2net.models import vit
from mu2net.models.base import FamilyError, Params, ParamsByComponent, format_adapter_layers

Expansion = Callable[..., tuple[dict[str, Any], dict[str, Params]]]
# (component, leaf path, old array, fresh array with the old one in its leading corner) -> new.
Rule = Callable[[str, str, np.ndarray, np.ndarray], np.ndarray]

_OUT_KERNEL = "MultiHeadDotProductAttention_0/out/kernel"
_OUT_BIAS = "MultiHeadDotProductAttention_0/out/bias"
_MLP_OUT_KERNEL = "MlpBlock_0/Dense_1/kernel"
_MLP_OUT_BIAS = "MlpBlock_0/Dense_1/bias"


def _config(hparams: Mapping[str, Any], params: ParamsByComponent) -> vit.ViTConfig:
    cfg = vit.FAMILY.config(hparams)
    expected = vit.FAMILY.component_names(hparams)
    if sorted(expected) != sorted(params):
        missing, extra = sorted(set(expected) - set(params)), sorted(set(params) - set(expected))
        raise FamilyError(
            f"expansion: params do not match hparams: missing {missing}, unexpected {extra}"
        )
    return cfg


def _grown_hparams(
    hparams: Mapping[str, Any], cfg: vit.ViTConfig, key: str, old: int, new: int, what: str
) -> dict[str, Any]:
    if int(new) < old:
        raise FamilyError(f"{what}: {key} can only grow, got {old} -> {new}")
    out = dict(hparams)
    out.update(
        vit_hidden=cfg.hidden,
        vit_mlp_dim=cfg.mlp_dim,
        vit_heads=cfg.heads,
        vit_qk_dim=cfg.qk_dim,
        vit_v_dim=cfg.v_dim,
        vit_patch=cfg.patch,
    )
    out[key] = int(new)
    return out


def default_new_size(name: str, current: int) -> int:
    """The size an expansion grows to when no ``new_size`` is given (evolution's default step).

    One more head or layer; +25% (at least +1) for the widths, so that repeated mutations grow
    a path gradually, as the reference grows one dimension at a time.
    """
    if name not in EXPANSION_KEYS:
        raise FamilyError(f"unknown expansion {name!r}; known: {sorted(EXPANSION_KEYS)}")
    if name in ("add_heads", "add_layers"):
        return current + 1
    return current + max(1, current // 4)


def _size_or_default(new_size: int | None, current: int, name: str) -> int:
    return default_new_size(name, current) if new_size is None else int(new_size)


def _flat(tree: Params) -> dict[str, Any]:
    if isinstance(tree, Mapping):
        return flax.traverse_util.flatten_dict(tree, sep="/")
    return {"": tree}


def _unflat(flat: Mapping[str, Any]) -> Params:
    if set(flat) == {""}:
        return flat[""]
    return flax.traverse_util.unflatten_dict(dict(flat), sep="/")


def _transform(
    params: ParamsByComponent,
    new_hparams: Mapping[str, Any],
    rng: jax.Array,
    rule: Rule,
    source: Mapping[str, str | None] | None = None,
    new_rule: Callable[[str, str, np.ndarray], np.ndarray] | None = None,
) -> dict[str, Params]:
    """Pads every old component into a fresh init of ``new_hparams`` and applies ``rule``.

    ``source`` maps a new component name to the old one it comes from (None: a brand-new
    component, built by ``new_rule`` from its fresh init). Components the rule leaves unchanged
    are returned as the very same objects, so unchanged shared components stay shared.
    """
    fresh = vit.FAMILY.init(rng, new_hparams)
    out: dict[str, Params] = {}
    for name, fresh_tree in fresh.items():
        src = source.get(name, name) if source is not None else name
        fresh_flat = {k: np.array(v, dtype=np.float32) for k, v in _flat(fresh_tree).items()}
        if src is None:
            assert new_rule is not None
            out[name] = _to_jnp({k: new_rule(name, k, v) for k, v in fresh_flat.items()})
            continue
        old_flat = _flat(params[src])
        if set(old_flat) != set(fresh_flat):
            raise FamilyError(f"expansion: component {src!r} has leaves {sorted(old_flat)}")
        new_flat, changed = {}, False
        for leaf, fresh_value in fresh_flat.items():
            old = np.asarray(old_flat[leaf], dtype=np.float32)
            if old.ndim != fresh_value.ndim or any(
                o > f for o, f in zip(old.shape, fresh_value.shape)
            ):
                raise FamilyError(
                    f"expansion: {src}/{leaf} of shape {old.shape} does not fit {fresh_value.shape}"
                )
            padded = fresh_value
            padded[tuple(slice(0, s) for s in old.shape)] = old
            new = rule(name, leaf, old, padded)
            new_flat[leaf] = new
            changed = changed or new.shape != old.shape or not np.array_equal(new, old)
        out[name] = _to_jnp(new_flat) if changed else params[src]
    return out


def _to_jnp(flat: Mapping[str, np.ndarray]) -> Params:
    return _unflat({k: jnp.asarray(v) for k, v in flat.items()})


def expand_mlp(
    hparams: Mapping[str, Any],
    params: ParamsByComponent,
    rng: jax.Array,
    new_size: int | None = None,
) -> tuple[dict[str, Any], dict[str, Params]]:
    """MLP expansion p -> p' (``vit_mlp_dim``): the new hidden units' outgoing weights are 0."""
    cfg = _config(hparams, params)
    new_size = _size_or_default(new_size, cfg.mlp_dim, "mlp_width")
    new_h = _grown_hparams(hparams, cfg, "vit_mlp_dim", cfg.mlp_dim, new_size, "expand_mlp")

    def rule(comp: str, leaf: str, old: np.ndarray, new: np.ndarray) -> np.ndarray:
        if leaf == _MLP_OUT_KERNEL:
            new[cfg.mlp_dim :] = 0
        return new

    return new_h, _transform(params, new_h, rng, rule)


def add_heads(
    hparams: Mapping[str, Any],
    params: ParamsByComponent,
    rng: jax.Array,
    new_size: int | None = None,
) -> tuple[dict[str, Any], dict[str, Params]]:
    """Head addition E -> E' (``vit_heads``): new heads' output projections are 0."""
    cfg = _config(hparams, params)
    new_size = _size_or_default(new_size, cfg.heads, "add_heads")
    new_h = _grown_hparams(hparams, cfg, "vit_heads", cfg.heads, new_size, "add_heads")

    def rule(comp: str, leaf: str, old: np.ndarray, new: np.ndarray) -> np.ndarray:
        if leaf == _OUT_KERNEL:  # (heads, v, hidden)
            new[cfg.heads :] = 0
        return new

    return new_h, _transform(params, new_h, rng, rule)


def expand_value_dim(
    hparams: Mapping[str, Any],
    params: ParamsByComponent,
    rng: jax.Array,
    new_size: int | None = None,
) -> tuple[dict[str, Any], dict[str, Params]]:
    """Heads expansion v -> v' (``vit_v_dim``, every head): new value rows of W_O are 0."""
    cfg = _config(hparams, params)
    new_size = _size_or_default(new_size, cfg.v_dim, "value_dim")
    new_h = _grown_hparams(hparams, cfg, "vit_v_dim", cfg.v_dim, new_size, "expand_value_dim")

    def rule(comp: str, leaf: str, old: np.ndarray, new: np.ndarray) -> np.ndarray:
        if leaf == _OUT_KERNEL:
            new[:, cfg.v_dim :] = 0
        return new

    return new_h, _transform(params, new_h, rng, rule)


def expand_key_query_dim(
    hparams: Mapping[str, Any],
    params: ParamsByComponent,
    rng: jax.Array,
    new_size: int | None = None,
) -> tuple[dict[str, Any], dict[str, Params]]:
    """Attention expansion k -> k' (``vit_qk_dim``).

    New key columns are 0 (they add nothing to QK^T) and the old keys are scaled by sqrt(k'/k),
    so that QK^T / sqrt(k') equals the old QK^T / sqrt(k).
    """
    cfg = _config(hparams, params)
    k = cfg.qk_dim
    new_size = _size_or_default(new_size, k, "key_query_dim")
    new_h = _grown_hparams(hparams, cfg, "vit_qk_dim", k, new_size, "expand_key_query_dim")
    factor = np.float32(np.sqrt(int(new_size) / k))

    def rule(comp: str, leaf: str, old: np.ndarray, new: np.ndarray) -> np.ndarray:
        if leaf.startswith("MultiHeadDotProductAttention_0/key/"):  # kernel and bias: (..., k)
            new[..., :k] = old * factor
            new[..., k:] = 0
        return new

    return new_h, _transform(params, new_h, rng, rule)


def expand_hidden(
    hparams: Mapping[str, Any],
    params: ParamsByComponent,
    rng: jax.Array,
    new_size: int | None = None,
) -> tuple[dict[str, Any], dict[str, Params]]:
    """Hidden-dimension expansion h -> h' (``vit_hidden``); needs ``vit_norm="rmsnorm"``.

    The residual stream's new coordinates stay exactly 0 in every layer: everything that writes
    to it (patch embedding, class token, position embedding, attention output, MLP and adapter
    outputs) gets zero new output columns. RMS over h' coordinates of which h' - h are zero is
    sqrt(h/h') times the RMS over h, so every norm scale is multiplied by sqrt(h/h'). The head
    reads the (zero) new coordinates through new, arbitrary input rows.
    """
    cfg = _config(hparams, params)
    if cfg.norm != "rmsnorm":
        raise FamilyError(
            f"expand_hidden: vit_norm={cfg.norm!r} is not function-preserving under hidden "
            "expansion (LayerNorm centres over the new zero coordinates); use vit_norm='rmsnorm'"
        )
    h = cfg.hidden
    new_size = _size_or_default(new_size, h, "hidden_dim")
    new_h = _grown_hparams(hparams, cfg, "vit_hidden", h, new_size, "expand_hidden")
    scale = np.float32(np.sqrt(h / int(new_size)))
    zero_out = {_OUT_KERNEL, _OUT_BIAS, _MLP_OUT_KERNEL, _MLP_OUT_BIAS}

    def rule(comp: str, leaf: str, old: np.ndarray, new: np.ndarray) -> np.ndarray:
        adapter_out = comp.startswith("residual_adapter_") and leaf.startswith("Dense_1/")
        if leaf == "scale" or leaf.endswith("/scale"):
            new[:h] = old * scale
        elif comp in ("embedding", "cls", "posembed_input") or adapter_out or leaf in zero_out:
            new[..., h:] = 0
        return new

    return new_h, _transform(params, new_h, rng, rule)


def add_layers(
    hparams: Mapping[str, Any],
    params: ParamsByComponent,
    rng: jax.Array,
    new_size: int | None = None,
    position: int | None = None,
) -> tuple[dict[str, Any], dict[str, Params]]:
    """Layer addition N -> N' (``num_layers``): new identity blocks at ``position`` (default: top).

    New blocks are random except their attention output and MLP output (kernels and biases),
    which are 0, so each is the identity on the residual stream. Blocks (and adapters) at or
    above ``position`` move up by ``N' - N`` indices, keeping their parameters.
    """
    cfg = _config(hparams, params)
    n_old = cfg.num_layers
    new_size = _size_or_default(new_size, n_old, "add_layers")
    new_h = _grown_hparams(hparams, cfg, "num_layers", n_old, new_size, "add_layers")
    added = int(new_size) - n_old
    pos = n_old if position is None else int(position)
    if not 0 <= pos <= n_old:
        raise FamilyError(f"add_layers: position={position} outside 0..{n_old}")
    shift = {i: (i + added if i >= pos else i) for i in range(n_old)}
    new_h["adapter_layers"] = format_adapter_layers([shift[i] for i in cfg.adapter_layers])
    source: dict[str, str | None] = {}
    for i in range(n_old):
        source[f"encoderblock_{shift[i]}"] = f"encoderblock_{i}"
        source[f"residual_adapter_{shift[i]}"] = f"residual_adapter_{i}"
    for j in range(pos, pos + added):
        source[f"encoderblock_{j}"] = None
    identity = {_OUT_KERNEL, _OUT_BIAS, _MLP_OUT_KERNEL, _MLP_OUT_BIAS}

    def new_rule(comp: str, leaf: str, fresh: np.ndarray) -> np.ndarray:
        return np.zeros_like(fresh) if leaf in identity else fresh

    def keep(comp: str, leaf: str, old: np.ndarray, new: np.ndarray) -> np.ndarray:
        return new

    return new_h, _transform(params, new_h, rng, keep, source=source, new_rule=new_rule)


# Registry for evolution: mutation name -> expansion, and the hparam each one grows.
EXPANSIONS: dict[str, Expansion] = {
    "mlp_width": expand_mlp,
    "add_heads": add_heads,
    "value_dim": expand_value_dim,
    "key_query_dim": expand_key_query_dim,
    "hidden_dim": expand_hidden,
    "add_layers": add_layers,
}
EXPANSION_KEYS: dict[str, str] = {
    "mlp_width": "vit_mlp_dim",
    "add_heads": "vit_heads",
    "value_dim": "vit_v_dim",
    "key_query_dim": "vit_qk_dim",
    "hidden_dim": "vit_hidden",
    "add_layers": "num_layers",
}
_CFG_FIELDS = {
    "vit_mlp_dim": "mlp_dim",
    "vit_heads": "heads",
    "vit_v_dim": "v_dim",
    "vit_qk_dim": "qk_dim",
    "vit_hidden": "hidden",
    "num_layers": "num_layers",
}


def current_size(name: str, hparams: Mapping[str, Any]) -> int:
    """The resolved value of the hparam that expansion ``name`` grows (e.g. the MLP width)."""
    if name not in EXPANSIONS:
        raise FamilyError(f"unknown expansion {name!r}; known: {sorted(EXPANSIONS)}")
    return int(getattr(vit.FAMILY.config(hparams), _CFG_FIELDS[EXPANSION_KEYS[name]]))


def expand(
    name: str,
    hparams: Mapping[str, Any],
    params: ParamsByComponent,
    rng: jax.Array,
    new_size: int | None = None,
) -> tuple[dict[str, Any], dict[str, Params]]:
    """Applies expansion ``name`` (a key of :data:`EXPANSIONS`); default size: one step."""
    if name not in EXPANSIONS:
        raise FamilyError(f"unknown expansion {name!r}; known: {sorted(EXPANSIONS)}")
    return EXPANSIONS[name](hparams, params, rng, new_size)
