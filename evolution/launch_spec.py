"""Agents of a launch: SPEC files, resource requests, and the checks made before Ray sees them.

:func:`plan` turns SPEC entries (or one default agent per task of the live mixture) into
:class:`PlannedAgent` records after checking everything a user can get wrong -- names, tasks
registered in seqio, gin files and bindings, the strategy (agent class), task ownership -- so
bad input is refused with one line naming the culprit before anything is submitted or
committed. :mod:`mu2net.evolution.launch` runs the planned agents on Ray.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from mu2net.errors import Mu2netError
from mu2net.evolution.agents import Agent
from mu2net.system.names import agent_for_task
from mu2net.system.store import Store, StoreError
from mu2net.train._gin import gin

SPEC_KEYS = ("name", "tasks", "gin_files", "gin_bindings", "strategy", "resources")


class LaunchError(Mu2netError, ValueError):
    """A launch that cannot start as asked (names the agent, task, key or address)."""


@gin.configurable
@dataclasses.dataclass
class AgentResources:
    """What one agent asks Ray for (gin: ``AgentResources.num_gpus = 1``).

    Attributes:
      num_cpus: logical CPUs of the agent's Ray task.
      num_gpus: GPUs of the agent's Ray task.
      resources: custom Ray resources, e.g. ``{"TPU": 4}``.
    """

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = dataclasses.field(default_factory=dict)

    def request(self) -> dict[str, float]:
        """The request as Ray resource names (``CPU``, ``GPU``, custom), zeros dropped."""
        req = {"CPU": float(self.num_cpus), "GPU": float(self.num_gpus)}
        req.update({k: float(v) for k, v in self.resources.items()})
        return {k: v for k, v in req.items() if v > 0}


@dataclasses.dataclass
class AgentSpec:
    """One agent as the user describes it (a SPEC entry, or a default agent of a task).

    Attributes:
      name: agent (shard) name.
      tasks: seqio tasks it owns.
      gin_files: its gin files (empty: the launcher's).
      gin_bindings: gin bindings applied after the launcher's.
      strategy: agent strategy (``EvolutionConfig.strategy``), empty for gin's.
      resources: overrides of :class:`AgentResources` fields; other keys are custom resources.
      where: where it was defined, for error messages.
    """

    name: str
    tasks: tuple[str, ...]
    gin_files: tuple[str, ...] = ()
    gin_bindings: tuple[str, ...] = ()
    strategy: str = ""
    resources: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    where: str = ""


@dataclasses.dataclass
class LaunchOptions:
    """How to launch (the ``mu2net launch`` flags).

    Attributes:
      store: system store URL (shared by every worker: a ``gs://`` URL on a real cluster).
      gin_files: default gin files of every agent.
      gin_bindings: gin bindings of every agent.
      gin_search_paths: extra directories for gin files.
      modules: Python modules registering tasks; imported here and in every worker (shipped
        through Ray's ``runtime_env`` ``py_modules`` unless they belong to the mu2net package).
      cycles: task iterations per task (0: each agent's ``EvolutionConfig.num_cycles``).
      continuous: agents keep serving; new tasks of the live mixture get new agents.
      max_retries: Ray retries of an agent whose worker died.
      lease_ttl_s: shard lease TTL (how long a dead worker's lease blocks its retry).
      poll_seconds: continuous mode: seconds between looks at the live mixture.
      table_seconds: seconds between redraws of the table.
      run_dir: directory of the per-agent log files (default: under the store when local).
      logdir: TensorBoard root (one subdirectory per agent; default ``<store>/tensorboard``).
      check_resources: refuse requests no node has (off for autoscaling clusters).
      validate_tasks: run the data checks when an agent adds its task to the live mixture.
    """

    store: str
    gin_files: tuple[str, ...] = ()
    gin_bindings: tuple[str, ...] = ()
    gin_search_paths: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()
    cycles: int = 0
    continuous: bool = False
    max_retries: int = 3
    lease_ttl_s: float = 30.0
    poll_seconds: float = 10.0
    table_seconds: float = 5.0
    run_dir: str | None = None
    logdir: str | None = None
    check_resources: bool = True
    validate_tasks: bool = True


@dataclasses.dataclass
class PlannedAgent:
    """An agent checked in the launcher and ready to submit."""

    spec: AgentSpec
    agent: Agent
    cycles: int
    resources: AgentResources
    gin_texts: dict[str, str]  # local gin files shipped to workers that lack them
    config: Any = None  # the agent's EvolutionConfig as the launcher resolved it


# ------------------------------------------------------------------------------ SPEC files
def read_spec(path: str) -> list[AgentSpec]:
    """Reads a SPEC file (YAML or JSON): a list of agents or ``{"agents": [...]}``.

    Raises:
      LaunchError: the file is missing or malformed; names the file, entry and key.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise LaunchError(f"--agents={path}: cannot read the SPEC file ({e.strerror})") from e
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except ValueError as e:  # json and yaml errors both derive from ValueError... mostly
        raise LaunchError(f"--agents={path}: not valid JSON/YAML: {e}") from e
    except Exception as e:  # yaml.YAMLError
        raise LaunchError(f"--agents={path}: not valid YAML: {e}") from e
    if isinstance(data, dict) and set(data) == {"agents"}:
        data = data["agents"]
    if not isinstance(data, list) or not data:
        raise LaunchError(f"--agents={path}: expected a non-empty list of agents")
    return [_spec_entry(path, i, entry) for i, entry in enumerate(data)]


def _spec_entry(path: str, i: int, entry: Any) -> AgentSpec:
    where = f"{path} entry {i}"
    if not isinstance(entry, dict):
        raise LaunchError(f"{where}: expected a mapping with keys {list(SPEC_KEYS)}")
    unknown = sorted(set(entry) - set(SPEC_KEYS))
    if unknown:
        raise LaunchError(f"{where}: unknown key(s) {unknown}; known: {list(SPEC_KEYS)}")
    if "name" not in entry or "tasks" not in entry:
        raise LaunchError(f"{where}: an agent needs 'name' and 'tasks'")
    tasks = entry["tasks"]
    tasks = [tasks] if isinstance(tasks, str) else tasks

    def strings(key: str) -> tuple[str, ...]:
        value = entry.get(key) or ()
        value = [value] if isinstance(value, str) else value
        if not all(isinstance(v, str) for v in value):
            raise LaunchError(f"{where}: {key!r} must be a list of strings")
        return tuple(value)

    resources = entry.get("resources") or {}
    if not isinstance(resources, dict) or not all(
        isinstance(v, int | float) and v >= 0 for v in resources.values()
    ):
        raise LaunchError(f"{where}: 'resources' must map names to numbers >= 0")
    entry = {**entry, "tasks": tasks}
    return AgentSpec(
        name=str(entry["name"]),
        tasks=strings("tasks"),
        gin_files=strings("gin_files"),
        gin_bindings=strings("gin_bindings"),
        strategy=str(entry.get("strategy") or ""),
        resources=resources,
        where=f"{where} (agent {entry['name']!r})",
    )


# ------------------------------------------------------------------------------ planning
def import_modules(modules: Sequence[str]) -> None:
    """Imports the bundled tasks and ``modules`` (errors name the module)."""
    import mu2net.tasks  # noqa: F401  (registers the bundled tasks)

    for m in modules:
        try:
            importlib.import_module(m)
        except ImportError as e:
            raise LaunchError(f"--module={m}: cannot import it: {e}") from e


def default_specs(store: Store, covered: Sequence[str] = ()) -> list[AgentSpec]:
    """One agent per task of the live mixture not in ``covered``, named after its owner.

    A task already published by an agent keeps that agent (its shard); tasks of one owner form
    one agent. A new task gets the per-task shard name (as ``mu2net evolve``).
    """
    system = store.load()
    owners: dict[str, list[str]] = {}
    for task in system.tasks:
        if task in covered:
            continue
        best = system.best_path(task)
        owners.setdefault(best.agent if best else agent_for_task(task), []).append(task)
    return [
        AgentSpec(name, tuple(tasks), where=f"live mixture (agent {name!r})")
        for name, tasks in owners.items()
    ]


def _resolve_gin_files(files: Sequence[str], search: Sequence[str]) -> tuple[list[str], dict]:
    """Absolute paths for local files (their text shipped); package configs stay relative."""
    from mu2net.gin_utils import package_gin_dir

    out, texts = [], {}
    for name in files:
        local = [name] if os.path.isabs(name) else [os.path.join(d, name) for d in search]
        found = next((p for p in local if os.path.isfile(p)), None)
        if found is None and os.path.isfile(os.path.join(package_gin_dir(), name)):
            out.append(name)  # shipped inside the package: every worker has it
            continue
        if found is None:
            raise LaunchError(f"gin file {name!r}: not found in {list(search)} or the package")
        found = os.path.abspath(found)
        with open(found, encoding="utf-8") as f:
            texts[found] = f.read()
        out.append(found)
    return out, texts


def plan_agent(spec: AgentSpec, options: LaunchOptions, store: Store | None) -> PlannedAgent:
    """Checks one agent in the launcher: names, tasks, gin config, strategy, ownership.

    Raises:
      LaunchError: names the agent (and its SPEC entry) and the culprit.
    """
    import seqio

    from mu2net import gin_utils
    from mu2net.evolution.strategy import get_strategy
    from mu2net.models.base import get_family

    where = spec.where or f"agent {spec.name!r}"
    known = set(seqio.TaskRegistry.names())
    for task in spec.tasks:
        if task not in known:
            raise LaunchError(
                f"{where}: task {task!r} is not a registered seqio task; register it in a "
                "module and pass --module=THAT_MODULE"
            )
    search = [*options.gin_search_paths, os.getcwd()]
    files, texts = _resolve_gin_files(spec.gin_files or options.gin_files, search)
    bindings = [*options.gin_bindings, *spec.gin_bindings]
    if spec.strategy:
        bindings.append(f"EvolutionConfig.strategy = {spec.strategy!r}")
    if options.continuous:
        bindings.append("EvolutionConfig.continuous = True")
    try:
        agent = Agent(spec.name, spec.tasks, tuple(files), tuple(bindings),
                      modules=tuple(options.modules))  # fmt: skip
        gin.clear_config()
        args = _gin_args(files, bindings, options.gin_search_paths)
        gin_utils.parse_gin(args, finalize=False)
        config = agent.build_config()
        resources = AgentResources()
        config.num_cycles = options.cycles or config.num_cycles
        config.validate(get_family(config.family))
        strategy = get_strategy(config.strategy)
        if not strategy.publishes:
            raise LaunchError(f"strategy {config.strategy!r} publishes nothing")
    except Mu2netError as e:
        raise LaunchError(f"{where}: {e}") from e
    finally:
        gin.clear_config()
    resources = _merge_resources(resources, spec.resources)
    if store is not None:
        _check_ownership(store, spec, where)
    return PlannedAgent(spec, agent, config.num_cycles, resources, texts, config)


def _gin_args(files, bindings, search_paths):
    return argparse.Namespace(
        gin_file=list(files),
        gin_bindings=list(bindings),
        gin_search_paths=",".join(search_paths),
    )


def _merge_resources(base: AgentResources, override: Mapping[str, Any]) -> AgentResources:
    custom = {k: v for k, v in override.items() if k not in ("num_cpus", "num_gpus")}
    return AgentResources(
        num_cpus=float(override.get("num_cpus", base.num_cpus)),
        num_gpus=float(override.get("num_gpus", base.num_gpus)),
        resources={**base.resources, **custom},
    )


def _check_ownership(store: Store, spec: AgentSpec, where: str) -> None:
    system = store.load()
    for task in spec.tasks:
        best = system.best_path(task)
        if best is not None and best.agent != spec.name:
            raise LaunchError(
                f"{where}: task {task!r} is evolved by agent {best.agent!r} (path {best.id}); "
                f"name that agent {best.agent!r} or give {spec.name!r} other tasks"
            )


def plan(specs: Sequence[AgentSpec], options: LaunchOptions) -> list[PlannedAgent]:
    """Checks every agent before anything is submitted (so bad input commits nothing)."""
    store = open_store(options.store, required=not specs)
    if not specs:
        specs = default_specs(store)
        if not specs and not options.continuous:
            raise LaunchError(
                f"store {options.store}: the live mixture is empty; add tasks with "
                "`mu2net add-task` or give --agents=SPEC"
            )
    names, owned = set(), {}
    for s in specs:
        if s.name in names:
            raise LaunchError(f"{s.where}: agent name {s.name!r} is used twice")
        names.add(s.name)
        for t in s.tasks:
            if t in owned:
                raise LaunchError(f"{s.where}: task {t!r} is also owned by agent {owned[t]!r}")
            owned[t] = s.name
    return [plan_agent(s, options, store) for s in specs]


def open_store(url: str, required: bool) -> Store | None:
    """The store at ``url``; when absent, None (or :class:`LaunchError` if ``required``)."""
    try:
        return Store.open(url)
    except StoreError as e:
        if required:
            raise LaunchError(
                f"--store={url}: {e}; create it with `mu2net init` and `mu2net add-task`, or "
                "give --agents=SPEC (the agents then create it)"
            ) from e
        return None
