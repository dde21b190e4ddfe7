"""Training one proposed child on its generation's data (reference §4.5).

The generation's data (:class:`GenerationData`) is built once and shared by every candidate of
the generation: one training stream, one validation set, and the frozen-prefix activations
when the inputs are deterministic. :func:`train_proposal` trains one child through
:func:`mu2net.train.trainer.train_candidate` with keep-best against its parent's score, and
returns the history record plus the improved path (or None: its components are dropped).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any

import numpy as np

from mu2net.errors import Mu2netError
from mu2net.evolution import data as evo_data
from mu2net.evolution.budget import Budget, Spending
from mu2net.evolution.prefix import PrefixCache, deterministic_inputs, suffix_plan
from mu2net.evolution.strategy import (
    GenerationSpec,
    IterationContext,
    Proposal,
    finite_or_none,
)
from mu2net.system.state import Path
from mu2net.train.batching import validation_batches


class IterationFailed(Mu2netError, RuntimeError):
    """Every candidate of a task iteration failed (NaN loss, ...); nothing was published."""


@dataclasses.dataclass
class GenerationData:
    """The data every candidate of one generation trains and validates on."""

    stream: evo_data.TrainStream
    val: list[dict]
    steps_between: int
    prefix: PrefixCache | None


def validation_settings(ctx: IterationContext) -> dict[str, Any]:
    """How a quality was measured; qualities measured otherwise are not comparable."""
    cfg = ctx.config
    settings = {
        "split": "validation",
        "examples": int(cfg.validation_examples),
        "batch_size": int(cfg.batch_size),
    }
    if cfg.quality_metric != "accuracy":  # accuracy stays implicit: older stores recorded none
        settings["metric"] = cfg.quality_metric
    return settings


def quality_metric(ctx: IterationContext):
    """(name, ``fn(targets, predictions)`` or None for top-1 accuracy) of the scorer."""
    from mu2net.tasks.metrics import named_metric

    name = ctx.config.quality_metric
    if name == "accuracy":
        return name, None
    return named_metric(ctx.task, name)


def steps_between(ctx: IterationContext) -> int:
    """S for the active task (reference §4.5); errors name a train split that is too small."""
    from mu2net.evolution.config import ConfigError

    cfg = ctx.config
    size = ctx.info.split_sizes.get("train")
    # A split of unknown size (a TFDS source read lazily) is taken as at least the cap; an
    # empty one fails later, naming the split, when its first batch is read.
    num_train = cfg.train_examples_between_validations if size is None else int(size)
    if num_train < cfg.batch_size:
        raise ConfigError(
            f"task {ctx.task!r}: train split has {num_train} examples, fewer than "
            f"batch_size={cfg.batch_size}"
        )
    return evo_data.steps_between_validations(
        num_train, cfg.train_examples_between_validations, cfg.batch_size
    )


def validation_data(ctx: IterationContext, ds: dict[str, Any]) -> list[dict]:
    """The fixed validation batches of the active task under dataset hparams ``ds``."""
    cfg = ctx.config
    arrays = evo_data.eval_arrays(ctx.task, "validation", ctx.family, ds, cfg.validation_examples)
    return validation_batches(arrays, cfg.batch_size, cfg.validation_examples)


def generation_data(
    ctx: IterationContext, gen: GenerationSpec, num_validations: int
) -> GenerationData:
    """Builds the stream, the validation set and the prefix cache of one generation."""
    cfg = ctx.config
    s_between = steps_between(ctx)
    stream = evo_data.TrainStream(
        ctx.task,
        ctx.family,
        gen.ds,
        cfg.batch_size,
        s_between * num_validations,
        seed=int(gen.rng.integers(2**31)),
    )
    val = validation_data(ctx, gen.ds)
    prefix = None
    if cfg.prefix_cache and stream.materialized and deterministic_inputs(gen.ds):
        prefix = PrefixCache(ctx.family, list(stream), val, ctx.activations)
    return GenerationData(stream, val, s_between, prefix)


def train_config(ctx: IterationContext, steps: int, num_validations: int | None, seed: int):
    """The :class:`~mu2net.train.trainer.TrainConfig` of a candidate of this iteration."""
    from mu2net.train.trainer import TrainConfig

    cfg = ctx.config
    return TrainConfig(
        batch_size=cfg.batch_size,
        steps_between_validations=steps,
        num_validations=num_validations or cfg.num_validations,
        seed=seed,
        suffix_executable=cfg.suffix_executables,
    )


def size_to_budget(
    ctx: IterationContext, gen: GenerationSpec, proposals: list[Proposal], spending: Spending
) -> None:
    """Sets ``num_validations`` of proposals that take a share of the compute budget.

    Each gets the most validation intervals whose cost (its compiled step's, see
    :func:`mu2net.train.cost.step_cost`) fits its share of what is left, in every bounded unit.
    """
    from mu2net.train.cost import fit_validations, step_cost

    budget = Budget.of(ctx.config)
    sized = [p for p in proposals if p.budget_share is not None]
    if not sized or not budget.active:
        return
    s_between = steps_between(ctx)
    val = validation_data(ctx, gen.ds)
    size = ctx.config.batch_size
    batch = {
        "inputs": ctx.family.dummy_inputs(gen.ds, size),
        "targets": np.zeros((size,), np.int32),
    }
    for proposal in sized:
        cost = step_cost(
            family=ctx.family, hparams=proposal.child.path.hparams,
            trainable=proposal.child.trainable, frozen=proposal.child.frozen, batch=batch,
            validation_batches=val, config=train_config(ctx, s_between, 1, 0),
            measure="seconds" in budget.limits(),
        )  # fmt: skip
        proposal.num_validations = min(
            fit_validations(spending.left(budget, u) * proposal.budget_share, cost, s_between, u)
            for u in budget.limits()
        )


def train_proposal(
    ctx: IterationContext, gen: GenerationSpec, data: GenerationData, proposal: Proposal
) -> tuple[dict[str, Any], Path | None]:
    """Trains one child; returns (history record, improved path or None)."""
    from mu2net.train.trainer import train_candidate

    cfg, system = ctx.config, ctx.system
    parent, child = proposal.parent, proposal.child
    path = child.path
    path.metrics["created"] = time.time()
    if cfg.flops_base:
        # The FLOPs factor enters the candidate's score during training as it does the
        # parent's, so acceptance compares like with like.
        path.metrics["flops"] = ctx.family.flops(path.hparams)
    same_task = parent.task == ctx.task
    baseline = ctx.score(parent, None) if same_task else -math.inf
    if cfg.strict_improvement and same_task:
        baseline = math.nextafter(baseline, math.inf)
    train_cfg = train_config(
        ctx, data.steps_between, proposal.num_validations, int(gen.rng.integers(2**31))
    )
    train_family, frozen, batches, val_batches = suffix_plan(
        data.prefix, ctx.family, path.hparams, path.components, child.trainable,
        child.frozen, data.stream, data.val,
    )  # fmt: skip
    result = train_candidate(
        family=train_family,
        hparams=path.hparams,
        trainable=child.trainable,
        frozen=frozen,
        momentum=child.momentum or None,
        train_batches=iter(batches),
        validation_batches=val_batches,
        config=train_cfg,
        score_fn=lambda q: ctx.score(path, q),
        baseline_score=baseline,
        progress=False,
        quality_fn=quality_metric(ctx)[1],
    )
    improved = bool(result.improved and not result.failed)
    # Scored before a discarded child's components are dropped: with s < 1 the score
    # charges the path's params, which needs them.
    score = finite_or_none(ctx.score(path, result.quality))
    record = _record(ctx, proposal, result, improved, score)
    if not improved:
        system.discard_components(path.components[n] for n in child.trainable)
        return record, None
    for name, params in result.best_trainable.items():
        mom = (result.best_momentum or {}).get(name)
        system.component(path.components[name]).set_trained(params, mom)
    path.metrics.update(
        quality=float(result.quality),
        quality_metric=quality_metric(ctx)[0],
        validation=validation_settings(ctx),
        evals=[list(e) for e in result.evals],
        trainable_params=int(result.trainable_params),
        improved=True,
        train_seconds=result.timings.get("total_s"),
        accounted_params=system.accounted_params(path),
    )
    return record, path


def _record(ctx, proposal, result, improved: bool, score) -> dict[str, Any]:
    child, path = proposal.child, proposal.child.path
    return {
        "task": ctx.task,
        "path": path.id,
        "parent": proposal.parent.id,
        "parent_task": proposal.parent.task,
        "agent": ctx.agent,
        "mutations": jsonable(child.mutations),
        "actions": {n: a for n, a in child.actions.items() if a != "share"},
        "hparams": jsonable(path.hparams),
        "trainable_params": int(result.trainable_params),
        "quality": finite_or_none(result.quality),
        "score": score,
        "evals": [list(map(float, e)) for e in result.evals],
        "improved": improved,
        "failed": bool(result.failed),
        "failure": result.failure_reason,
        "examples": int(result.examples_seen),
        "flops": {k: float(v) for k, v in result.flops.items()},
        "timings": {k: float(v) for k, v in result.timings.items()},
        "num_compiles": int(result.num_compiles),
        "time": time.time(),
    }


def jsonable(x: Any) -> Any:
    """``x`` with numpy scalars and other objects made JSON-safe."""
    return json.loads(json.dumps(x, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def test_quality(ctx: IterationContext, path: Path) -> tuple[float, np.ndarray]:
    """Quality and predictions of the task's published ``path`` on its full test split (§4.8).

    The quality is the task's own primary metric (``test_metric``), whatever the scorer used.
    """
    from mu2net.evolution.evaluation import evaluate_path

    if ctx.system.best_path(path.task) is not path:
        raise ValueError(f"test_quality: {path.id} is not the published path of {path.task!r}")
    quality, predictions, _ = evaluate_path(ctx.system, path.task, "test", ctx.config.batch_size)
    return quality, predictions
