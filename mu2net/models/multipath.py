"""The multipath model (µ4Net, reference §7.3): per-example routing over frozen paths.

A multipath path combines ``n`` whole existing paths (*sub-paths*), frozen: ``path_0`` is a
path of the same task and keeps its head (its logits are ``logits_0``); ``path_1..`` come from
other tasks and run headless (their pooled representation). Only two kinds of components
train:

* ``multipath_router``: LayerNorm on ``logits_0``, then Dense(n) with a zero kernel and bias
  ``[b, 0, ..., 0]``, ``b = ln((n-1) w / (1-w))``, so the softmax gives weight
  ``w = router_init_main_path_weight`` to ``path_0`` at init. Its gradient is scaled by
  ``router_lr_mult`` through a stop-gradient.
* ``head_adapter_path_i`` (connectors): Dense(num_classes), zero-initialised, mapping path i's
  representation to logits.

The logits ``L_p`` are combined straight-through: the value is ``sum_p w_p L_p``, the gradient
reaching the weights sees ``L`` frozen and the gradient reaching each ``L_p`` is that of the
unweighted sum. At init the connectors output 0, so the output is ``w * logits_0``: the same
argmax as ``path_0``.

A composite path's components are its own (router, connectors) plus every sub-path component
under ``<slot>/<name>`` (``path_1/encoderblock_3``); its hparams hold the sub-paths' specs as a
JSON string under :data:`SUBPATHS_KEY`, so every hashable-hparams cache keeps them. Its family
is the *twin* of ``path_0``'s family, ``multipath:<family>`` (same input pipeline). The twin
has two stages: the frozen sub-paths (whose output, the concatenated ``[logits_0, rep_1, ...]``,
is what evolution's frozen-prefix cache computes once per generation) and the trainable head.

Inputs are ``path_0``'s (its image size and normalisation). A sub-path of another image
family is fed the same images renormalised to its family's pixel statistics and bilinearly
resized to its ``ds_image_size`` (inside the model, so serving and training agree); text
sub-paths must share ``path_0``'s family and ``ds_max_length`` (one tokenizer).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
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
    PrefixPart,
    family_names,
    get_family,
    register_family,
)

SUBPATHS_KEY = "multipath_paths"
ROUTER = "multipath_router"
PREFIX = "multipath:"
MAIN_SLOT = "path_0"
DEFAULTS = {"num_paths": 2, "router_lr_mult": 0.05, "router_init_main_path_weight": 0.8}
_EPS = 1e-6  # flax LayerNorm's default epsilon


class MultipathError(FamilyError):
    """A multipath model that cannot be built (incompatible or missing sub-paths, bad hparams)."""


@dataclasses.dataclass(frozen=True)
class SubPath:
    """One frozen sub-path of a multipath path.

    Attributes:
      slot: ``path_0`` (the main path, with its head) or ``path_i``.
      path: the id of the published path it was taken from.
      task: that path's task.
      family: that path's family.
      hparams: that path's hparams (its architecture and input size).
      agent: the agent that published it.
    """

    slot: str
    path: str
    task: str
    family: str
    hparams: Mapping[str, Any]
    agent: str

    @property
    def main(self) -> bool:
        """Whether this is ``path_0`` (logits, head kept) rather than a headless path."""
        return self.slot == MAIN_SLOT

    def to_json(self) -> dict[str, Any]:
        """JSON-ready record."""
        return {
            "slot": self.slot,
            "path": self.path,
            "task": self.task,
            "family": self.family,
            "hparams": dict(self.hparams),
            "agent": self.agent,
        }


def slot_name(i: int) -> str:
    """``path_<i>``."""
    return f"path_{i}"


_CONNECTOR = "head_adapter_"


def connector_name(i: int) -> str:
    """The connector of slot i (reference: ``head_adapter_path_i``)."""
    return f"{_CONNECTOR}{slot_name(i)}"


def connector_slot(name: str) -> str | None:
    """The slot a connector serves (``path_i``), or None for any other component."""
    return name[len(_CONNECTOR) :] if name.startswith(_CONNECTOR) else None


def encode_subpaths(subpaths: Sequence[SubPath]) -> str:
    """The :data:`SUBPATHS_KEY` hparam value (canonical JSON: equal specs, equal strings)."""
    return json.dumps([s.to_json() for s in subpaths], sort_keys=True, separators=(",", ":"))


def decode_subpaths(hparams: Mapping[str, Any]) -> list[SubPath]:
    """The sub-paths recorded in a composite path's hparams ([] for a single path)."""
    raw = hparams.get(SUBPATHS_KEY)
    if not raw:
        return []
    try:
        items = json.loads(raw) if isinstance(raw, str) else raw
        subs = [
            SubPath(d["slot"], d["path"], d["task"], d["family"], d["hparams"], d["agent"])
            for d in items
        ]
    except (TypeError, ValueError, KeyError) as e:
        raise MultipathError(f"hparam {SUBPATHS_KEY!r} is malformed: {e}") from None
    if [s.slot for s in subs] != [slot_name(i) for i in range(len(subs))] or len(subs) < 2:
        raise MultipathError(f"hparam {SUBPATHS_KEY!r}: slots must be path_0..path_n-1, n >= 2")
    return subs


