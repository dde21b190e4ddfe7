"""The task-iteration runner: the reference's mechanics, whatever the strategy (§4.2-§4.8).

One task iteration: unlock the task's own components, then generations. Each generation
samples its dataset hparams from the task's best path, builds one data stream shared by its
candidates, asks the strategy for all its children (every parent drawn before any child
trains), trains them with keep-best against their parents' scores, and only then adds the
improved ones to the population (§4.6). A generation that improved the best path is published
and committed at once (µ4Net2), so a kill loses at most one generation's training; a restart
continues after the last committed generation. The end keeps the best path, locks it, tests
it, and commits it with the iteration's history.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mu2net.evolution import candidate
from mu2net.evolution.budget import Budget, Spending
from mu2net.evolution.config import ConfigError, EvolutionConfig
from mu2net.evolution.hparams import sample_dataset_hparams
from mu2net.evolution.mutations import Lineage
from mu2net.evolution.prefix import ActivationMemo, PrefixCache
from mu2net.evolution.roots import class_root, loadable_classes, path_class
from mu2net.evolution.selection import OFFSPRING_KEY, dump_offspring, load_offspring, seed_paths
from mu2net.evolution.strategy import GenerationSpec, IterationContext, Strategy
from mu2net.models.base import get_family
from mu2net.system.state import Path, System

PROGRESS_KEY = "iteration_progress"


@dataclasses.dataclass
class IterationResult:
    """A finished task iteration: its summary, best path and history records."""

    summary: dict[str, Any]
    best: Path
    history: list[dict[str, Any]]


class TaskIterationRunner:
    """Runs task iterations of one strategy for one agent class.

    Args:
      config: the evolution config.
      strategy: what to try.
      commit: ``(system, agent, history, note) -> None`` that commits the agent's shard, or
        None for runs that publish nothing (baselines, dry runs).
      log: one line per task iteration.
      scalar: ``(task, name, value) -> None`` for TensorBoard, or None.
      progress: show a progress bar per task iteration.
    """

    def __init__(
        self,
        config: EvolutionConfig,
        strategy: Strategy,
        commit: Callable[[System, str, list, str], None] | None = None,
        log: Callable[[str], None] = print,
        scalar: Callable[[str, str, float], None] | None = None,
        progress: bool = False,
    ):
        self.config = config
        self.strategy = strategy
        self.commit = commit
        self.log = log
        self.scalar = scalar or (lambda task, name, value: None)
        self.progress = progress
        self.activations = ActivationMemo() if config.prefix_memo else None

    # ------------------------------------------------------------------ the iteration
    def run(self, system: System, task: str, iteration: int, agent: str) -> IterationResult:
        """One task iteration of ``task`` on the published ``system`` (modified in place)."""
        t0 = time.time()
        ctx = self.context(system, task, iteration, agent)
        start, spending = self._resume(ctx)
        budget = Budget.of(self.config)
        history: list[dict[str, Any]] = []
        uncommitted: list[dict[str, Any]] = []
        total = self.strategy.generations(self.config)
        # A bar on a terminal; in a log file one line per candidate instead (no \r redraws).
        bar = tqdm(
            total=None if budget.active else total, initial=start, desc=f"{task} it{iteration}",
            unit="gen", disable=not (self.progress and sys.stderr.isatty()), leave=False,
        )  # fmt: skip
        for g in range(start, total):
            wanted = spending.fit(budget, self.strategy.candidates(self.config, g))
            if wanted <= 0:
                break
            t_gen = time.time()
            records, improved = self.generation(ctx, g, wanted, spending)
            spending.add(records, time.time() - t_gen)
            history.extend(records)
            uncommitted.extend(records)
            if improved and self.commit is not None and self.strategy.publishes:
                self._commit_generation(ctx, g, uncommitted, spending)
                uncommitted = []
            bar.update(1)
        bar.close()
        result = self._finish(ctx, history, t0, spending)
        if self.commit is not None and self.strategy.publishes:
            note = f"{task} it{iteration}"
            self.commit(system, agent, [*uncommitted, result.summary], note)
        self.log(_summary_line(result))
        return result

    def context(self, system: System, task: str, iteration: int, agent: str) -> IterationContext:
        """Unlocks the task and gathers population, seeds and offspring counts (start_task)."""
        from mu2net.tasks import data as task_data

        cfg = self.config
        family = get_family(cfg.family)
        root = class_root(system, cfg)
        system.unlock_task(task, agent)
        best = system.best_path(task)
        if best is not None and not self.strategy.continues(best, root):
            raise ConfigError(
                f"task {task!r} was evolved by agent class {path_class(best)!r}; this agent is "
                f"{path_class(root)!r} (run an agent of that class, or another task)"
            )
        classes = loadable_classes(cfg)
        rng = np.random.default_rng([cfg.seed, zlib.crc32(task.encode()), iteration])
        others = [p for p in system.paths.values() if path_class(p) in classes]
        seeds = seed_paths(others, task, rng)
        population = [best] if best else []
        ctx = IterationContext(
            task=task, iteration=iteration, agent=agent, info=task_data.task_info(task),
            system=system, family=family, config=cfg, space=self.strategy.search_space(cfg),
            defaults=cfg.path_defaults(family.default_hparams()), root=root,
            population=population, seeds=seeds,
            offspring=load_offspring(task, best, [*population, *seeds]),
            lineage=Lineage(system, {}, root), score=lambda p, q=None: -math.inf,
            activations=self.activations,
        )  # fmt: skip
        ctx.score = lambda p, q=None: self.strategy.score(ctx, p, q)
        candidate.quality_metric(ctx)  # names an unknown metric before anything trains
        self._revalidate(ctx)
        self.strategy.begin(ctx)
        return ctx

    def generation(
        self, ctx: IterationContext, g: int, wanted: int, spending: Spending | None = None
    ) -> tuple[list[dict[str, Any]], bool]:
        """Trains one generation of ``wanted`` children.

        Returns its records and whether the best path improved. ``spending`` (what the
        iteration spent so far) sizes children that take a share of the compute budget.
        """
        cfg = ctx.config
        rng = np.random.default_rng([cfg.seed, zlib.crc32(ctx.task.encode()), ctx.iteration, g])
        best_before = self.best(ctx)
        ds, ds_changes = sample_dataset_hparams(
            ctx.defaults,
            best_before.hparams if best_before else None,
            ctx.space,
            float(ctx.defaults.get("_mu_", 0.1)),
            rng,
        )
        ds.setdefault("ds_image_size", ctx.defaults.get("ds_image_size"))
        spec = GenerationSpec(g, ds, ds_changes, rng)
        proposals = self.strategy.propose(ctx, spec, wanted)
        candidate.size_to_budget(ctx, spec, proposals, spending or Spending())
        longest = max((p.num_validations or cfg.num_validations for p in proposals), default=0)
        data = candidate.generation_data(ctx, spec, longest)
        records, improved = [], []
        for proposal in proposals:
            before = prefix_counts(data.prefix)
            record, path = candidate.train_proposal(ctx, spec, data, proposal)
            record.update(
                generation=g, ds_mutations=ds_changes, iteration=ctx.iteration
            )  # fmt: skip
            spent = {k: v - before[k] for k, v in prefix_counts(data.prefix).items()}
            if spent["rows_computed"] or spent["rows_reused"]:
                # A prefix's activations are computed once (per example, with the memo) and
                # charged to the candidate that first needed them.
                record["flops"]["prefix"] = spent.pop("flops")
                record["timings"]["prefix_s"] = spent.pop("seconds")
                record["timings"]["total_s"] = (
                    record["timings"].get("total_s", 0.0) + record["timings"]["prefix_s"]
                )
                record["prefix"] = spent
            records.append(record)
            self.scalar(ctx.task, "candidate_quality", float(record["quality"] or 0.0))
            if self.progress and not sys.stderr.isatty():
                self.log(_candidate_line(record, len(records), len(proposals)))
            if path is not None:
                improved.append(path)
        # Improved children join the population only after the whole generation (§4.6).
        ctx.population.extend(improved)
        ctx.lineage.candidates.update({p.id: p for p in improved})
        self.prune(ctx, rng)
        best = self.best(ctx)
        self.scalar(ctx.task, "best_score_per_generation", ctx.score(best) if best else 0.0)
        return records, best is not None and best is not best_before

    # ------------------------------------------------------------------ helpers
    def best(self, ctx: IterationContext) -> Path | None:
        """The population's best path; ties go to the most recent (µ2Net/µ3Net)."""
        if not ctx.population:
            return None
        return max(ctx.population, key=lambda p: (ctx.score(p), p.metrics.get("created", 0.0)))

    def prune(self, ctx: IterationContext, rng: np.random.Generator) -> None:
        """Caps the population at ``max_population`` (a no-op below it).

        Keeps the top paths by score, or with ``prune_by_decay`` (µ4Net2) the best, then
        survivors drawn by the decay rule.
        """
        cap = ctx.config.max_population
        if not cap or len(ctx.population) <= cap:
            return
        ranked = sorted(
            ctx.population,
            key=lambda p: (ctx.score(p), p.metrics.get("created", 0.0)),
            reverse=True,
        )
        if not ctx.config.prune_by_decay:
            ctx.population[:] = ranked[:cap]
            return
        kept, rest = ranked[:1], ranked[1:]
        while len(kept) < cap:
            # Accepted with probability 0.5^offspring, by score; the best remaining if none.
            drawn = (p for p in rest if rng.random() < 0.5 ** ctx.offspring.get(p.id, 0))
            pick = next(drawn, rest[0])
            kept.append(pick)
            rest.remove(pick)
        ctx.population[:] = kept

    def _revalidate(self, ctx: IterationContext) -> None:
        """Re-measures the published path when it was validated under other settings."""
        best = ctx.population[0] if ctx.population else None
        settings = candidate.validation_settings(ctx)
        if best is None or best.metrics.get("validation") == settings:
            return
        from mu2net.train.trainer import evaluate

        ds = {k: v for k, v in best.hparams.items() if k.startswith("ds_")}
        val = candidate.validation_data(ctx, ds)
        # The path's own family: a composite (multipath) path is not of the agent's family.
        family = get_family(best.family)
        quality, preds = evaluate(family, best.hparams, ctx.system.params_of(best), val)
        name, metric = candidate.quality_metric(ctx)
        if metric is not None:
            targets = np.concatenate([np.asarray(b["targets"]).reshape(-1) for b in val])
            quality = metric(targets, preds)
        self.log(
            f"[{ctx.task}] validation settings changed ({best.metrics.get('validation')} -> "
            f"{settings}): re-validated {best.id}: {best.metrics.get('quality')} -> {quality:.4f}"
        )
        best.metrics.update(quality=float(quality), quality_metric=name, validation=settings)

    def _resume(self, ctx: IterationContext) -> tuple[int, Spending]:
        """(first generation to run, spent so far): after the last one committed."""
        best = ctx.population[0] if ctx.population else None
        progress = (best.metrics.get(PROGRESS_KEY) or {}) if best else {}
        if progress.get("iteration") == ctx.iteration:
            spent = Spending.from_json(progress.get("spent"))
            return int(progress["generation"]) + 1, spent
        return 0, Spending(start_best=best.id if best else None)

    def _publish(self, ctx: IterationContext, best: Path, keep: set[str]) -> None:
        """Publishes ``best``; drops unpublished components except ``keep``."""
        system = ctx.system
        best.metrics[OFFSPRING_KEY] = dump_offspring(ctx.offspring)
        best.metrics["class_names"] = list(ctx.info.class_names)
        system.publish(best)
        system.drop_unpublished_except(keep)
        best.metrics["accounted_params"] = system.accounted_params(best)
        best.metrics["score"] = ctx.score(best)

    @staticmethod
    def _population_components(ctx: IterationContext) -> set[str]:
        return {cid for p in ctx.population for cid in p.components.values()}

    def _commit_generation(
        self, ctx: IterationContext, g: int, records: list, spending: Spending
    ) -> None:
        best = self.best(ctx)
        best.metrics[PROGRESS_KEY] = {
            "iteration": ctx.iteration, "generation": g, "spent": spending.to_json(),
        }  # fmt: skip
        # A child published mid-iteration still counts the iterations done before this one:
        # a restart reading none would redo them (found by benchmarks/faults.py).
        best.metrics["task_iterations"] = ctx.iteration
        # The population keeps training: its unpublished components stay.
        self._publish(ctx, best, self._population_components(ctx))
        if ctx.config.test_eval and ctx.config.test_eval_every_generation:
            self._test_eval(ctx, best, g)
        self.commit(ctx.system, ctx.agent, records, f"{ctx.task} it{ctx.iteration} gen{g}")
        # The task keeps training: its own components are unlocked again (always cloned).
        ctx.system.unlock_task(ctx.task, ctx.agent)

    def _test_eval(self, ctx: IterationContext, best: Path, g: int | None = None) -> None:
        """Test quality of the published ``best`` (reported only, never selected on)."""
        best.metrics["test_quality"] = candidate.test_quality(ctx, best)[0]
        best.metrics["test_metric"] = ctx.info.metric_name
        if g is None:
            return
        best.metrics["test_generation"] = g
        self.scalar(ctx.task, "test_quality_per_generation", float(best.metrics["test_quality"]))
        self.log(
            f"[{ctx.task}] it{ctx.iteration} gen{g}: best {best.id} test "
            f"{best.metrics['test_quality']:.4f}"
        )

    def _finish(
        self, ctx: IterationContext, history: list, t0: float, spending: Spending
    ) -> IterationResult:
        cfg = ctx.config
        best = self.best(ctx)
        if best is None:
            raise candidate.IterationFailed(
                f"task {ctx.task!r}: no candidate trained successfully "
                f"({sum(h['failed'] for h in history)} failed)"
            )
        best.metrics.pop(PROGRESS_KEY, None)
        best.metrics["task_iterations"] = ctx.iteration + 1
        improved = best.id != spending.start_best
        new_best = improved or "test_quality" not in best.metrics
        if self.strategy.publishes:
            self._publish(ctx, best, set())
        # A best test-evaluated when its generation was committed (µ4Net2) is not redone.
        tested = improved and "test_generation" in best.metrics
        if cfg.test_eval and self.strategy.publishes and new_best and not tested:
            self._test_eval(ctx, best)
        summary = {
            "event": "task_iteration",
            "task": ctx.task,
            "iteration": ctx.iteration,
            "strategy": self.strategy.name,
            "best": best.id,
            "new_best": improved,
            "quality": best.metrics.get("quality"),
            "test_quality": best.metrics.get("test_quality"),
            "accounted_params": best.metrics.get("accounted_params"),
            "seconds": time.time() - t0,
            "candidates": len(history),
            **compute_summary(history),
            "budget": dataclasses.asdict(Budget.of(cfg)),
            "spent": spending.to_json(),
        }
        return IterationResult(summary, best, history)


