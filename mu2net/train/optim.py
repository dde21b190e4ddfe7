"""Optimizer and learning-rate schedules of one candidate (reference §3.5).

The optimizer is ``clip_by_global_norm -> SGD with momentum (optional Nesterov)``. Its numeric
hyperparameters (learning rate, momentum, Nesterov flag) live in the optimizer *state*
(``optax.inject_hyperparams``), so the jitted train step takes them as runtime values and a
candidate with another ``opt_lr`` / ``opt_momentum`` / ``opt_nesterov`` / schedule never
recompiles. The learning rate of every step is computed on the host (numpy) from the schedule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mu2net.errors import Mu2netError

SCHEDULES = ("constant", "cosine", "restarts", "linear")

# Reference defaults (§3.3, µ2Net column).
DEFAULT_OPT_HPARAMS = {
    "opt_lr": 0.01,
    "opt_lr_schedule": "cosine",
    "opt_lr_warmup_ratio": 0.1,
    "opt_momentum": 0.9,
    "opt_nesterov": False,
}


class OptimizerError(Mu2netError, ValueError):
    """Bad optimizer hyperparameters (names the offending key)."""


def opt_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The ``opt_*`` hyperparameters with reference defaults filled in, validated."""
    out = {k: hparams.get(k, v) for k, v in DEFAULT_OPT_HPARAMS.items()}
    if out["opt_lr_schedule"] not in SCHEDULES:
        raise OptimizerError(
            f"opt_lr_schedule={out['opt_lr_schedule']!r}: expected one of {list(SCHEDULES)}"
        )
    try:
        out["opt_lr"] = float(out["opt_lr"])
        out["opt_lr_warmup_ratio"] = float(out["opt_lr_warmup_ratio"])
        out["opt_momentum"] = float(out["opt_momentum"] or 0.0)  # None = plain SGD
    except (TypeError, ValueError) as e:
        raise OptimizerError(f"non-numeric optimizer hparam in {out}: {e}") from e
    if not out["opt_lr"] > 0 or not math.isfinite(out["opt_lr"]):
        raise OptimizerError(f"opt_lr={out['opt_lr']!r}: must be a positive finite number")
    if not 0.0 <= out["opt_lr_warmup_ratio"] <= 1.0:
        raise OptimizerError(f"opt_lr_warmup_ratio={out['opt_lr_warmup_ratio']!r}: not in [0, 1]")
    if not 0.0 <= out["opt_momentum"] < 1.0:
        raise OptimizerError(f"opt_momentum={out['opt_momentum']!r}: not in [0, 1)")
    out["opt_nesterov"] = bool(out["opt_nesterov"])
    return out


def _warmup_cosine(steps: np.ndarray, lr: float, init: float, warmup: int, total: int):
    # optax.warmup_cosine_decay_schedule(init, lr, warmup, decay_steps=total, end_value=0).
    warm = init + (lr - init) * steps / max(warmup, 1)
    t = np.clip(steps - warmup, 0, max(total - warmup, 1))
    cos = lr * 0.5 * (1.0 + np.cos(np.pi * t / max(total - warmup, 1)))
    return np.where(steps < warmup, warm, cos)


def lr_schedule(
    hparams: Mapping[str, Any], steps_between_validations: int, num_validations: int
) -> np.ndarray:
    """Learning rate of each of the ``N = S * V`` steps (float32 array of length N).

    Reference §3.5: ``constant`` = lr/2; ``cosine`` = linear warmup lr/100 -> lr over
    ``floor(warmup_ratio * N)`` steps, then cosine decay to 0 at N; ``restarts`` = V repetitions of
    that over S with warmup ``floor(warmup_ratio * S)``; ``linear`` (µ3Net) = warmup lr/1000 -> lr,
    then linear decay to lr/1000 at N.
    """
    h = opt_hparams(hparams)
    lr, ratio, kind = h["opt_lr"], h["opt_lr_warmup_ratio"], h["opt_lr_schedule"]
    s, v = int(steps_between_validations), int(num_validations)
    n = s * v
    steps = np.arange(n, dtype=np.float64)
    if kind == "constant":
        out = np.full(n, lr * 0.5)
    elif kind == "cosine":
        out = _warmup_cosine(steps, lr, lr / 100, math.floor(ratio * n), n)
    elif kind == "restarts":
        out = _warmup_cosine(steps % s, lr, lr / 100, math.floor(ratio * s), s)
    else:  # linear
        warmup, floor = math.floor(ratio * n), lr / 1000
        warm = floor + (lr - floor) * steps / max(warmup, 1)
        decay = lr + (floor - lr) * (steps - warmup) / max(n - warmup, 1)
        out = np.where(steps < warmup, warm, decay)
    return out.astype(np.float32)