def is_composite(hparams: Mapping[str, Any]) -> bool:
    """Whether hparams describe a multipath (composite) path."""
    return bool(hparams.get(SUBPATHS_KEY))


def headless_names(family: Family, hparams: Mapping[str, Any]) -> list[str]:
    """Components of a path run without its head (every stage but the final head)."""
    stages = family.stages(hparams)
    if not stages or stages[-1] != (family.head_name,):
        raise MultipathError(
            f"family {family.name!r} has no headless representation (its stages do not end "
            "with the head): it can only be path_0 of a multipath path"
        )
    return [n for stage in stages[:-1] for n in stage]


def subpath_names(sub: SubPath) -> list[str]:
    """The sub-path's components as used in the composite (headless ones without the head)."""
    family = get_family(sub.family)
    if sub.main:
        return list(family.component_names(sub.hparams))
    return headless_names(family, sub.hparams)


def check_compatible(main: SubPath, other: SubPath) -> None:
    """Raises :class:`MultipathError` naming ``other`` when it cannot share ``main``'s inputs."""
    f0, fi = get_family(main.family), get_family(other.family)
    what = f"sub-path {other.path} (task {other.task!r}, family {fi.name!r})"
    if fi.modality != f0.modality:
        raise MultipathError(
            f"{what} takes {fi.modality} inputs; the main path {main.path} takes {f0.modality}"
        )
    if fi.modality == "text" and (
        fi.name != f0.name
        or other.hparams.get("ds_max_length") != main.hparams.get("ds_max_length")
    ):
        raise MultipathError(
            f"{what}: a text sub-path must share the main path's family and ds_max_length "
            "(one tokenizer, one input)"
        )
    headless_names(fi, other.hparams)


def _adapt_inputs(x: jax.Array, f0: Family, fi: Family, hparams: Mapping[str, Any]) -> jax.Array:
    """``path_0``'s input batch as sub-path family ``fi`` expects it."""
    if fi.modality == "text":
        return x
    if (fi.pixel_mean, fi.pixel_std) != (f0.pixel_mean, f0.pixel_std):
        m0, s0 = jnp.asarray(f0.pixel_mean), jnp.asarray(f0.pixel_std)
        mi, si = jnp.asarray(fi.pixel_mean), jnp.asarray(fi.pixel_std)
        x = (x * s0 + m0 - mi) / si
    size = int(hparams["ds_image_size"])
    if x.shape[1:3] != (size, size):
        x = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "bilinear")
    return x


def subpath_output(sub: SubPath, params: ParamsByComponent, x: jax.Array, f0: Family) -> jax.Array:
    """``logits_0`` for the main path, else the headless representation ``[B, d]``."""
    family = get_family(sub.family)
    x = _adapt_inputs(x, f0, family, sub.hparams)
    if sub.main:
        return family.apply(params, x, sub.hparams)
    stop = len(family.stages(sub.hparams)) - 1
    return family.apply_stages(params, x, sub.hparams, 0, stop)