def prefix_counts(cache: PrefixCache | None) -> dict[str, float]:
    """FLOPs and rows a generation's prefix cache has spent so far (zeros without one)."""
    keys = ("flops", "seconds", "flops_without_memo", "rows_computed", "rows_reused")
    return {k: float(getattr(cache, k)) if cache is not None else 0.0 for k in keys}


def compute_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Examples, FLOPs by kind and seconds by phase summed over candidate records."""
    flops: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for r in records:
        for kind, v in r.get("flops", {}).items():
            flops[kind] = flops.get(kind, 0.0) + float(v)
        for phase, v in r.get("timings", {}).items():
            seconds[phase] = seconds.get(phase, 0.0) + float(v)
    return {
        "examples": sum(int(r.get("examples", 0)) for r in records),
        # Training + validation (+ frozen-prefix) FLOPs executed by the candidates, XLA counts.
        "flops": sum(flops.values()),
        "flops_by_kind": flops,
        "train_seconds": seconds.get("total_s", 0.0),
        "seconds_by_phase": {k: v for k, v in seconds.items() if k != "total_s"},
    }


def _candidate_line(record: dict[str, Any], k: int, n: int) -> str:
    quality = record["quality"]
    state = "failed" if record["failed"] else "improved" if record["improved"] else "discarded"
    return (
        f"[{record['task']}] it{record['iteration']} gen{record['generation']} candidate "
        f"{k}/{n}: quality {quality if quality is None else f'{quality:.4f}'} ({state}), "
        f"{sum(record['flops'].values()) / 1e12:.2f} TFLOPs, "
        f"{record['timings'].get('total_s', 0.0):.0f}s"
    )


def _summary_line(result: IterationResult) -> str:
    s, best = result.summary, result.best
    return (
        f"[{s['task']}] iteration {s['iteration']}: best {best.id} quality "
        f"{best.metrics.get('quality', float('nan')):.4f} "
        f"test {best.metrics.get('test_quality') or float('nan'):.4f} "
        f"({'new best' if s['new_best'] else 'unchanged'}, {s['seconds']:.0f}s)"
    )
