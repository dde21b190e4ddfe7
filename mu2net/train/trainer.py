"""Trains one candidate path on one task (reference §3.5 optimizer, §4.5 training/validation).

:func:`train_candidate` differentiates only the ``trainable`` components (frozen ones enter the
step as constants), runs ``N = S * V`` SGD steps with the candidate's schedule, validates every S
steps on fixed validation batches, and keeps the best snapshot (trainable params + momentum, on
the host) whenever ``score >= best_score`` (µ2Net's rule; ``best_score`` starts at the parent's
score for a same-task parent, else -inf). Numeric hyperparameters are runtime values of one
cached executable per architecture (:mod:`mu2net.train.compile_cache`).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mu2net.errors import Mu2netError
from mu2net.models.base import Family, FamilyError, num_params
from mu2net.train import metrics as metrics_lib
from mu2net.train import steps as steps_lib
from mu2net.train._gin import gin
from mu2net.train.compile_cache import (
    CompileCache,
    default_cache,
    executable_flops,
    tree_signature,
)
from mu2net.train.optim import get_momentum, lr_schedule, make_optimizer, opt_hparams, set_momentum
from mu2net.train.partitioning import Partitioner, default_partitioner

Batch = Mapping[str, Any]
_MAX_INFLIGHT = 3  # train steps the host may run ahead of the device


class TrainError(Mu2netError, ValueError):
    """Bad trainer input: an incompatible path, a short data stream, a bad batch."""


@gin.configurable
@dataclasses.dataclass
class TrainConfig:
    """Loop sizes and fixed optimizer settings of one candidate's training.

    Attributes:
      batch_size: training examples per step (the data glue batches with it; checked).
      steps_between_validations: S, train steps between two validations.
      num_validations: V, validations per candidate (N = S * V steps in all).
      seed: seeds data order and fresh components in the binaries (training is deterministic).
      clip_norm: global gradient-norm clip (reference: 1.0).
      momentum_dtype: momentum accumulator dtype (reference: bfloat16; None = params' dtype).
      suffix_executable: compile one train step per lowest trainable component instead of
        one per trainable set. Frozen components between the lowest trainable one and the
        output are then differentiated too, with their gradient and update masked to zero at
        run time (their params come back bit-identical), so candidates that clone different
        components above the same lowest one share one executable. Trades their weight
        gradients for a compile per distinct clone set (evolution turns it on).
    """

    batch_size: int = 32
    steps_between_validations: int = 100
    num_validations: int = 5
    seed: int = 0
    clip_norm: float = 1.0
    momentum_dtype: str | None = "bfloat16"
    suffix_executable: bool = False

    @property
    def total_steps(self) -> int:
        """N = S * V."""
        return int(self.steps_between_validations) * int(self.num_validations)


@dataclasses.dataclass
class CandidateResult:
    """Outcome of training one candidate (reference §4.5)."""

    improved: bool = False
    failed: bool = False
    failure_reason: str | None = None
    quality: float | None = None  # max validation accuracy
    score: float | None = None  # best score over validations
    evals: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    best_trainable: dict[str, Any] | None = None  # host numpy, by component
    best_momentum: dict[str, Any] | None = None  # host numpy, by component
    best_step: int | None = None
    steps: int = 0
    examples_seen: int = 0
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    num_compiles: int = 0
    trainable_params: int = 0
    momentum_restored: list[str] = dataclasses.field(default_factory=list)
    flops: dict[str, float] = dataclasses.field(default_factory=dict)  # executed, by kind


def to_host(tree: Any) -> Any:
    """A host numpy copy of a pytree (never a view of a device buffer that may be donated)."""
    return jax.tree_util.tree_map(lambda x: np.array(x, copy=True), tree)


def prepare_batch(batch: Batch) -> dict[str, np.ndarray]:
    """``{'inputs', 'targets'}`` with integer targets flattened to ``[B]`` (seqio: ``[B, 1]``)."""
    try:
        inputs, targets = batch["inputs"], batch["targets"]
    except (KeyError, TypeError) as e:
        raise TrainError(
            f"a batch must be a dict with 'inputs' and 'targets'; got {batch!r:.80}"
        ) from e
    inputs = np.asarray(inputs)
    targets = np.asarray(targets)
    if targets.ndim == 2 and targets.shape[1] == 1:
        targets = targets[:, 0]
    if targets.ndim != 1 or targets.shape[0] != inputs.shape[0]:
        raise TrainError(
            f"targets of shape {targets.shape} do not match inputs of shape {inputs.shape}"
        )
    return {"inputs": inputs, "targets": targets.astype(np.int32)}


def pad_eval_batches(
    batches: Iterable[Batch], multiple: int = 1, batch_size: int | None = None
) -> list[dict[str, np.ndarray]]:
    """Eval batches padded to one size (a multiple of ``multiple``) with a 0/1 ``mask``.

    One size means one compiled eval step; the mask weights a partial last batch correctly.
    """
    out = [prepare_batch(b) for b in batches]
    if not out:
        raise TrainError("no evaluation batches (empty validation/test split?)")
    size = batch_size or max(b["inputs"].shape[0] for b in out)
    size = int(math.ceil(size / multiple) * multiple)
    padded = []
    for b in out:
        n = b["inputs"].shape[0]
        if n > size:
            raise TrainError(f"eval batch of {n} examples exceeds the eval batch size {size}")
        pad = size - n
        padded.append(
            {
                "inputs": np.concatenate(
                    [b["inputs"], np.zeros((pad, *b["inputs"].shape[1:]), b["inputs"].dtype)]
                ),
                "targets": np.concatenate([b["targets"], np.zeros((pad,), np.int32)]),
                "mask": np.concatenate([np.ones((n,), np.int32), np.zeros((pad,), np.int32)]),
            }
        )
    return padded


def check_path(
    family: Family, hparams: Mapping[str, Any], trainable: Mapping, frozen: Mapping
) -> None:
    """Raises :class:`TrainError` naming the components when the split does not fit the family."""
    both = set(trainable) & set(frozen)
    if both:
        raise TrainError(f"components both trainable and frozen: {sorted(both)}")
    want = list(family.component_names(hparams))
    have = set(trainable) | set(frozen)
    missing, extra = [n for n in want if n not in have], sorted(have - set(want))
    if missing or extra:
        raise TrainError(
            f"path does not fit family {family.name!r} with these hparams: "
            f"missing components {missing}, unexpected components {extra}"
        )
    if not trainable:
        raise TrainError("no trainable component: nothing to train")


def _batch_key(batch: Mapping[str, Any]) -> tuple:
    return tuple(
        sorted((k, tuple(np.shape(v)), str(np.asarray(v).dtype)) for k, v in batch.items())
    )


def eval_executable(family, hparams, params, batch, partitioner: Partitioner, cache: CompileCache):
    """Compiled ``eval(params, batch) -> (num_correct, predictions)`` for this signature."""
    p_sh = partitioner.tree_shardings(params)
    b_sh = {k: partitioner.batch for k in batch}
    key = (
        family.architecture_key(hparams),
        tree_signature(params),
        _batch_key(batch),
        partitioner.key,
    )
    return cache.get(
        "eval",
        key,
        lambda: jax.jit(
            steps_lib.make_eval_step(family, hparams),
            in_shardings=(p_sh, b_sh),
            out_shardings=(partitioner.replicated, partitioner.batch),
        ),
        params,
        batch,
    )


def _run_eval(family, hparams, params, batches, partitioner, cache, flops=None):
    """Accuracy and predictions over padded eval batches already on device.

    With a ``flops`` dict, the FLOPs executed are added to its ``"eval"`` entry.
    """
    fn = eval_executable(family, hparams, params, batches[0], partitioner, cache)
    outs = [fn(params, b) for b in batches]
    if flops is not None:
        flops["eval"] = flops.get("eval", 0.0) + executable_flops(fn) * len(batches)
    correct = sum(int(c) for c, _ in outs)
    count = sum(int(np.sum(b["mask"])) for b in batches)
    preds = [np.asarray(p)[np.asarray(b["mask"]) > 0] for (_, p), b in zip(outs, batches)]
    return correct / max(count, 1), np.concatenate(preds)


def evaluate(
    family: Family,
    hparams: Mapping[str, Any],
    params: Mapping[str, Any],
    batches: Iterable[Batch],
    *,
    partitioner: Partitioner | None = None,
    cache: CompileCache | None = None,
) -> tuple[float, np.ndarray]:
    """Top-1 accuracy and predicted classes of a full path on ``batches`` (e.g. the test split).

    A partial last batch is padded and masked, so every example counts exactly once (§4.8).
    """
    partitioner = default_partitioner() if partitioner is None else partitioner
    cache = default_cache() if cache is None else cache
    padded = pad_eval_batches(batches, partitioner.num_data)
    params = partitioner.put(dict(params), copy=False)
    device_batches = [partitioner.shard_batch(b) for b in padded]
    return _run_eval(family, hparams, params, device_batches, partitioner, cache)


def predict_logits(
    family: Family,
    hparams: Mapping[str, Any],
    params: Mapping[str, Any],
    inputs: np.ndarray,
    *,
    batch_size: int = 256,
    partitioner: Partitioner | None = None,
    cache: CompileCache | None = None,
) -> np.ndarray:
    """Float32 logits ``[N, num_classes]`` of a full path on ``inputs`` ``[N, ...]``."""
    partitioner = default_partitioner() if partitioner is None else partitioner
    cache = default_cache() if cache is None else cache
    inputs = np.asarray(inputs)
    n = inputs.shape[0]
    size = int(math.ceil(min(batch_size, max(n, 1)) / partitioner.num_data) * partitioner.num_data)
    params = partitioner.put(dict(params), copy=False)
    p_sh = partitioner.tree_shardings(params)
    example = jax.ShapeDtypeStruct((size, *inputs.shape[1:]), inputs.dtype)
    key = (
        family.architecture_key(hparams),
        tree_signature(params),
        example.shape,
        str(example.dtype),
        partitioner.key,
    )
    fn = cache.get(
        "logits",
        key,
        lambda: jax.jit(
            steps_lib.make_logits_step(family, hparams),
            in_shardings=(p_sh, partitioner.batch),
            out_shardings=partitioner.batch,
        ),
        params,
        jax.ShapeDtypeStruct(example.shape, example.dtype, sharding=partitioner.batch),
    )
    out = []
    for start in range(0, n, size):
        chunk = inputs[start : start + size]
        m = chunk.shape[0]
        if m < size:
            chunk = np.concatenate([chunk, np.zeros((size - m, *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(fn(params, jax.device_put(chunk, partitioner.batch)))[:m])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


class CandidateTracker:
    """Validation bookkeeping of one candidate: evals, best score, snapshot, failure."""

    def __init__(self, score_fn: Callable[[float], float] | None, baseline_score: float | None):
        self.score_fn = score_fn or (lambda q: q)
        self.best_score = -math.inf if baseline_score is None else float(baseline_score)
        self.result = CandidateResult()
        self.top_score = -math.inf

    @property
    def failed(self) -> bool:
        """Whether the candidate stopped on a non-finite loss."""
        return self.result.failed

    def fail(self, step: int, loss: float) -> None:
        """Marks a non-finite loss; the candidate is then discarded (no snapshot is used)."""
        self.result.failed = True
        self.result.failure_reason = f"non-finite training loss {loss} at step {step}"

    def observe(self, step: int, quality: float, snapshot: Callable[[], tuple[Any, Any]]) -> bool:
        """Records a validation; takes a snapshot if ``score >= best_score``. Returns that."""
        r = self.result
        r.evals.append((int(step), float(quality)))
        score = float(self.score_fn(quality))
        r.quality = quality if r.quality is None else max(r.quality, quality)
        self.top_score = max(self.top_score, score)
        r.score = self.top_score
        if score >= self.best_score:
            self.best_score = score
            r.best_trainable, r.best_momentum = snapshot()
            r.best_step = int(step)
            return True
        return False

    def finish(self) -> CandidateResult:
        """Final result; a failed candidate never counts as improved."""
        r = self.result
        if r.failed:
            r.best_trainable = r.best_momentum = None
        r.improved = r.best_trainable is not None
        return r


def restore_momentum(opt_state, trainable: Mapping, momentum: Mapping | None, dtype):
    """Overwrites the fresh momentum of trainable components that carry one (§3.5).

    Components not trainable here, or whose shapes changed (e.g. an adapted posembed), keep a
    fresh zero trace. Returns ``(opt_state, restored component names)``.
    """
    if not momentum:
        return opt_state, []
    restored = {}
    for name, trace in momentum.items():
        if name not in trainable or trace is None:
            continue
        shapes = jax.tree_util.tree_map(np.shape, trace)
        if shapes != jax.tree_util.tree_map(np.shape, trainable[name]):
            continue
        restored[name] = jax.tree_util.tree_map(
            lambda t, p: jnp.asarray(t, dtype or np.asarray(p).dtype), trace, trainable[name]
        )
    return set_momentum(opt_state, restored), sorted(restored)


def suffix_components(
    family: Family, hparams: Mapping[str, Any], trainable: Iterable[str]
) -> list[str]:
    """Components from the lowest trainable one to the output, in the order they are applied.

    The order is the family's stages when it has them, else ``component_names`` (for a family
    whose names are not in application order the result is merely larger, never wrong: every
    extra component is masked).
    """
    stages = family.stages(hparams)
    order = [n for st in stages for n in st] if stages else list(family.component_names(hparams))
    names = set(trainable)
    first = min((i for i, n in enumerate(order) if n in names), default=0)
    return order[first:] + sorted(names - set(order))


def step_trees(
    family: Family,
    hparams: Mapping[str, Any],
    trainable: Mapping[str, Any],
    frozen: Mapping[str, Any],
    config: TrainConfig,
    partitioner: Partitioner,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """(differentiated, constant, mask or None) trees of the train step for this split.

    With :attr:`TrainConfig.suffix_executable` the differentiated tree is widened to every
    component from the lowest trainable one up, and the mask zeroes the frozen ones' updates.
    """
    if not config.suffix_executable:
        return dict(trainable), dict(frozen), None
    widened = suffix_components(family, hparams, trainable)
    step_trainable = {n: trainable[n] if n in trainable else frozen[n] for n in widened}
    step_frozen = {n: p for n, p in frozen.items() if n not in step_trainable}
    mask = {
        n: jax.device_put(np.float32(n in trainable), partitioner.replicated)
        for n in step_trainable
    }
    return step_trainable, step_frozen, mask


def accumulator_dtype(config: TrainConfig):
    """The momentum accumulator dtype of ``config`` (None: the params' own dtype)."""
    return jnp.dtype(config.momentum_dtype) if config.momentum_dtype else None


def train_executable(
    family,
    hparams,
    trainable,
    opt_state,
    frozen,
    batch,
    tx,
    config,
    partitioner: Partitioner,
    cache: CompileCache,
    mask=None,
):
    """Compiled train step for this architecture signature (one per signature, ever).

    With ``mask`` (component name -> 0/1 float32 scalar, see
    :attr:`TrainConfig.suffix_executable`) the step takes it as a sixth, runtime argument.
    """
    t_sh = partitioner.tree_shardings(trainable)
    o_sh = partitioner.tree_shardings(opt_state)
    f_sh = partitioner.tree_shardings(frozen)
    b_sh = {k: partitioner.batch for k in batch}
    key = (
        family.architecture_key(hparams),
        tuple(sorted(trainable)),
        tuple(sorted(frozen)),
        tree_signature(trainable),
        tree_signature(frozen),
        _batch_key(batch),
        float(config.clip_norm),
        str(config.momentum_dtype),
        partitioner.key,
        mask is not None,
    )
    hp = jax.ShapeDtypeStruct((3,), jnp.float32, sharding=partitioner.replicated)
    masked = () if mask is None else (mask,)
    return cache.get(
        "train",
        key,
        lambda: jax.jit(
            steps_lib.make_train_step(family, hparams, tx, masked=mask is not None),
            in_shardings=(t_sh, o_sh, f_sh, b_sh) + (partitioner.replicated,) * (1 + len(masked)),
            out_shardings=(t_sh, o_sh, partitioner.replicated),
            donate_argnums=(0, 1),
        ),
        trainable,
        opt_state,
        frozen,
        batch,
        hp,
        *masked,
    )


def _next_batch(it: Iterator, step: int, total: int) -> dict[str, np.ndarray]:
    try:
        return prepare_batch(next(it))
    except StopIteration:
        raise TrainError(
            f"train_batches ran out after {step} of {total} steps; pass a repeating stream"
        ) from None


def train_candidate(
    *,
    family: Family,
    hparams: Mapping[str, Any],
    trainable: Mapping[str, Any],
    frozen: Mapping[str, Any],
    momentum: Mapping[str, Any] | None = None,
    train_batches: Iterable[Batch],
    validation_batches: Sequence[Batch],
    config: TrainConfig,
    score_fn: Callable[[float], float] | None = None,
    baseline_score: float | None = None,
    writer: Any = None,
    progress: bool = True,
    partitioner: Partitioner | None = None,
    cache: CompileCache | None = None,
    quality_fn: Callable[[np.ndarray, np.ndarray], float] | None = None,
) -> CandidateResult:
    """Trains one candidate path for ``N = S * V`` steps and keeps its best snapshot.

    Args:
      family: the model family of the path.
      hparams: the path's hparams (architecture keys and ``opt_*``, reference §3.5).
      trainable: component name -> params of the unlocked (cloned/new) components.
      frozen: component name -> params of shared, locked components (never modified).
      momentum: component name -> momentum trace carried over from the parent (cloned ones).
      train_batches: iterator of ``{'inputs', 'targets'}`` numpy batches (at least N of them).
      validation_batches: the fixed validation batches (same examples at every validation).
      config: loop sizes and fixed optimizer settings.
      score_fn: quality -> score (default: identity, i.e. s = 1 in §4.7).
      baseline_score: best score to beat-or-equal (the parent's, same task); None = -inf.
      writer: a clu ``MetricWriter`` or a logdir string for TensorBoard scalars, or None.
      progress: show a tqdm progress bar.
      partitioner: device mesh (default: every device on the data axis).
      cache: compile cache (default: the process-wide one).
      quality_fn: ``(targets, predictions) -> quality`` on the validation labels (a task's
        own metric, higher is better); default top-1 accuracy.

    Returns:
      A :class:`CandidateResult`; ``best_trainable``/``best_momentum`` are host numpy copies.
    """
    t_start = time.perf_counter()
    partitioner = default_partitioner() if partitioner is None else partitioner
    cache = default_cache() if cache is None else cache
    check_path(family, hparams, trainable, frozen)
    oh = opt_hparams(hparams)
    s, v = int(config.steps_between_validations), int(config.num_validations)
    if s < 1 or v < 1:
        raise TrainError(f"steps_between_validations={s} and num_validations={v} must be >= 1")
    lrs = lr_schedule(hparams, s, v)
    runtime = np.stack(
        [lrs, np.full_like(lrs, oh["opt_momentum"]), np.full_like(lrs, float(oh["opt_nesterov"]))],
        axis=1,
    )
    writer = metrics_lib.make_writer(writer)
    stats0 = (cache.stats.compiles, cache.stats.compile_s)
    timings = dict.fromkeys(("data_s", "train_s", "eval_s"), 0.0)

    tx = make_optimizer(config.clip_norm, accumulator_dtype(config))
    step_trainable, step_frozen, mask = step_trees(
        family, hparams, trainable, frozen, config, partitioner
    )
    trainable_dev = partitioner.put(step_trainable, copy=True)
    frozen_dev = partitioner.put(step_frozen, copy=False)
    opt_state, restored = restore_momentum(
        tx.init(trainable_dev), trainable, momentum, accumulator_dtype(config)
    )
    opt_state = partitioner.put(opt_state, copy=True)
    tracker = CandidateTracker(score_fn, baseline_score)
    tracker.result.trainable_params = num_params(trainable)
    tracker.result.momentum_restored = restored

    t0 = time.perf_counter()
    val = pad_eval_batches(validation_batches, partitioner.num_data)
    val_dev = [partitioner.shard_batch(b) for b in val]
    val_targets = np.concatenate([b["targets"][b["mask"] > 0] for b in val])
    it = iter(train_batches)
    batch = _next_batch(it, 0, s * v)
    batch_size = batch["inputs"].shape[0]
    partitioner.check_batch_size(batch_size, "training batch")
    timings["data_s"] += time.perf_counter() - t0
    step_fn = train_executable(
        family,
        hparams,
        trainable_dev,
        opt_state,
        frozen_dev,
        partitioner.shard_batch(batch),
        tx,
        config,
        partitioner,
        cache,
        mask,
    )
    extra_args = () if mask is None else (mask,)

    def snapshot(t, o):
        # Masked (frozen) components are not part of the result: they never changed.
        mom = get_momentum(o)
        return (
            to_host({n: v for n, v in t.items() if n in trainable}),
            to_host({n: v for n, v in mom.items() if n in trainable}),
        )

    flops: dict[str, float] = {}
    bar = metrics_lib.progress_bar(s * v, f"train {family.name}", progress)
    interval, step, t_interval = [], 0, time.perf_counter()
    unchecked: collections.deque = collections.deque()
    while step < s * v and not tracker.failed:
        t0 = time.perf_counter()
        if step > 0:
            batch = _next_batch(it, step, s * v)
        batch_dev = partitioner.shard_batch(batch)
        t1 = time.perf_counter()
        trainable_dev, opt_state, m = step_fn(
            trainable_dev, opt_state, frozen_dev, batch_dev, runtime[step], *extra_args
        )
        # Check losses without stalling the pipeline: those already computed, and block only
        # when more than _MAX_INFLIGHT steps are queued (bounds device memory for batches).
        unchecked.append((step, m["loss"]))
        while unchecked and (len(unchecked) > _MAX_INFLIGHT or unchecked[0][1].is_ready()):
            done, loss = unchecked.popleft()
            loss = float(loss)
            if not math.isfinite(loss):
                tracker.fail(done, loss)
                break
        interval.append(m)
        step += 1
        bar.update(1)
        t2 = time.perf_counter()
        timings["data_s"] += t1 - t0
        timings["train_s"] += t2 - t1
        if step % s == 0 or step == s * v:
            while unchecked and not tracker.failed:
                done, loss = unchecked.popleft()
                if not math.isfinite(float(loss)):
                    tracker.fail(done, float(loss))
            if tracker.failed:
                break
            t3 = time.perf_counter()
            train_metrics = jax.device_get(interval)
            timings["train_s"] += time.perf_counter() - t3  # waits for the steps to finish
            elapsed = time.perf_counter() - t_interval
            t3 = time.perf_counter()
            params = {**frozen_dev, **trainable_dev}
            acc, preds = _run_eval(family, hparams, params, val_dev, partitioner, cache, flops)
            quality = acc if quality_fn is None else float(quality_fn(val_targets, preds))
            took = tracker.observe(
                step,
                quality,
                lambda t=trainable_dev, o=opt_state: snapshot(t, o),
            )
            timings["eval_s"] += time.perf_counter() - t3
            metrics_lib.write_scalars(
                writer,
                step,
                {
                    "train/loss": np.mean([x["loss"] for x in train_metrics]),
                    "train/accuracy": np.mean([x["accuracy"] for x in train_metrics]),
                    "train/lr": runtime[step - 1, 0],
                    "train/steps_per_s": len(interval) / max(elapsed, 1e-9),
                    "train/examples_per_s": len(interval) * batch_size / max(elapsed, 1e-9),
                    "validation/accuracy": acc,
                    "validation/quality": quality,
                    "validation/snapshot": float(took),
                },
            )
            bar.set_postfix(val=f"{quality:.4f}", best=f"{tracker.result.quality:.4f}")
            interval, t_interval = [], time.perf_counter()
    bar.close()
    if writer is not None:
        writer.flush()

    result = tracker.finish()
    result.steps = step
    result.examples_seen = step * batch_size
    # XLA's count for the executables that ran: train steps (frozen parts' forward included,
    # unless served from a prefix cache) and validation passes.
    flops["train"] = executable_flops(step_fn) * step if step else 0.0
    result.flops = flops
    result.num_compiles = cache.stats.compiles - stats0[0]
    timings["compile_s"] = cache.stats.compile_s - stats0[1]
    timings["total_s"] = time.perf_counter() - t_start
    result.timings = timings
    return result


def split_path(
    params: Mapping[str, Any], trainable_names: Iterable[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Splits a full path's params into ``(trainable, frozen)`` by component name."""
    names = set(trainable_names)
    unknown = sorted(names - set(params))
    if unknown:
        raise FamilyError(f"unknown components {unknown}; the path has {sorted(params)}")
    return (
        {k: v for k, v in params.items() if k in names},
        {k: v for k, v in params.items() if k not in names},
    )