def subpath_features(
    subpaths: Sequence[SubPath], params: ParamsByComponent, x: jax.Array, f0: Family
) -> jax.Array:
    """The frozen stage: ``[logits_0, rep_1, ...]`` concatenated on the last axis."""
    outs = []
    for sub in subpaths:
        prefix = sub.slot + "/"
        own = {n[len(prefix) :]: p for n, p in params.items() if n.startswith(prefix)}
        outs.append(jnp.asarray(subpath_output(sub, own, x, f0), jnp.float32))
    return jnp.concatenate(outs, axis=-1)


@functools.lru_cache(maxsize=128)
def _compiled_output(function_key: str, f0: Family):
    d = json.loads(function_key)
    # Only what the function depends on: equal architectures share one executable.
    sub = SubPath(d["slot"], "", "", d["family"], d["hparams"], "")
    return jax.jit(lambda p, x: jnp.asarray(subpath_output(sub, p, x, f0), jnp.float32))


def subpath_parts(subpaths: Sequence[SubPath], f0: Family) -> list[PrefixPart]:
    """The frozen stage as one independent part per sub-path (see ``Family.prefix_parts``)."""
    parts = []
    for sub in subpaths:
        names = [f"{sub.slot}/{n}" for n in subpath_names(sub)]
        cut = len(sub.slot) + 1
        slot = MAIN_SLOT if sub.main else slot_name(1)
        key = json.dumps(
            {"slot": slot, "family": sub.family, "hparams": dict(sub.hparams)}, sort_keys=True
        )
        parts.append(
            PrefixPart(
                f"{key}|{f0.name}",
                functools.partial(_own_params, names=tuple(names), cut=cut),
                _compiled_output(key, f0),
            )
        )
    return parts


def _own_params(params: ParamsByComponent, names: tuple[str, ...], cut: int) -> dict:
    return {n[cut:]: params[n] for n in names}


def _representation_width(sub: SubPath) -> int:
    family = get_family(sub.family)
    names = headless_names(family, sub.hparams)
    shapes = jax.eval_shape(lambda: family.init(jax.random.PRNGKey(0), sub.hparams))
    dummy = family.dummy_inputs(sub.hparams, 1)
    rep = jax.eval_shape(
        lambda p, x: subpath_output(sub, p, x, family),
        {n: shapes[n] for n in names},
        jax.ShapeDtypeStruct(dummy.shape, dummy.dtype),
    )
    return int(rep.shape[-1])


@functools.lru_cache(maxsize=128)
def _widths(spec: str) -> tuple[int, ...]:
    return tuple(
        int(sub.hparams["num_classes"]) if sub.main else _representation_width(sub)
        for sub in decode_subpaths({SUBPATHS_KEY: spec})
    )


def feature_widths(hparams: Mapping[str, Any]) -> tuple[int, ...]:
    """Width of each sub-path's output: ``num_classes`` for path_0, representation sizes next."""
    return _widths(_spec(hparams))


def _spec(hparams: Mapping[str, Any]) -> str:
    raw = hparams.get(SUBPATHS_KEY)
    return raw if isinstance(raw, str) else encode_subpaths(decode_subpaths(hparams))


def router_bias(num_paths: int, main_weight: float) -> np.ndarray:
    """``[b, 0, ..., 0]`` with ``b = ln((n-1) w / (1-w))``: softmax weight ``w`` on path_0."""
    if num_paths < 2 or not 0.0 < main_weight < 1.0:
        raise MultipathError(
            f"num_paths={num_paths} must be >= 2 and router_init_main_path_weight={main_weight} "
            "in (0, 1)"
        )
    bias = np.zeros((num_paths,), np.float32)
    bias[0] = math.log((num_paths - 1) * main_weight / (1.0 - main_weight))
    return bias


def init_router(num_classes: int, num_paths: int, main_weight: float) -> Params:
    """The router's fresh params: unit LayerNorm, zero kernel, the main-path bias."""
    return {
        "norm": {"scale": np.ones((num_classes,), np.float32),
                 "bias": np.zeros((num_classes,), np.float32)},
        "dense": {"kernel": np.zeros((num_classes, num_paths), np.float32),
                  "bias": router_bias(num_paths, main_weight)},
    }  # fmt: skip


