r"""Agents: asynchronous evolvers of their own tasks against one shared store (reference §7.2).

An *agent* is a method configuration plus the tasks it owns. Several agents run as separate
processes (or machines, on a ``gs://`` store) and never coordinate directly:

* before every task iteration an agent reloads the published state, so every other agent's
  commits are visible to it (:meth:`Evolver.run` reloads before each iteration);
* it writes only its own shard (``shards/<agent name>/``) and publishes at the end of every task
  iteration (so a whole cycle's work is never at risk);
* every other agent's components are frozen for it: they are locked by their tasks, and a child
  that wants to change an unlocked one always clones it (:func:`make_child`);
* agents of different root families or configs coexist in one store: each picks parents of its
  own family only, and reuses what fits (a ViT agent at another image size interpolates the
  position embedding of the shared ViT root and shares the rest).

The multiagent races live in the core: a shard's manifest keeps every component it ever
committed (another agent may share it), and a parent retired by another agent falls back to the
root (:func:`~mu2net.evolution.loop.parent_lookup`). Every commit's history records which
published paths the agent saw (an ``agent_view`` record).

Command line (the same flags as ``mu2net evolve``, plus ``--cycles``)::

    python -m mu2net.evolution.agents --store=gs://bucket/sys --agent=vision-a \
        --tasks=mu2net:digits --gin_file=experiments/vit_ti0_quick.gin --cycles=2
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mu2net import gin_utils
from mu2net.errors import Mu2netError
from mu2net.evolution.config import ConfigError, EvolutionConfig
from mu2net.evolution.loop import Evolver
from mu2net.evolution.roots import create_root
from mu2net.system.lease import ShardLease
from mu2net.system.names import validate_agent_name, validate_task_name
from mu2net.system.state import System
from mu2net.system.store import MARKER, Store, StoreConflict, StoreError
from mu2net.train._gin import gin


class AgentError(Mu2netError, ValueError):
    """An agent that cannot run as configured (names the agent and the task)."""


@dataclasses.dataclass
class Agent:
    """A method configuration and the tasks it owns.

    Attributes:
      name: the agent's shard name (unique among the agents sharing a store).
      tasks: the seqio tasks it evolves; added to the live mixture when missing. A task belongs
        to one agent: the agent that first published a path for it.
      gin_files: gin files of its :class:`EvolutionConfig` (t5x-style search paths apply).
      gin_bindings: extra gin bindings (``"EvolutionConfig.seed = 3"``).
      config: an explicit config instead of gin (then ``gin_files``/``gin_bindings`` are unused).
      overrides: config fields replaced after gin (``{"samples_per_task_iteration": 2}``).
      modules: Python modules imported first (they register the agent's seqio tasks).
    """

    name: str
    tasks: tuple[str, ...]
    gin_files: tuple[str, ...] = ()
    gin_bindings: tuple[str, ...] = ()
    config: EvolutionConfig | None = None
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        validate_agent_name(self.name)
        self.tasks = tuple(self.tasks)
        if not self.tasks:
            raise AgentError(f"agent {self.name!r}: give it at least one task to own")
        for t in self.tasks:
            validate_task_name(t)

    def build_config(self) -> EvolutionConfig:
        """The agent's config: explicit, or gin (parsed by the caller) plus ``overrides``."""
        config = copy.deepcopy(self.config) if self.config is not None else EvolutionConfig()
        unknown = set(self.overrides) - {f.name for f in dataclasses.fields(EvolutionConfig)}
        if unknown:
            raise ConfigError(f"agent {self.name!r}: unknown EvolutionConfig fields {unknown}")
        return dataclasses.replace(config, **dict(self.overrides))


def open_shared(url: str, config: EvolutionConfig, retries: int = 10) -> Store:
    """Opens (or creates) the store and its root for ``config``'s family, racing other agents.

    Several agents may start on an empty store at once: whoever loses the race to create the
    store marker or the root retries and uses the winner's. Any other store error (a foreign
    directory, a broken manifest) is raised at once.
    """
    last: Exception | None = None
    for attempt in range(retries):
        store = Store(url)
        if not store.exists(store.path_of(MARKER)):
            try:
                name = os.path.basename(store.root.rstrip("/")) or "system"
                Store.create(url, name.replace(" ", "_"))
            except StoreError as e:  # created meanwhile, being created, or a foreign directory
                last = e
                time.sleep(0.05 * (attempt + 1))
                continue
        try:
            store.info()
            create_root(store, config)
            return store
        except StoreConflict as e:  # another agent committed the same root first: use it
            last = e
        time.sleep(0.05 * (attempt + 1))
    raise StoreError(f"{url}: could not open or create the store: {last}")


def claim_tasks(store: Store, agent: Agent, validate: bool = True) -> System:
    """Adds the agent's missing tasks to the live mixture and checks it owns every one."""
    from mu2net.evolution.live import add_tasks_to_store

    system = store.load()
    missing = [t for t in agent.tasks if t not in system.tasks]
    for task in missing:
        try:
            add_tasks_to_store(store, [task], validate=validate)
        except StoreConflict:
            pass  # another agent added the same task at the same moment: fine
    system = store.load()
    for task in agent.tasks:
        best = system.best_path(task)
        if best is not None and best.agent != agent.name:
            raise AgentError(
                f"agent {agent.name!r}: task {task!r} is evolved by agent {best.agent!r} (its "
                f"published path {best.id} lives in that shard); run that agent, or give "
                f"{agent.name!r} other tasks"
            )
    return system


def run_agent(
    store_url: str,
    agent: Agent,
    cycles: int = 1,
    *,
    progress: bool = False,
    logdir: str | None = None,
    validate_tasks: bool = True,
    max_task_iterations: int = 0,
    log: Callable[[str], None] = print,
    wait_for_lease: bool = False,
    lease_ttl_s: float = 30.0,
) -> list[dict[str, Any]]:
    """Runs ``agent`` until each of its tasks has ``cycles`` task iterations in the store.

    The count is absolute (what the store records), so a restarted agent resumes where its last
    commit left off. The agent holds its shard's lease for the whole run: a second process for
    the same agent is refused (:class:`LeaseHeldError` naming the holder) unless
    ``wait_for_lease``, and a crashed holder's lease expires after ``lease_ttl_s``. Gin files of
    the agent are parsed into a fresh gin config for the duration of the call (gin is
    process-global: run one gin-configured agent per process at a time).

    Returns:
      The summaries of the task iterations this call ran.
    """
    for module in agent.modules:
        importlib.import_module(module)
    uses_gin = agent.config is None and (agent.gin_files or agent.gin_bindings)
    if uses_gin:
        gin.clear_config()  # also unlocks a finalized config
        args = argparse.Namespace(
            gin_file=list(agent.gin_files),
            gin_bindings=list(agent.gin_bindings),
            gin_search_paths="",
        )
        gin_utils.parse_gin(args, finalize=False)
    try:
        config = agent.build_config()
        config.num_cycles = int(cycles)
        store = open_shared(store_url, config)
        with ShardLease(store, agent.name, ttl_s=lease_ttl_s, wait=wait_for_lease):
            claim_tasks(store, agent, validate=validate_tasks)
            evolver = Evolver(
                store,
                config,
                agent=agent.name,
                tasks=agent.tasks,
                logdir=logdir,
                progress=progress,
                log=log,
            )
            return evolver.run(max_task_iterations=max_task_iterations)
    finally:
        if uses_gin:
            gin.clear_config()


def add_lease_flags(parser: argparse.ArgumentParser) -> None:
    """``--wait_for_lease`` and ``--lease_ttl_s`` (agents and ``mu2net evolve``)."""
    parser.add_argument(
        "--wait_for_lease",
        action="store_true",
        help="wait for the process holding this agent's shard to finish instead of exiting",
    )
    parser.add_argument(
        "--lease_ttl_s",
        type=float,
        default=30.0,
        help="seconds a crashed holder's shard lease blocks others (renewed every ttl/3)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mu2net.evolution.agents``: evolve's flags; ``--agent``, ``--tasks`` required."""
    from mu2net.evolution.main import build_parser

    parser = build_parser(prog="python -m mu2net.evolution.agents")
    parser.add_argument("--cycles", type=int, default=0, help="task iterations per task (0: gin)")
    parser.add_argument("--module", action="append", default=[], help="module to import first")
    add_lease_flags(parser)
    args = parser.parse_args(gin_utils.rewrite_gin_args(sys.argv[1:] if argv is None else argv))
    try:
        if not args.agent or not args.tasks:
            raise AgentError("an agent needs --agent=NAME and --tasks=T1,T2")
        for module in args.module:
            importlib.import_module(module)
        gin_utils.parse_gin(args, finalize=False)
        config = EvolutionConfig()
        config.continuous = config.continuous or args.continuous
        agent = Agent(args.agent, tuple(t for t in args.tasks.split(",") if t), config=config)
        run_agent(
            args.store,
            agent,
            args.cycles or config.num_cycles,
            progress=not args.no_progress,
            logdir=args.logdir or None,
            max_task_iterations=args.max_task_iterations,
            wait_for_lease=args.wait_for_lease,
            lease_ttl_s=args.lease_ttl_s,
        )
    except (gin_utils.GinConfigError, ValueError, StoreError) as e:
        print(f"mu2net agent: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