def _runtime_trace(decay, nesterov, accumulator_dtype=None) -> optax.GradientTransformation:
    """``optax.trace`` whose ``decay`` and ``nesterov`` may be traced values (no recompiles)."""

    def init_fn(params):
        return optax.TraceState(
            trace=jax.tree_util.tree_map(
                lambda p: jnp.zeros_like(p, dtype=accumulator_dtype or p.dtype), params
            )
        )

    def update_fn(updates, state, params=None):
        del params

        def f(g, t):
            return g + decay * t.astype(g.dtype)

        new_trace = jax.tree_util.tree_map(f, updates, state.trace)
        updates = jax.tree_util.tree_map(
            lambda g, t: jnp.where(nesterov > 0, f(g, t), t), updates, new_trace
        )
        new_trace = jax.tree_util.tree_map(
            lambda t, old: t.astype(old.dtype), new_trace, state.trace
        )
        return updates, optax.TraceState(trace=new_trace)

    return optax.GradientTransformation(init_fn, update_fn)


def _sgd_chain(learning_rate, momentum, nesterov, clip_norm, accumulator_dtype):
    return optax.chain(
        optax.clip_by_global_norm(clip_norm),
        _runtime_trace(momentum, nesterov, accumulator_dtype),
        optax.scale_by_learning_rate(learning_rate),
    )


def make_optimizer(
    clip_norm: float = 1.0, accumulator_dtype: Any = None
) -> optax.GradientTransformation:
    """The candidate optimizer; set lr/momentum/nesterov per step with :func:`set_runtime_hparams`.

    Args:
      clip_norm: global gradient-norm clip (reference: 1.0). Part of the compiled graph.
      accumulator_dtype: momentum dtype (reference: bfloat16); None keeps the params' dtype.
    """
    return optax.inject_hyperparams(
        _sgd_chain, static_args=("clip_norm", "accumulator_dtype"), hyperparam_dtype=jnp.float32
    )(
        learning_rate=0.0,
        momentum=0.0,
        nesterov=0.0,
        clip_norm=float(clip_norm),
        accumulator_dtype=accumulator_dtype,
    )


def set_runtime_hparams(opt_state, learning_rate, momentum, nesterov):
    """Returns ``opt_state`` with new runtime hyperparameters (works inside jit and vmap)."""
    hp = dict(opt_state.hyperparams)
    hp.update(
        learning_rate=jnp.asarray(learning_rate, jnp.float32),
        momentum=jnp.asarray(momentum, jnp.float32),
        nesterov=jnp.asarray(nesterov, jnp.float32),
    )
    return opt_state._replace(hyperparams=hp)


def get_momentum(opt_state) -> dict[str, Any]:
    """The momentum trace by component name (``opt_state`` of :func:`make_optimizer`)."""
    return dict(opt_state.inner_state[1].trace)


def set_momentum(opt_state, momentum: Mapping[str, Any]):
    """Returns ``opt_state`` whose momentum trace of the components in ``momentum`` is replaced."""
    chain = opt_state.inner_state
    trace = {**chain[1].trace, **momentum}
    inner = (chain[0], optax.TraceState(trace=trace), *chain[2:])
    return opt_state._replace(inner_state=inner)
