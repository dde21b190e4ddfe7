"""Task iterations and the evolution loop (reference §4.2-§4.8).

One *task iteration* = start (unlock the task's own components, collect seeds), generations of
children trained on the same data stream, then the end: keep the best path, lock it, commit it
to the store and test-evaluate it. The loop runs task iterations round-robin over the live
mixture (tasks with the fewest iterations first), reloading the published state before each, so
tasks added with ``mu2net add-task`` and other agents' commits are picked up as they land.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mu2net.evolution import data as evo_data
from mu2net.evolution.config import ConfigError, EvolutionConfig
from mu2net.evolution.hparams import sample_dataset_hparams
from mu2net.evolution.mutations import make_child
from mu2net.evolution.prefix import PrefixCache, deterministic_inputs, suffix_plan
from mu2net.evolution.selection import DecaySelector, seed_paths
from mu2net.models.base import Family, get_family
from mu2net.system.names import agent_for_task, validate_agent_name
from mu2net.system.state import Path, System
from mu2net.system.store import Store


@dataclasses.dataclass
class _Generation:
    """What every candidate of one generation shares (reference §4.4-4.5)."""

    ds: dict[str, Any]
    stream: evo_data.TrainStream
    val: list[dict]
    steps_between: int
    prefix: PrefixCache | None


def parent_lookup(
    system: System, candidates: dict[str, Path], family: str
) -> Callable[[str], Path | None]:
    """Path id -> path for the ancestor walk: this iteration's candidates, then published paths.

    A parent that no longer exists (replaced by its task, possibly by a concurrent agent) falls
    back to the family's root (µ3Net), so components come from the root rather than a fresh init.
    """
    roots = [r for r in system.roots() if r.family == family]

    def lookup(pid: str) -> Path | None:
        return candidates.get(pid) or system.paths.get(pid) or (roots[0] if roots else None)

    return lookup


def root_agent(family: str) -> str:
    """Shard that holds the root of ``family``."""
    return validate_agent_name(f"root~{family}")


def create_root(store: Store, config: EvolutionConfig) -> Path:
    """Adds the configured root (pretrained or random) to the store, once per family."""
    family = get_family(config.family)
    system = store.load()
    for root in system.roots():
        if root.family == family.name:
            return root
    hparams = config.path_defaults(family.default_hparams())
    family.validate_hparams(hparams)
    if config.pretrained:
        params = family.load_pretrained(hparams, config.checkpoint or None)
    else:
        import jax

        params = jax.device_get(family.init(jax.random.PRNGKey(config.seed), hparams))
    agent = root_agent(family.name)
    root = system.add_root(f"root:{family.name}", family.name, params, hparams, agent)
    root.metrics["pretrained"] = bool(config.pretrained)
    store.commit(system, agent, note="root")
    return root


class Evolver:
    """Runs task iterations for some tasks of a store's live mixture.

    Args:
      store: the system store.
      config: the evolution config.
      agent: shard to write; default one shard per task (reference multiagent layout).
      tasks: the tasks this evolver owns (default: every task of the live mixture).
      logdir: TensorBoard directory (scalars per task), or None.
      progress: show progress bars.
      trainer: injection point for a custom candidate trainer (defaults to mu2net.train).
    """

    def __init__(
        self,
        store: Store,
        config: EvolutionConfig,
        agent: str | None = None,
        tasks: Sequence[str] | None = None,
        logdir: str | None = None,
        progress: bool = True,
        log: Callable[[str], None] = print,
    ):
        self.store = store
        self.config = config
        self.family: Family = get_family(config.family)
        config.validate(self.family)
        self.agent = validate_agent_name(agent) if agent else None
        self.only_tasks = list(tasks) if tasks else None
        self.progress = progress
        self.log = log
        self.writer = None
        if logdir:
            from clu import metric_writers

            self.writer = metric_writers.create_default_writer(logdir, asynchronous=False)
        self.system: System = System()
        self._view: dict[str, Any] = {}
        self._step = 0

    # --------------------------------------------------------------------- helpers
    def agent_of(self, task: str) -> str:
        """The shard that records ``task``'s paths."""
        return self.agent or agent_for_task(task)

    def _score(self, path: Path, quality: float | None = None) -> float:
        cfg = self.config
        base = cfg.params_base or self._root_params()
        flops = path.metrics.get("flops") if cfg.flops_base else None
        return self.system.score(path, quality, cfg.scale, base, flops, cfg.flops_base or None)

    def _root_params(self) -> float:
        roots = [r for r in self.system.roots() if r.family == self.family.name]
        return float(self.system.path_params(roots[0])) if roots else 1.0

    def reload(self) -> System:
        """Reloads the published state of every shard (other agents' work included)."""
        self.system = self.store.load()
        self._view = {
            "event": "agent_view",
            "agent": self.agent,
            "reloaded": time.time(),
            "seen": {
                p.task: {"path": p.id, "agent": p.agent,
                         "iterations": p.metrics.get("task_iterations", 0)}
                for p in self.system.task_paths()
            },
        }  # fmt: skip
        return self.system

    def my_tasks(self) -> list[str]:
        """Live-mixture tasks this evolver owns."""
        tasks = self.system.tasks
        if self.only_tasks is not None:
            unknown = [t for t in self.only_tasks if t not in tasks]
            if unknown:
                raise ConfigError(
                    f"tasks {unknown} are not in the live mixture; add them with `mu2net add-task`"
                )
            tasks = [t for t in tasks if t in self.only_tasks]
        return tasks

    def iterations_done(self, task: str) -> int:
        """Task iterations already committed for ``task``."""
        best = self.system.best_path(task)
        return int(best.metrics.get("task_iterations", 0)) if best else 0

    # --------------------------------------------------------------------- the loop
    def run(self, max_task_iterations: int = 0) -> list[dict[str, Any]]:
        """Runs task iterations until every task has ``num_cycles`` of them.

        In continuous mode it never stops on its own (unless ``max_task_iterations`` > 0):
        when every task is done it waits ``poll_seconds`` and looks for new tasks.
        Resuming after a kill continues from the last commit.
        """
        summaries = []
        while True:
            self.reload()
            tasks = self.my_tasks()
            if not tasks and not self.config.continuous:
                raise ConfigError("the live mixture is empty: add a task with `mu2net add-task`")
            target = self.config.num_cycles
            done = {t: self.iterations_done(t) for t in tasks}
            if self.config.continuous and tasks and (target == 0 or min(done.values()) >= target):
                target = min(done.values()) + 1 if target == 0 else target
            pending = [t for t in tasks if done[t] < target]
            if not pending:
                if not self.config.continuous:
                    break
                time.sleep(self.config.poll_seconds)
                continue
            task = min(pending, key=lambda t: (done[t], tasks.index(t)))
            summaries.append(self.task_iteration(task, done[task]))
            if max_task_iterations and len(summaries) >= max_task_iterations:
                break
        if self.writer is not None:
            self.writer.flush()
        return summaries

    # --------------------------------------------------------------------- one task iteration
    def task_iteration(self, task: str, iteration: int) -> dict[str, Any]:
        """One task iteration; returns its summary (also committed as history)."""
        cfg, family, system = self.config, self.family, self.system
        agent = self.agent_of(task)
        info = self._task_info(task)
        rng = np.random.default_rng([cfg.seed, zlib.crc32(task.encode()), iteration])
        space = cfg.search_space()
        defaults = cfg.path_defaults(family.default_hparams())
        t0 = time.time()

        system.unlock_task(task, agent)
        best = system.best_path(task)
        if best is not None and best.family != family.name:
            raise ConfigError(
                f"task {task!r} was evolved with family {best.family!r}; this "
                f"evolver uses {family.name!r} (run another agent)"
            )
        population: list[Path] = [best] if best else []
        candidates: dict[str, Path] = {}
        seeds = seed_paths(list(system.paths.values()), task, family.name, rng)
        selector = DecaySelector(
            task, population, seeds, self._score, rng, cfg.linear_probe_seeding
        )

        lookup = parent_lookup(system, candidates, family.name)

        num_train = int(info.split_sizes.get("train", 0))
        steps_between = evo_data.steps_between_validations(
            num_train, cfg.train_examples_between_validations, cfg.batch_size
        )
        if num_train < cfg.batch_size:
            raise ConfigError(
                f"task {task!r}: train split has {num_train} examples, fewer than "
                f"batch_size={cfg.batch_size}"
            )
        num_steps = steps_between * cfg.num_validations
        history: list[dict[str, Any]] = []
        generations = cfg.generations_per_task_iteration()
        sampled = 0
        bar = tqdm(
            total=cfg.samples_per_task_iteration,
            desc=f"{task} it{iteration}",
            unit="cand",
            disable=not self.progress,
            leave=False,
        )
        for gen in range(generations):
            cur_best = max(population, key=self._rank_key) if population else None
            ds, ds_changes = sample_dataset_hparams(
                defaults,
                cur_best.hparams if cur_best else None,
                space,
                float(defaults.get("_mu_", 0.1)),
                rng,
            )
            ds.setdefault("ds_image_size", defaults.get("ds_image_size"))
            stream = evo_data.TrainStream(
                task, family, ds, cfg.batch_size, num_steps, seed=int(rng.integers(2**31))
            )
            val = evo_data.validation_batches(
                evo_data.eval_arrays(task, "validation", family, ds, cfg.validation_examples),
                cfg.batch_size,
            )
            prefix = None
            if cfg.prefix_cache and stream.materialized and deterministic_inputs(ds):
                prefix = PrefixCache(family, list(stream), val)
            generation = _Generation(ds, stream, val, steps_between, prefix)
            n_here = min(cfg.candidates_per_generation, cfg.samples_per_task_iteration - sampled)
            for _ in range(n_here):
                sampled += 1
                record = self._train_child(
                    task, info, agent, selector, space, rng, lookup, generation, candidates,
                    population,
                )  # fmt: skip
                record.update(generation=gen, ds_mutations=ds_changes, iteration=iteration)
                history.append(record)
                bar.update(1)
                bar.set_postfix(best=f"{max(map(self._score, population), default=0):.3f}")
            if cfg.max_population and len(population) > cfg.max_population:
                population.sort(key=self._rank_key, reverse=True)
                del population[cfg.max_population :]
            self._scalar(
                task, "best_score_per_generation", max(map(self._score, population), default=0.0)
            )
        bar.close()
        return self._end_task(task, iteration, population, selector, history, agent, t0)

    @staticmethod
    def _task_info(task: str):
        from mu2net.tasks import data as task_data

        return task_data.task_info(task)

    def _rank_key(self, p: Path) -> tuple:
        # Ties go to the most recent path (µ2Net/µ3Net), i.e. the higher creation order.
        return (self._score(p), p.metrics.get("created", 0.0))

    def _train_child(
        self, task, info, agent, selector, space, rng, lookup, generation, candidates, population
    ) -> dict[str, Any]:
        ds, steps_between = generation.ds, generation.steps_between
        from mu2net.train.trainer import TrainConfig, train_candidate

        cfg, family, system = self.config, self.family, self.system
        parent, mutate = selector.select()
        child = make_child(
            system=system,
            family=family,
            parent=parent,
            task=task,
            num_classes=info.num_classes,
            ds_hparams=ds,
            space=space,
            rng=rng,
            agent=agent,
            lookup=lookup,
            mutate=mutate,
            per_type_mu=cfg.per_type_mu,
            adapters=cfg.mutate_adapters,
            expansions=tuple(cfg.expansions),
            force_clone=tuple(cfg.force_clone),
        )
        path = child.path
        path.metrics["created"] = time.time()
        same_task = parent.task == task
        baseline = self._score(parent) if same_task else -math.inf
        if cfg.strict_improvement and same_task:
            baseline = math.nextafter(baseline, math.inf)
        train_cfg = TrainConfig(
            batch_size=cfg.batch_size,
            steps_between_validations=steps_between,
            num_validations=cfg.num_validations,
            seed=int(rng.integers(2**31)),
            suffix_executable=cfg.suffix_executables,
        )
        train_family, frozen, batches, val_batches = suffix_plan(
            generation.prefix, family, path.hparams, path.components, child.trainable,
            child.frozen, generation.stream, generation.val,
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
            score_fn=lambda q, path=path: self._score(path, q),
            baseline_score=baseline,
            progress=False,
        )
        improved = bool(result.improved and not result.failed)
        # Scored before a discarded child's components are dropped: with s < 1 the score
        # charges the path's params, which needs them.
        score = _num(self._score(path, result.quality))
        trainable_ids = [path.components[n] for n in child.trainable]
        if improved:
            for name, params in result.best_trainable.items():
                mom = (result.best_momentum or {}).get(name)
                system.component(path.components[name]).set_trained(params, mom)
            path.metrics.update(
                quality=float(result.quality),
                evals=[list(e) for e in result.evals],
                trainable_params=int(result.trainable_params),
                improved=True,
                train_seconds=result.timings.get("total_s"),
            )
            path.metrics["accounted_params"] = system.accounted_params(path)
            if cfg.flops_base:
                path.metrics["flops"] = family.flops(path.hparams)
            candidates[path.id] = path
            population.append(path)
        else:
            for cid in trainable_ids:
                system.components.pop(cid, None)
        self._step += 1
        self._scalar(task, "candidate_quality", float(result.quality or 0.0))
        return {
            "task": task,
            "path": path.id,
            "parent": parent.id,
            "parent_task": parent.task,
            "agent": agent,
            "mutations": _jsonable(child.mutations),
            "actions": {n: a for n, a in child.actions.items() if a != "share"},
            "hparams": _jsonable(path.hparams),
            "trainable_params": int(result.trainable_params),
            "quality": _num(result.quality),
            "score": score,
            "evals": [list(map(float, e)) for e in result.evals],
            "improved": improved,
            "failed": bool(result.failed),
            "failure": result.failure_reason,
            "timings": {k: float(v) for k, v in result.timings.items()},
            "num_compiles": int(result.num_compiles),
            "time": time.time(),
        }

    def _end_task(self, task, iteration, population, selector, history, agent, t0):
        system, cfg = self.system, self.config
        old = system.best_path(task)
        best = max(population, key=self._rank_key) if population else None
        if best is None:
            raise RuntimeError(
                f"task {task!r}: no candidate trained successfully "
                f"({sum(h['failed'] for h in history)} failed)"
            )
        for p in [*population, *selector.seeds]:
            if p.id in system.paths or p is best:
                p.metrics["offsprings_per_task"] = selector.offspring_metrics(p)
        best.metrics["task_iterations"] = iteration + 1
        best.metrics["class_names"] = list(self._task_info(task).class_names)
        new_best = old is None or best.id != old.id
        system.publish(best)
        for cid in list(system.unreferenced()):
            if not system.components[cid].committed:
                del system.components[cid]
        system.recompute_locks()
        best.metrics["accounted_params"] = system.accounted_params(best)
        best.metrics["score"] = self._score(best)
        if cfg.test_eval and (new_best or "test_quality" not in best.metrics):
            best.metrics["test_quality"] = self.test_accuracy(best)[0]
        summary = {
            "event": "task_iteration",
            "task": task,
            "iteration": iteration,
            "best": best.id,
            "new_best": new_best,
            "quality": best.metrics.get("quality"),
            "test_quality": best.metrics.get("test_quality"),
            "accounted_params": best.metrics["accounted_params"],
            "seconds": time.time() - t0,
            "candidates": len(history),
        }
        # The view records which published paths (of which agents) this iteration built on.
        records = [*history, summary, self._view]
        self.store.commit(system, agent, history=records, note=f"{task} it{iteration}")
        self._scalar(task, "accounted_params", best.metrics["accounted_params"])
        self._scalar(task, "candidates_per_second", len(history) / max(time.time() - t0, 1e-9))
        if best.metrics.get("test_quality") is not None:
            self._scalar(task, "test_quality", best.metrics["test_quality"])
        self.log(
            f"[{task}] iteration {iteration}: best {best.id} quality "
            f"{best.metrics.get('quality', float('nan')):.4f} "
            f"test {best.metrics.get('test_quality', float('nan')):.4f} "
            f"({'new best' if new_best else 'unchanged'}, {time.time() - t0:.0f}s)"
        )
        return summary

    def test_accuracy(self, path: Path) -> tuple[float, np.ndarray]:
        """Accuracy and predictions of ``path`` on its task's full test split."""
        from mu2net.train.trainer import evaluate

        arrays = evo_data.eval_arrays(path.task, "test", self.family, path.hparams)
        batches = evo_data.eval_batches(arrays, self.config.batch_size)
        acc, preds = evaluate(self.family, path.hparams, self.system.params_of(path), batches)
        return float(acc), np.asarray(preds)

    def _scalar(self, task: str, name: str, value: float) -> None:
        if self.writer is not None and value is not None and math.isfinite(value):
            self.writer.write_scalars(self._step, {f"{task}/{name}": float(value)})


def _num(x: Any) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
