"""What one candidate's training will cost, known before it trains.

A compute budget (``EvolutionConfig.budget_flops`` / ``budget_seconds``) is spent by choosing
how long each candidate trains, and the learning-rate schedule needs that length up front. So
:func:`step_cost` compiles the candidate's train and eval steps (through the same compile cache
the trainer uses, so the compile is not wasted) and reads their FLOPs from XLA's cost analysis;
with ``measure=True`` it also times a few steps on copies of the parameters.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mu2net.models.base import Family
from mu2net.train.compile_cache import CompileCache, call_flops, default_cache
from mu2net.train.optim import make_optimizer
from mu2net.train.partitioning import Partitioner, default_partitioner
from mu2net.train.trainer import (
    TrainConfig,
    accumulator_dtype,
    eval_executable,
    pad_eval_batches,
    prepare_batch,
    step_trees,
    train_executable,
)

_TIMED_STEPS = 3


@dataclasses.dataclass(frozen=True)
class StepCost:
    """Per-step costs of one candidate (XLA FLOPs; seconds measured on this machine).

    Attributes:
      train_flops: one train step.
      eval_flops: one pass over the validation batches.
      train_seconds: one train step (0 unless measured).
      eval_seconds: one validation pass (0 unless measured).
    """

    train_flops: float
    eval_flops: float
    train_seconds: float = 0.0
    eval_seconds: float = 0.0

    def interval(self, steps_between_validations: int, unit: str) -> float:
        """Cost of S train steps and one validation, in ``"flops"`` or ``"seconds"``."""
        if unit == "flops":
            return steps_between_validations * self.train_flops + self.eval_flops
        return steps_between_validations * self.train_seconds + self.eval_seconds


def step_cost(
    *,
    family: Family,
    hparams: Mapping[str, Any],
    trainable: Mapping[str, Any],
    frozen: Mapping[str, Any],
    batch: Mapping[str, Any],
    validation_batches: Sequence[Mapping[str, Any]],
    config: TrainConfig,
    measure: bool = False,
    partitioner: Partitioner | None = None,
    cache: CompileCache | None = None,
) -> StepCost:
    """The :class:`StepCost` of training this split of a path as :func:`train_candidate` does."""
    partitioner = default_partitioner() if partitioner is None else partitioner
    cache = default_cache() if cache is None else cache
    tx = make_optimizer(config.clip_norm, accumulator_dtype(config))
    step_trainable, step_frozen, mask = step_trees(
        family, hparams, trainable, frozen, config, partitioner
    )
    trainable_dev = partitioner.put(step_trainable, copy=True)
    frozen_dev = partitioner.put(step_frozen, copy=False)
    opt_state = partitioner.put(tx.init(trainable_dev), copy=True)
    batch_dev = partitioner.shard_batch(prepare_batch(batch))
    step_fn = train_executable(
        family, hparams, trainable_dev, opt_state, frozen_dev, batch_dev, tx, config,
        partitioner, cache, mask,
    )  # fmt: skip
    val = [partitioner.shard_batch(b) for b in pad_eval_batches(validation_batches)]
    params = {**frozen_dev, **trainable_dev}
    eval_fn = eval_executable(family, hparams, params, val[0], partitioner, cache)
    extra = () if mask is None else (mask,)
    # The step's runtime hparams (lr, momentum, nesterov): values never change its cost.
    runtime = jax.device_put(jnp.asarray([0.0, 0.9, 0.0], jnp.float32), partitioner.replicated)
    train_flops = call_flops(
        step_fn, trainable_dev, opt_state, frozen_dev, batch_dev, runtime, *extra
    )
    eval_flops = call_flops(eval_fn, params, val[0]) * len(val)
    train_s = eval_s = 0.0
    if measure:
        # Train steps donate their inputs: time them on copies, never on the real params.
        t, o = partitioner.put(step_trainable, copy=True), opt_state
        t, o, m = step_fn(t, o, frozen_dev, batch_dev, runtime, *extra)  # compile + warm-up
        jax.block_until_ready(m)
        t0 = time.perf_counter()
        for _ in range(_TIMED_STEPS):
            t, o, m = step_fn(t, o, frozen_dev, batch_dev, runtime, *extra)
        jax.block_until_ready(m)
        train_s = (time.perf_counter() - t0) / _TIMED_STEPS
        jax.block_until_ready(eval_fn(params, val[0]))  # compile
        t0 = time.perf_counter()
        jax.block_until_ready([eval_fn(params, b) for b in val])
        eval_s = time.perf_counter() - t0
    return StepCost(train_flops, eval_flops, train_s, eval_s)


def fit_validations(budget: float, cost: StepCost, steps_between: int, unit: str) -> int:
    """The most validation intervals (>= 1) whose cost fits in ``budget``."""
    per = cost.interval(steps_between, unit)
    if per <= 0 or not np.isfinite(per):
        return 1
    return max(1, int(budget // per))