def init_connector(width: int, num_classes: int) -> Params:
    """A zero connector (its path contributes nothing at init)."""
    return {
        "kernel": np.zeros((width, num_classes), np.float32),
        "bias": np.zeros((num_classes,), np.float32),
    }


def router_weights(router: Params, logits0: jax.Array, lr_mult: float = 1.0) -> jax.Array:
    """Per-example weights ``[B, n]`` (softmax; they sum to 1) from ``logits_0``."""
    mean = logits0.mean(-1, keepdims=True)
    var = ((logits0 - mean) ** 2).mean(-1, keepdims=True)
    z = (logits0 - mean) * jax.lax.rsqrt(var + _EPS)
    z = z * router["norm"]["scale"] + router["norm"]["bias"]
    r = z @ router["dense"]["kernel"] + router["dense"]["bias"]
    # The value is r exactly; the gradient reaching the router is scaled by lr_mult.
    sg = jax.lax.stop_gradient(r)
    return jax.nn.softmax(sg + lr_mult * (r - sg), axis=-1)


def combine(own: ParamsByComponent, feats: jax.Array, hparams: Mapping[str, Any]) -> jax.Array:
    """The trainable stage: router weights and connectors over the concatenated features."""
    widths = feature_widths(hparams)
    splits = np.cumsum(widths)[:-1].tolist()
    parts = jnp.split(feats, splits, axis=-1)
    logits0 = parts[0]
    w = router_weights(own[ROUTER], logits0, float(hparams["router_lr_mult"]))
    stack = jnp.stack(
        [logits0]
        + [p @ own[connector_name(i)]["kernel"] + own[connector_name(i)]["bias"]
           for i, p in enumerate(parts) if i]
    , axis=1)  # fmt: skip
    sg = jax.lax.stop_gradient
    total = stack.sum(1)
    # Straight-through: value sum_p w_p L_p; the weights see L frozen, each L_p gets the
    # gradient of the unweighted sum (total - sg(total) is exactly 0 in the forward pass).
    return jnp.einsum("bn,bnc->bc", w, sg(stack)) + (total - sg(total))


