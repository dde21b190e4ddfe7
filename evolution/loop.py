"""The evolution loop: which task iterates next, on the state published by every agent (§4.2).

:class:`Evolver` runs task iterations round-robin over the live mixture (tasks with the fewest
iterations first), reloading the published state before each, so tasks added with
``mu2net add-task`` and other agents' commits are picked up as they land. What one task
iteration does is the :class:`~mu2net.evolution.runner.TaskIterationRunner`'s job; what it
tries is the configured strategy's (``EvolutionConfig.strategy``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

# Imported for their registrations: the µ2Net search and the fixed baselines.
from mu2net.evolution import baselines as _baselines  # noqa: F401
from mu2net.evolution import multipath as _multipath  # noqa: F401
from mu2net.evolution import search as _search  # noqa: F401
from mu2net.evolution.config import ConfigError, EvolutionConfig
from mu2net.evolution.runner import TaskIterationRunner
from mu2net.evolution.strategy import get_strategy
from mu2net.models.base import get_family
from mu2net.system.names import agent_for_task, validate_agent_name
from mu2net.system.state import System
from mu2net.system.store import Store


class Evolver:
    """Runs task iterations for some tasks of a store's live mixture.

    Args:
      store: the system store.
      config: the evolution config (its ``strategy`` decides what each iteration tries).
      agent: shard to write; default one shard per task (reference multiagent layout).
      tasks: the tasks this evolver owns (default: every task of the live mixture).
      logdir: TensorBoard directory (scalars per task), or None.
      progress: show progress bars.
      log: where the one-line summary of each task iteration goes.
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
        config.validate(get_family(config.family))
        self.strategy = get_strategy(config.strategy)
        if not self.strategy.publishes:
            raise ConfigError(
                f"EvolutionConfig.strategy = {config.strategy!r} publishes nothing: run it "
                "with mu2net.evolution.baselines.run_baseline"
            )
        self.agent = validate_agent_name(agent) if agent else None
        self.only_tasks = list(tasks) if tasks else None
        self.writer = None
        if logdir:
            from clu import metric_writers

            self.writer = metric_writers.create_default_writer(logdir, asynchronous=False)
        self.system: System = System()
        self._view: dict[str, Any] = {}
        self._step = 0
        self.runner = TaskIterationRunner(
            config, self.strategy, commit=self._commit, log=log, scalar=self._scalar,
            progress=progress,
        )  # fmt: skip

    def agent_of(self, task: str) -> str:
        """The shard that records ``task``'s paths."""
        return self.agent or agent_for_task(task)

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

    def next_task(self) -> str | None:
        """The pending task with the fewest iterations, or None when all are done."""
        tasks = self.my_tasks()
        if not tasks and not self.config.continuous:
            raise ConfigError("the live mixture is empty: add a task with `mu2net add-task`")
        target = self.config.num_cycles
        done = {t: self.iterations_done(t) for t in tasks}
        if self.config.continuous and tasks and (target == 0 or min(done.values()) >= target):
            target = min(done.values()) + 1 if target == 0 else target
        pending = [t for t in tasks if done[t] < target]
        return min(pending, key=lambda t: (done[t], tasks.index(t))) if pending else None

    def run(self, max_task_iterations: int = 0) -> list[dict[str, Any]]:
        """Runs task iterations until every task has ``num_cycles`` of them.

        In continuous mode it never stops on its own (unless ``max_task_iterations`` > 0):
        when every task is done it waits ``poll_seconds`` and looks for new tasks.
        Resuming after a kill continues from the last commit.
        """
        summaries = []
        while not max_task_iterations or len(summaries) < max_task_iterations:
            self.reload()
            task = self.next_task()
            if task is None:
                if not self.config.continuous:
                    break
                time.sleep(self.config.poll_seconds)
                continue
            summaries.append(self.task_iteration(task, self.iterations_done(task)))
        if self.writer is not None:
            self.writer.flush()
        return summaries

    def task_iteration(self, task: str, iteration: int) -> dict[str, Any]:
        """One task iteration on the last reloaded state; returns its summary."""
        t0 = time.time()
        result = self.runner.run(self.system, task, iteration, self.agent_of(task))
        best = result.best
        self._scalar(task, "accounted_params", best.metrics.get("accounted_params"))
        self._scalar(task, "candidates_per_second", len(result.history) / (time.time() - t0))
        self._scalar(task, "test_quality", best.metrics.get("test_quality"))
        return result.summary

    def _commit(self, system: System, agent: str, records: list, note: str) -> None:
        # The view records which published paths (of which agents) this work built on.
        self.store.commit(system, agent, history=[*records, self._view], note=note)

    def _scalar(self, task: str, name: str, value: float | None) -> None:
        if name == "candidate_quality":
            self._step += 1
        if self.writer is not None and value is not None and math.isfinite(value):
            self.writer.write_scalars(self._step, {f"{task}/{name}": float(value)})
