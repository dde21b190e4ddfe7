"""Population mode: G candidates of one architecture trained together, vmapped on one device.

The reference trains one candidate per accelerator core, all on the same data stream (§4.1,
§4.5). On a single device the same generation can run as one vmapped step: params, optimizer
states and the runtime hyperparameters (lr of each candidate's schedule, momentum, Nesterov) are
stacked along a leading axis, the batch is shared. Frozen components identical across candidates
(the same array objects, e.g. the shared root) are passed once, unstacked.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mu2net.models.base import Family, num_params
from mu2net.train import metrics as metrics_lib
from mu2net.train import steps as steps_lib
from mu2net.train.compile_cache import CompileCache, default_cache, tree_signature
from mu2net.train.optim import get_momentum, lr_schedule, make_optimizer, opt_hparams
from mu2net.train.trainer import (
    Batch,
    CandidateResult,
    CandidateTracker,
    TrainConfig,
    TrainError,
    _acc_dtype,
    _batch_key,
    _next_batch,
    check_path,
    pad_eval_batches,
    restore_momentum,
    to_host,
)


def _stack(trees: Sequence[Any]) -> Any:
    return jax.tree_util.tree_map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *trees)


def _index(tree: Any, i: int) -> Any:
    return jax.tree_util.tree_map(lambda x: x[i], tree)


def _frozen_stack(frozen: Mapping | Sequence[Mapping], g: int) -> tuple[dict, dict]:
    """Stacked frozen params and their vmap axes (None = shared by every candidate)."""
    if isinstance(frozen, Mapping):
        return {k: jax.device_put(v) for k, v in frozen.items()}, dict.fromkeys(frozen)
    if len(frozen) != g:
        raise TrainError(f"{len(frozen)} frozen dicts for {g} candidates")
    names = set(frozen[0])
    if any(set(f) != names for f in frozen):
        raise TrainError("population candidates must freeze the same components")
    out, axes = {}, {}
    for name in sorted(names):
        items = [f[name] for f in frozen]
        if all(x is items[0] for x in items):
            out[name], axes[name] = jax.device_put(items[0]), None
        else:
            out[name], axes[name] = _stack(items), 0
    return out, axes


def train_population(
    *,
    family: Family,
    hparams_list: Sequence[Mapping[str, Any]],
    trainable_list: Sequence[Mapping[str, Any]],
    frozen: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    momentum_list: Sequence[Mapping[str, Any] | None] | None = None,
    train_batches: Iterable[Batch],
    validation_batches: Sequence[Batch],
    config: TrainConfig,
    score_fns: Sequence[Callable[[float], float] | None] | None = None,
    baseline_scores: Sequence[float | None] | None = None,
    writer: Any = None,
    progress: bool = True,
    cache: CompileCache | None = None,
) -> list[CandidateResult]:
    """Trains G candidates sharing one architecture signature on the same batches (vmapped).

    Each candidate keeps its own schedule, momentum, Nesterov flag, best-snapshot rule
    (``score_fns[i]``, ``baseline_scores[i]``) and failure state; results match G sequential
    :func:`~mu2net.train.trainer.train_candidate` runs up to float reassociation.
    """
    g = len(hparams_list)
    if g == 0 or len(trainable_list) != g:
        raise TrainError(f"{len(trainable_list)} trainable dicts for {g} hparams")
    cache = default_cache() if cache is None else cache
    keys = {family.architecture_key(h) for h in hparams_list}
    sigs = {tree_signature(dict(t)) for t in trainable_list}
    if len(keys) > 1 or len(sigs) > 1:
        raise TrainError("population candidates must share architecture and trainable components")
    frozen_list = [frozen] * g if isinstance(frozen, Mapping) else list(frozen)
    for h, t, f in zip(hparams_list, trainable_list, frozen_list):
        check_path(family, h, t, f)
    s, v = int(config.steps_between_validations), int(config.num_validations)
    runtime = []
    for h in hparams_list:
        oh, lrs = opt_hparams(h), lr_schedule(h, s, v)
        runtime.append(
            np.stack(
                [
                    lrs,
                    np.full_like(lrs, oh["opt_momentum"]),
                    np.full_like(lrs, float(oh["opt_nesterov"])),
                ],
                axis=1,
            )
        )
    runtime = np.stack(runtime, axis=1)  # [N, G, 3]
    writer = metrics_lib.make_writer(writer)
    t_start, stats0 = time.perf_counter(), (cache.stats.compiles, cache.stats.compile_s)

    tx = make_optimizer(config.clip_norm, _acc_dtype(config))
    momentum_list = momentum_list or [None] * g
    trackers = [
        CandidateTracker(
            None if score_fns is None else score_fns[i],
            None if baseline_scores is None else baseline_scores[i],
        )
        for i in range(g)
    ]
    states = []
    for i, t in enumerate(trainable_list):
        state, restored = restore_momentum(
            tx.init(dict(t)), t, momentum_list[i], _acc_dtype(config)
        )
        states.append(state)
        trackers[i].result.momentum_restored = restored
        trackers[i].result.trainable_params = num_params(t)
    trainable = _stack([dict(t) for t in trainable_list])
    opt_state = _stack(states)
    frozen_dev, f_axes = _frozen_stack(frozen, g)
    hparams = dict(hparams_list[0])

    val = [{k: jnp.asarray(x) for k, x in b.items()} for b in pad_eval_batches(validation_batches)]
    it = iter(train_batches)
    batch = _next_batch(it, 0, s * v)
    base_key = (
        family.architecture_key(hparams),
        g,
        tuple(sorted(f_axes.items(), key=str)),
        tree_signature(trainable),
        tree_signature(frozen_dev),
    )
    step_fn = cache.get(
        "population_train",
        base_key + (_batch_key(batch), float(config.clip_norm), str(config.momentum_dtype)),
        lambda: jax.jit(
            jax.vmap(
                steps_lib.make_train_step(family, hparams, tx), in_axes=(0, 0, f_axes, None, 0)
            ),
            donate_argnums=(0, 1),
        ),
        trainable,
        opt_state,
        frozen_dev,
        batch,
        runtime[0],
    )
    params_axes = {**f_axes, **dict.fromkeys(trainable_list[0], 0)}
    eval_fn = cache.get(
        "population_eval",
        base_key + (_batch_key(val[0]),),
        lambda: jax.jit(
            jax.vmap(steps_lib.make_eval_step(family, hparams), in_axes=(params_axes, None))
        ),
        {**frozen_dev, **trainable},
        val[0],
    )
    alive = np.ones(g, bool)
    bar = metrics_lib.progress_bar(s * v, f"train population x{g}", progress)
    pending, step = None, 0
    while step < s * v and alive.any():
        if step > 0:
            batch = _next_batch(it, step, s * v)
        trainable, opt_state, m = step_fn(trainable, opt_state, frozen_dev, batch, runtime[step])
        if pending is not None:
            _check_losses(np.asarray(pending["loss"]), step - 1, trackers, alive)
        pending, step = m, step + 1
        bar.update(1)
        if step % s == 0 or step == s * v:
            _check_losses(np.asarray(pending["loss"]), step - 1, trackers, alive)
            params = {**frozen_dev, **trainable}
            correct = sum(np.asarray(eval_fn(params, b)[0], np.int64) for b in val)
            count = sum(int(np.sum(b["mask"])) for b in val)
            for i in np.flatnonzero(alive):
                trackers[i].observe(
                    step,
                    float(correct[i]) / count,
                    lambda i=i, t=trainable, o=opt_state: (
                        to_host(_index(t, i)),
                        to_host(_index(get_momentum(o), i)),
                    ),
                )
            metrics_lib.write_scalars(
                writer,
                step,
                {
                    f"population/{i}/validation_accuracy": float(correct[i]) / count
                    for i in range(g)
                },
            )
    bar.close()
    results = []
    timings = {
        "compile_s": cache.stats.compile_s - stats0[1],
        "total_s": time.perf_counter() - t_start,
    }
    for tr in trackers:
        r = tr.finish()
        r.steps, r.examples_seen = step, step * batch["inputs"].shape[0]
        r.num_compiles = cache.stats.compiles - stats0[0]
        r.timings = dict(timings)
        results.append(r)
    return results


def _check_losses(losses: np.ndarray, step: int, trackers, alive: np.ndarray) -> None:
    for i in np.flatnonzero(alive):
        if not math.isfinite(float(losses[i])):
            trackers[i].fail(step, float(losses[i]))
            alive[i] = False