class MultipathFamily(Family):
    """The composite model over sub-paths whose main path is of family ``base``.

    Registered as ``multipath:<base>``; its inputs and preprocessing are the base family's.
    """

    supports_adapters = False

    def __init__(self, base: Family):
        self.base = base
        self.name = PREFIX + base.name
        self.modality = base.modality
        self.pixel_mean = base.pixel_mean
        self.pixel_std = base.pixel_std
        self.shape_keys = ("num_classes", "router_lr_mult", SUBPATHS_KEY, "ds_image_size")

    def default_hparams(self) -> dict[str, Any]:
        """The multipath hparams' defaults (reference §7.3)."""
        return dict(DEFAULTS)

    def own_names(self, hparams: Mapping[str, Any]) -> list[str]:
        """The trainable components: the router and one connector per non-main path."""
        n = len(decode_subpaths(hparams))
        return [ROUTER, *(connector_name(i) for i in range(1, n))]

    def frozen_names(self, hparams: Mapping[str, Any]) -> list[str]:
        """``<slot>/<name>`` for every component of every sub-path."""
        return [f"{s.slot}/{n}" for s in decode_subpaths(hparams) for n in subpath_names(s)]

    def component_names(self, hparams: Mapping[str, Any]) -> list[str]:
        """Sub-path components first (the frozen stage), then router and connectors."""
        return [*self.frozen_names(hparams), *self.own_names(hparams)]

    def stages(self, hparams: Mapping[str, Any]) -> list[tuple[str, ...]]:
        """Two stages: the frozen sub-paths, then the trainable head."""
        return [tuple(self.frozen_names(hparams)), tuple(self.own_names(hparams))]

    def init_own(self, hparams: Mapping[str, Any]) -> dict[str, Params]:
        """Fresh router and connectors."""
        widths = feature_widths(hparams)
        c = int(hparams["num_classes"])
        w = float(hparams.get("router_init_main_path_weight", 0.8))
        out = {ROUTER: init_router(c, len(widths), w)}
        out.update({connector_name(i): init_connector(d, c) for i, d in enumerate(widths) if i})
        return out

    def init(self, rng: jax.Array, hparams: Mapping[str, Any]) -> dict[str, Params]:
        """Fresh params of every component (sub-paths from their families' inits)."""
        out = {}
        for sub in decode_subpaths(hparams):
            params = get_family(sub.family).init(rng, sub.hparams)
            out.update({f"{sub.slot}/{n}": params[n] for n in subpath_names(sub)})
        out.update(self.init_own(hparams))
        return out

    def apply(self, params, inputs, hparams):
        """Logits ``[B, num_classes]`` of the composite model."""
        return self.apply_stages(params, inputs, hparams, 0, None)

    def prefix_parts(self, hparams: Mapping[str, Any], stop: int) -> list[PrefixPart] | None:
        """The frozen stage (``stop`` = 1) as one part per sub-path."""
        return subpath_parts(decode_subpaths(hparams), self.base) if stop == 1 else None

    def apply_stages(self, params, inputs, hparams, start, stop=None):
        """Stage 0: inputs -> concatenated sub-path outputs; stage 1: -> logits."""
        x = inputs
        stop = 2 if stop is None else stop
        if start <= 0 < stop:
            x = subpath_features(decode_subpaths(hparams), params, x, self.base)
        if start <= 1 < stop:
            x = combine(params, x, hparams)
        return x

    def load_pretrained(self, hparams, path=None):
        """Multipath paths are built from published paths, never loaded."""
        raise MultipathError(f"family {self.name!r} has no checkpoint")

    def dummy_inputs(self, hparams: Mapping[str, Any], batch_size: int = 1) -> np.ndarray:
        """The main path's input batch."""
        return self.base.dummy_inputs(self._main_hparams(hparams), batch_size)

    def prepare_inputs(self, raw: Sequence[Any], hparams: Mapping[str, Any]) -> np.ndarray:
        """The main path's preprocessing."""
        return self.base.prepare_inputs(raw, self._main_hparams(hparams))

    def _main_hparams(self, hparams: Mapping[str, Any]) -> dict[str, Any]:
        # Before a path exists (a generation's data) only the ds hparams are known.
        subs = decode_subpaths(hparams)
        main = dict(subs[0].hparams) if subs else {}
        return {**main, **{k: v for k, v in hparams.items() if k.startswith("ds_")}}

    def fresh_allowed(self, name: str, hparams: Mapping[str, Any]) -> bool:
        """Only the router and connectors are ever created fresh."""
        return name in self.own_names(hparams)

    def validate_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Raises :class:`MultipathError` naming the problem."""
        subs = decode_subpaths(hparams)
        if not subs:
            raise MultipathError(f"family {self.name!r}: hparam {SUBPATHS_KEY!r} is missing")
        if subs[0].family != self.base.name:
            raise MultipathError(
                f"family {self.name!r}: main path {subs[0].path} is of family {subs[0].family!r}"
            )
        if int(hparams.get("num_paths", len(subs))) != len(subs):
            raise MultipathError(
                f"num_paths={hparams['num_paths']} but {len(subs)} sub-paths are recorded"
            )
        for sub in subs[1:]:
            check_compatible(subs[0], sub)


def multipath_family(base: str | Family) -> MultipathFamily:
    """The registered twin ``multipath:<base>`` (registered on first use)."""
    base = get_family(base) if isinstance(base, str) else base
    if base.name.startswith(PREFIX):
        raise MultipathError(f"a multipath path cannot be the main path of another: {base.name!r}")
    name = PREFIX + base.name
    if name in family_names():
        return get_family(name)
    return register_family(MultipathFamily(base))


def register_twins() -> None:
    """Registers ``multipath:<f>`` for every family registered so far."""
    for name in family_names():
        if not name.startswith(PREFIX):
            multipath_family(name)


# The bundled families first, so a store's multipath paths load in any process.
from mu2net.models import bert, efficientnet, vit  # noqa: E402,F401

register_twins()
