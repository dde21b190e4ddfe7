"""Baselines as fixed strategies run by the same task-iteration runner (reference §4.9).

A baseline is one child of the root with a fixed clone set and no mutations, trained in one
generation for the whole evolutionary budget of a task: V x cycles x generations validation
intervals, so it sees as many training examples as evolution's candidates do together.

* ``finetune_all``: every component cloned and trained.
* ``freeze_bottom:k``: the first k blocks (and everything below them) frozen and shared.
* ``adapters:d``: adapters of dim d before every block; adapters, head and forced
  components (the final norm) train.
* ``linear_probe``: only the head trains.
* ``finetune_all_lr_grid``: fine-tune all at 3 learning rates (the default's x1/3, x1, x3)
  sharing the budget; the one with the best validation accuracy is kept, as a user tuning
  on validation would.

With a compute budget (``EvolutionConfig.budget_flops`` / ``budget_seconds``) a baseline's
children are trained as long as their share of the budget pays for, from their compiled
step's cost, instead of the reference's interval count: every method gets the same compute.

Baseline paths are never published: they exist to be compared with.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

import numpy as np

from mu2net.evolution.budget import Budget
from mu2net.evolution.config import ConfigError, EvolutionConfig
from mu2net.evolution.mutations import ChildTarget, MutationPolicy, make_child
from mu2net.evolution.strategy import (
    GenerationSpec,
    IterationContext,
    Proposal,
    Strategy,
    register_strategy,
)
from mu2net.models.base import format_adapter_layers, get_family
from mu2net.system.state import System

BASELINE_AGENT = "baseline"


@dataclasses.dataclass
class BaselineResult:
    """Outcome of one baseline run."""

    kind: str
    task: str
    validation: float
    test: float
    trainable_params: int
    path_params: int
    examples: int
    seconds: float
    predictions: np.ndarray
    flops: float = 0.0
    train_seconds: float = 0.0
    hparams: dict[str, Any] = dataclasses.field(default_factory=dict)


def clone_rule(kind: str, family) -> tuple[Any, dict[str, Any]]:
    """(clone predicate, fixed hparams) of a baseline kind; errors name the kind."""
    forced = set(family.force_clone)
    if kind in ("finetune_all", "finetune_all_lr_grid"):
        return (lambda name: True), {}
    if kind == "linear_probe":
        return (lambda name: False), {}
    m = re.fullmatch(r"freeze_bottom:(\d+)", kind)
    if m:
        k = int(m.group(1))

        def clone(name: str) -> bool:
            index = family.block_index(name)
            if index is not None:
                return index >= k
            return name in forced or name in family.above_blocks

        return clone, {}
    m = re.fullmatch(r"adapters:(\d+)", kind)
    if m:
        if not family.supports_adapters:
            raise ConfigError(f"baseline {kind!r}: family {family.name!r} has no adapters")
        return (lambda name: name in forced), {"adapter_dim": int(m.group(1))}
    raise ConfigError(
        f"unknown baseline {kind!r}; use finetune_all, finetune_all_lr_grid, linear_probe, "
        "freeze_bottom:K, adapters:D"
    )


def baseline_validations(config: EvolutionConfig) -> int:
    """Validation intervals of a baseline: evolution's whole budget for one task."""
    return (
        config.num_validations * max(config.num_cycles, 1) * config.generations_per_task_iteration()
    )


class FixedStrategy(Strategy):
    """One unmutated child of the root with a fixed clone rule, trained for the whole budget."""

    publishes = False

    def search_space(self, config: EvolutionConfig) -> dict[str, list]:
        """No search: the defaults are used as they are."""
        return {}

    def generations(self, config: EvolutionConfig) -> int:
        """One generation."""
        return 1

    def candidates(self, config: EvolutionConfig, generation: int) -> int:
        """One candidate per learning rate."""
        return len(self.lr_factors())

    def lr_factors(self) -> tuple[float, ...]:
        """Multipliers of the default learning rate, one child each."""
        return LR_GRID_FACTORS if self.name == "finetune_all_lr_grid" else (1.0,)

    def propose(self, ctx: IterationContext, gen: GenerationSpec, n: int) -> list[Proposal]:
        """The root's children with this baseline's clone set and the default optimizer."""
        clone, fixed = clone_rule(self.name, ctx.family)
        fixed = {**{k: v for k, v in ctx.defaults.items() if k.startswith("opt_")}, **fixed}
        if self.name.startswith("adapters:"):
            layers = range(int(ctx.root.hparams["num_layers"]))
            fixed["adapter_layers"] = format_adapter_layers(layers)
        target = ChildTarget(ctx.task, ctx.info.num_classes, ctx.agent, gen.ds)
        factors = self.lr_factors()[:n]
        budgeted = Budget.of(ctx.config).active
        share = max(1, baseline_validations(ctx.config) // len(factors))
        proposals = []
        for factor in factors:
            hp = {**fixed, "opt_lr": float(fixed.get("opt_lr", 0.01)) * factor}
            policy = MutationPolicy(mutate=False, fixed_hparams=hp, clone_names=clone)
            child = make_child(
                ctx.system, ctx.family, ctx.root, target, {}, gen.rng, ctx.lineage, policy
            )
            if budgeted:
                proposals.append(Proposal(ctx.root, child, budget_share=1.0 / len(factors)))
            else:
                proposals.append(Proposal(ctx.root, child, share))
        return proposals


LR_GRID_FACTORS = (1.0 / 3.0, 1.0, 3.0)

for _pattern in (
    "finetune_all", "finetune_all_lr_grid", "linear_probe", r"freeze_bottom:(\d+)",
    r"adapters:(\d+)",
):  # fmt: skip
    register_strategy(_pattern, FixedStrategy)


def run_baseline(
    system: System, config: EvolutionConfig, task: str, kind: str, seed: int = 0
) -> BaselineResult:
    """Trains baseline ``kind`` for ``task`` from the system's root; returns its accuracies.

    ``system`` is left unchanged: the baseline runs in a scratch copy holding only the root.
    """
    from mu2net.evolution import data as evo_data
    from mu2net.evolution.roots import class_root
    from mu2net.evolution.runner import TaskIterationRunner
    from mu2net.train.batching import eval_batches
    from mu2net.train.trainer import evaluate

    clone_rule(kind, get_family(config.family))  # names a bad kind before any work
    cfg = dataclasses.replace(config, strategy=kind, seed=seed)
    root = class_root(system, cfg)
    scratch = system.scratch()
    scratch.publish(root)
    t0 = time.time()
    runner = TaskIterationRunner(cfg, FixedStrategy(kind), commit=None, log=lambda s: None)
    result = runner.run(scratch, task, 0, BASELINE_AGENT)
    best = result.best
    record = next(h for h in result.history if h["path"] == best.id)
    family = get_family(cfg.family)
    test = eval_batches(evo_data.eval_arrays(task, "test", family, best.hparams), cfg.batch_size)
    acc, preds = evaluate(family, best.hparams, scratch.params_of(best), test)
    return BaselineResult(
        kind=kind,
        task=task,
        validation=float(best.metrics["quality"]),
        test=float(acc),
        trainable_params=int(record["trainable_params"]),
        path_params=int(scratch.path_params(best)),
        # Every child's training counts: the lr grid's losers were paid for too.
        examples=int(result.summary["examples"]),
        seconds=time.time() - t0,
        predictions=np.asarray(preds),
        flops=float(result.summary["flops"]),
        train_seconds=float(result.summary["train_seconds"]),
        hparams=dict(best.hparams),
    )
