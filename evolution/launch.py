r"""``mu2net launch``: the multiagent framework on Ray, one Ray task per agent (reference §7.2).

Each agent (a method configuration and the tasks it owns, :class:`~mu2net.evolution.agents.Agent`)
runs as one Ray task that calls :func:`~mu2net.evolution.agents.run_agent` inside a Ray worker.
Nothing here schedules, restarts or places work by itself; Ray does:

* **placement**: each agent asks for ``AgentResources`` (CPUs, GPUs, custom resources such as
  ``TPU``) from its gin files, overridden by its SPEC entry; a request no node of the cluster
  can satisfy is refused before anything is submitted;
* **retries**: a worker that dies (SIGKILL, OOM, a lost node) is retried by Ray
  (``max_retries``); the retry resumes from the agent's last commit (``run_agent`` counts task
  iterations in the store) and waits for the dead worker's shard lease to expire, so an agent
  never runs twice at once. An agent that fails with a :class:`~mu2net.errors.Mu2netError`
  (bad task, bad config) fails for good at once and the others run on;
* **logs**: every agent's log lines reach the launcher through a small Ray actor and land in
  ``<run_dir>/<agent>.log``; the workers' own stdout/stderr are in Ray's logs (and dashboard).

The launcher prints a live table (state, attempt, task iterations done/target, best quality,
last commit). In continuous mode it polls the store's live mixture and gives every task added
with ``mu2net add-task`` an agent without a restart. Command line::

    mu2net launch --store=gs://bucket/sys --ray_address=HEAD:6379 \
        --gin_file=experiments/vit_ti0_quick.gin --agents=agents.yaml --cycles=2

A SPEC (YAML or JSON) is a list of agents (or ``{"agents": [...]}``), each with ``name``,
``tasks`` and optionally ``gin_files`` (replacing the launcher's), ``gin_bindings`` (after the
launcher's), ``strategy`` (bound as ``EvolutionConfig.strategy``) and ``resources``
(``num_cpus``, ``num_gpus``, any other key is a custom Ray resource).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mu2net.errors import Mu2netError
from mu2net.evolution.launch_spec import (
    AgentResources,
    AgentSpec,
    LaunchError,
    LaunchOptions,
    PlannedAgent,
    default_specs,
    import_modules,
    open_store,
    plan,
    plan_agent,
    read_spec,
)
from mu2net.system.store import StoreError
from mu2net.text_table import table

__all__ = [
    "AgentResources", "AgentRun", "AgentSpec", "Board", "LaunchError", "LaunchOptions",
    "Launcher", "PlannedAgent", "check_feasible", "connect", "launch", "plan", "prepare_store",
    "read_spec", "run_in_worker", "runtime_env", "summary",
]  # fmt: skip
FINAL = ("done", "failed", "stopped")


# ------------------------------------------------------------------------------ Ray
def connect(address: str | None = None, num_cpus: int | None = None, dashboard: bool = False,
            modules: Sequence[str] = ()) -> bool:  # fmt: skip
    """Connects to the Ray cluster at ``address``, or starts a local one on 127.0.0.1.

    The job's ``runtime_env`` ships ``modules`` that are not part of mu2net to every worker
    (Ray uploads local code only at the job level). When Ray is already initialized in this
    process it is reused as it is: its job's ``runtime_env`` is the caller's.

    Returns:
      True when this call started Ray (the caller shuts it down), False when it was running.

    Raises:
      LaunchError: nothing answers at ``address`` (checked before Ray tries).
    """
    import ray

    if address not in (None, "auto"):
        _check_reachable(address)
    if ray.is_initialized():
        return False
    quiet = dict(log_to_driver=False, logging_level="WARNING", runtime_env=runtime_env(modules))
    if address is None:
        ray.init(address="local", include_dashboard=dashboard, num_cpus=num_cpus,
                 _node_ip_address="127.0.0.1", **quiet)  # fmt: skip
        return True
    try:
        ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise LaunchError(f"--ray_address={address}: cannot connect to a Ray cluster: {e}") from e
    return True


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    default = 10001 if address.startswith("ray://") else 6379
    host, port = (host, port) if host and port.isdigit() else (hostport, str(default))
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise LaunchError(
            f"--ray_address={address}: no Ray cluster answers at {host}:{port} ({e}); start one "
            "with `ray start --head` there, or omit --ray_address for a local Ray"
        ) from e


def check_feasible(planned: Sequence[PlannedAgent]) -> None:
    """Refuses agents whose request no alive node of the cluster can satisfy."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    for p in planned:
        req = p.resources.request()
        if any(all(node.get(k, 0.0) >= v for k, v in req.items()) for node in nodes):
            continue
        have = {k: v for k, v in ray.cluster_resources().items() if not k.startswith("node:")}
        missing = sorted(k for k, v in req.items() if not any(n.get(k, 0.0) >= v for n in nodes))
        raise LaunchError(
            f"{p.spec.where or p.spec.name}: asks for {req} but no node of the Ray cluster has "
            f"{missing or 'all of that at once'} (cluster: {have}); lower its resources "
            "(AgentResources in gin or the SPEC's 'resources'), add such nodes, or pass "
            "--no_resource_check for an autoscaling cluster"
        )


def prepare_store(url: str, planned: Sequence[PlannedAgent]) -> None:
    """Creates the store and every agent class's missing root, one after another, here.

    Agents started at once on an empty store would otherwise race to create the roots of
    their classes; done once by the launcher, every agent finds its root.
    """
    from mu2net.evolution.agents import open_shared

    for p in planned:
        open_shared(url, p.config)


def runtime_env(modules: Sequence[str]) -> dict[str, Any] | None:
    """``py_modules`` shipping the user's modules that are not part of the mu2net package."""
    ship = []
    for m in modules:
        top = sys.modules[m.split(".")[0]]
        if top.__name__ == "mu2net" or not getattr(top, "__file__", None):
            continue
        # A package ships as its folder, a single-file module as its file.
        path = os.path.dirname(top.__file__) if hasattr(top, "__path__") else top.__file__
        if path not in ship:
            ship.append(os.path.abspath(path))
    return {"py_modules": ship} if ship else None


def local_path(url: str) -> str | None:
    """The local directory of a store URL (None for remote stores)."""
    if url.startswith("file://"):
        return url[len("file://") :]
    return None if "://" in url else url


# ------------------------------------------------------------------------------ workers
class Board:
    """The Ray actor agents report to: attempts, pids, states, log lines (one per launch)."""

    def __init__(self) -> None:
        self.agents: dict[str, dict[str, Any]] = {}
        self.lines: list[tuple[str, str]] = []

    def started(self, name: str, pid: int, node: str) -> int:
        """Records an attempt of ``name`` starting in worker ``pid``; returns its number."""
        rec = self.agents.setdefault(name, {"attempt": 0})
        rec.update(attempt=rec["attempt"] + 1, pid=pid, node=node, state="running",
                   started=time.time())  # fmt: skip
        self.lines.append((name, f"attempt {rec['attempt']} started: pid {pid} on {node}"))
        return rec["attempt"]

    def log(self, name: str, line: str) -> None:
        """One log line of agent ``name``."""
        self.lines.append((name, line))

    def agent(self, name: str) -> dict[str, Any]:
        """The record of agent ``name`` (empty before its first attempt starts)."""
        return dict(self.agents.get(name, {}))

    def snapshot(self, since: int) -> tuple[dict[str, dict[str, Any]], list, int]:
        """Agent records, the log lines after index ``since``, and the new index."""
        return self.agents, self.lines[since:], len(self.lines)


def run_in_worker(store_url: str, planned: PlannedAgent, board: Any, lease_ttl_s: float,
                  logdir: str | None, validate_tasks: bool) -> dict[str, Any]:  # fmt: skip
    """The body of an agent's Ray task: runs the agent with its shard lease held.

    A :class:`Mu2netError` is returned as a failure (Ray does not retry it); a dead worker is
    retried by Ray and this runs again, resuming from the store.
    """
    import ray

    from mu2net.evolution.agents import run_agent

    name = planned.agent.name
    node = ray.get_runtime_context().get_node_id()[:12]
    attempt = ray.get(board.started.remote(name, os.getpid(), node))
    agent = dataclasses.replace(planned.agent, gin_files=_materialize(planned))

    def log(line: str) -> None:
        board.log.remote(name, line)

    t0 = time.time()
    try:
        summaries = run_agent(
            store_url, agent, planned.cycles, log=log, wait_for_lease=True,
            lease_ttl_s=lease_ttl_s, logdir=logdir, validate_tasks=validate_tasks,
        )  # fmt: skip
    except Mu2netError as e:
        return {"ok": False, "attempt": attempt, "error": f"{type(e).__name__}: {e}"}
    return {"ok": True, "attempt": attempt, "iterations": len(summaries),
            "seconds": time.time() - t0}  # fmt: skip


def _materialize(planned: PlannedAgent) -> tuple[str, ...]:
    """Gin files as this worker sees them: local copies of the launcher's when it lacks them."""
    import tempfile

    out = []
    for path in planned.agent.gin_files:
        if path in planned.gin_texts and not os.path.isfile(path):
            folder = tempfile.mkdtemp(prefix=f"mu2net-gin-{planned.agent.name}-")
            copy = os.path.join(folder, os.path.basename(path))
            with open(copy, "w", encoding="utf-8") as f:
                f.write(planned.gin_texts[path])
            path = copy
        out.append(path)
    return tuple(out)


# ------------------------------------------------------------------------------ launcher
@dataclasses.dataclass
class AgentRun:
    """The launcher's view of one agent."""

    planned: PlannedAgent
    ref: Any = None
    state: str = "pending"
    attempt: int = 0
    pid: int | None = None
    error: str = ""
    iterations: dict[str, int] = dataclasses.field(default_factory=dict)
    quality: float | None = None
    last_commit: float | None = None
    note: str = ""
    submitted: float = dataclasses.field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    result: dict[str, Any] = dataclasses.field(default_factory=dict)


class Launcher:
    """Submits agents to Ray, follows them, writes their logs, prints the live table.

    Args:
      options: the launch options.
      specs: the agents (default: one per task of the live mixture).
      out: where the table and messages go.
    """

    def __init__(self, options: LaunchOptions, specs: Sequence[AgentSpec] = (),
                 out: Callable[[str], None] = print):  # fmt: skip
        self.options = options
        self.out = out
        import_modules(options.modules)
        self.planned = plan(specs, options)
        self.runs: dict[str, AgentRun] = {}
        self.run_dir = options.run_dir or _default_run_dir(options.store)
        self.logdir = options.logdir if options.logdir is not None else _default_logdir(options)
        self._stop = threading.Event()
        self._lines = 0
        self._board = None
        self._remote = None
        self._last_table = ""

    def start(self) -> None:
        """Checks resources against the cluster and submits every planned agent."""
        import ray

        if self.options.check_resources:
            check_feasible(self.planned)
        os.makedirs(self.run_dir, exist_ok=True)
        prepare_store(self.options.store, self.planned)
        self._board = ray.remote(num_cpus=0)(Board).remote()
        self._remote = ray.remote(run_in_worker)
        for p in self.planned:
            self._submit(p)

    def _submit(self, p: PlannedAgent) -> None:
        res = p.resources
        options = dict(num_cpus=res.num_cpus, num_gpus=res.num_gpus,
                       max_retries=self.options.max_retries, retry_exceptions=[OSError],
                       name=f"mu2net-agent:{p.agent.name}")  # fmt: skip
        if res.resources:
            options["resources"] = dict(res.resources)
        logdir = f"{self.logdir.rstrip('/')}/{p.agent.name}" if self.logdir else None
        ref = self._remote.options(**options).remote(
            self.options.store, p, self._board, self.options.lease_ttl_s, logdir,
            self.options.validate_tasks,
        )  # fmt: skip
        self.runs[p.agent.name] = AgentRun(p, ref)
        self._write(p.agent.name, _header(p, options))

    def stop(self) -> None:
        """Asks :meth:`run` to stop (it cancels the running agents)."""
        self._stop.set()

    def run(self, timeout_s: float | None = None) -> dict[str, AgentRun]:
        """Follows the agents until all finish (continuous: until :meth:`stop`).

        Returns:
          Every agent's run record (``state`` ``done``, ``failed`` or ``stopped``).
        """
        import ray

        if self._board is None:
            self.start()
        deadline = None if timeout_s is None else time.time() + timeout_s
        next_poll = time.time() + self.options.poll_seconds
        next_table = 0.0
        while not self._stop.is_set():
            refs = [r.ref for r in self.runs.values() if r.state not in FINAL]
            if not refs and not self.options.continuous:
                break
            if deadline is not None and time.time() > deadline:
                raise LaunchError(f"launch did not finish within {timeout_s:.0f} s")
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0.5) if refs else ([], [])
            if not refs:
                self._stop.wait(0.5)
            for r in self.runs.values():
                if r.ref in ready and r.state not in FINAL:
                    self._finish(r)
            self.poll()
            if self.options.continuous and time.time() >= next_poll:
                self._add_new_tasks()
                next_poll = time.time() + max(0.5, min(self.options.poll_seconds, 60.0))
            if time.time() >= next_table:
                self.print_table()
                next_table = time.time() + self.options.table_seconds
        self._cancel_running()
        self.poll()
        self.print_table(final=True)
        return self.runs

    def _finish(self, r: AgentRun) -> None:
        import ray

        name = r.planned.agent.name
        try:
            result = ray.get(r.ref)
        except ray.exceptions.TaskCancelledError:
            r.state, r.error = "stopped", "cancelled by the launcher"
        except ray.exceptions.RayError as e:  # a bug's traceback, or retries exhausted
            r.state, r.error = "failed", str(e).strip().splitlines()[-1][:300]
            self._write(name, f"failed for good:\n{e}")
            return
        else:
            r.state = "done" if result["ok"] else "failed"
            r.result, r.finished = result, time.time()
            r.error = result.get("error", "")
        self._write(name, f"{r.state}{': ' + r.error if r.error else ''}")

    def poll(self) -> None:
        """Reads the board: attempts, pids and log lines (written to the agents' files)."""
        import ray

        if self._board is None:
            return
        agents, lines, self._lines = ray.get(self._board.snapshot.remote(self._lines))
        for name, line in lines:
            self._write(name, line)
        for name, rec in agents.items():
            r = self.runs.get(name)
            if r is not None:
                r.attempt, r.pid = rec["attempt"], rec["pid"]
                r.started = r.started or rec["started"]
                if r.state == "pending":
                    r.state = "running"

    def _add_new_tasks(self) -> None:
        covered = [t for r in self.runs.values() for t in r.planned.agent.tasks]
        store = open_store(self.options.store, required=False)
        if store is None:
            return
        for spec in default_specs(store, covered):
            if spec.name in self.runs:
                spec = dataclasses.replace(spec, name=f"{spec.name}-{len(self.runs)}")
            try:
                p = plan_agent(spec, self.options, store)
                if self.options.check_resources:
                    check_feasible([p])
            except LaunchError as e:  # a bad new task fails alone; the others run on
                self.runs[spec.name] = AgentRun(None, state="failed", error=str(e))
                self.out(f"mu2net launch: agent {spec.name!r} not started: {e}")
                continue
            self.out(f"mu2net launch: new task(s) {', '.join(spec.tasks)}: agent {spec.name!r}")
            self.planned.append(p)
            prepare_store(self.options.store, [p])
            self._submit(p)

    def _cancel_running(self) -> None:
        import ray

        running = [r for r in self.runs.values() if r.state not in FINAL and r.ref is not None]
        for r in running:
            ray.cancel(r.ref, force=False)  # KeyboardInterrupt in the worker: lease released
        deadline = time.time() + 10.0
        for r in running:
            try:
                ray.get(r.ref, timeout=max(0.1, deadline - time.time()))
            except ray.exceptions.GetTimeoutError:
                ray.cancel(r.ref, force=True)
            except ray.exceptions.RayError:
                pass
            r.state, r.error = "stopped", "stopped by the launcher"
            self._write(r.planned.agent.name, "stopped by the launcher")

    # -------------------------------------------------------------------- output
    def progress(self) -> None:
        """Reads task iterations, best quality and last commit of every agent from the store."""
        store = open_store(self.options.store, required=False)
        if store is None:
            return
        try:
            system = store.load()
            shards = set(store.shards())
            for name, r in self.runs.items():
                if r.planned is None:
                    continue
                for task in r.planned.agent.tasks:
                    best = system.best_path(task)
                    r.iterations[task] = int(best.metrics.get("task_iterations", 0)) if best else 0
                    q = best.metrics.get("quality") if best else None
                    if q is not None:
                        r.quality = q if r.quality is None else max(r.quality, q)
                body = store.latest_manifest(name) if name in shards else None
                if body:
                    r.last_commit, r.note = body["created"], body.get("note", "")
        except StoreError as e:  # a store mid-creation: the next redraw reads it again
            self._last_table = f"(store not readable yet: {e})"

    def table(self) -> str:
        """The table of agents: state, attempt, iterations done/target, quality, last commit."""
        rows = []
        for name, r in self.runs.items():
            target = r.planned.cycles if r.planned else 0
            done = min(r.iterations.values()) if r.iterations else 0
            total = len(r.iterations) * target
            bar = _bar(sum(min(v, target) for v in r.iterations.values()), total)
            age = f"{time.time() - r.last_commit:.0f}s ago {r.note}" if r.last_commit else "-"
            state = r.state if not self.options.continuous or r.state != "running" else "serving"
            rows.append([
                name, state, str(r.attempt), ",".join(r.planned.agent.tasks) if r.planned else "-",
                f"{done}/{target} {bar}", "-" if r.quality is None else f"{r.quality:.4f}",
                age[:40], r.error[:60],
            ])  # fmt: skip
        return table(
            ["agent", "state", "attempt", "tasks", "iterations", "best", "last commit", "error"],
            rows,
        )

    def print_table(self, final: bool = False) -> None:
        """Prints the table when it changed (always when ``final``)."""
        self.progress()
        text = self.table()
        if final or text.split("\n", 2)[-1] != self._last_table.split("\n", 2)[-1]:
            self.out(text)
            self._last_table = text

    def _write(self, name: str, line: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        with open(os.path.join(self.run_dir, f"{name}.log"), "a", encoding="utf-8") as f:
            f.write(f"{stamp} {line}\n")


def _bar(done: int, total: int, width: int = 10) -> str:
    filled = int(width * done / total) if total else 0
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _header(p: PlannedAgent, options: Mapping[str, Any]) -> str:
    req = p.resources.request()
    return (
        f"agent {p.agent.name}: tasks {list(p.agent.tasks)}, cycles {p.cycles}, "
        f"gin files {list(p.agent.gin_files)}, bindings {list(p.agent.gin_bindings)}, "
        f"resources {req}, max_retries {options['max_retries']}; the worker's own stdout/stderr "
        "are in Ray's logs (`ray logs`, the dashboard)"
    )


def _default_run_dir(store: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    local = local_path(store)
    return os.path.join(local, "launch", stamp) if local else os.path.join("launch", stamp)


def _default_logdir(options: LaunchOptions) -> str | None:
    local = local_path(options.store)
    if local:
        return os.path.join(os.path.abspath(local), "tensorboard")
    return options.store.rstrip("/") + "/tensorboard" if options.store.startswith("gs://") else None


def summary(runs: Mapping[str, AgentRun]) -> str:
    """One line per agent that did not finish: name, state, error."""
    return "; ".join(
        f"{name}: {r.state} ({r.error})" for name, r in runs.items() if r.state != "done"
    )


def launch(options: LaunchOptions, specs: Sequence[AgentSpec] = (), *,
           ray_address: str | None = None, dashboard: bool = False,
           out: Callable[[str], None] = print) -> dict[str, AgentRun]:  # fmt: skip
    """Plans, connects, runs every agent to the end; shuts down a Ray this call started.

    Raises:
      LaunchError: bad input (before anything is submitted), or agents that failed for good
        (after the others finished), naming each.
    """
    launcher = Launcher(options, specs, out=out)  # plans first: bad input never reaches Ray
    started = connect(ray_address, dashboard=dashboard, modules=options.modules)
    try:
        launcher.start()
        try:
            runs = launcher.run()
        except KeyboardInterrupt:
            launcher.stop()
            runs = launcher.run()
    finally:
        if started:
            import ray

            ray.shutdown()
    out(f"agent logs in {launcher.run_dir}")
    failed = {n: r for n, r in runs.items() if r.state == "failed"}
    if failed:
        raise LaunchError(f"{len(failed)} of {len(runs)} agent(s) failed: {summary(failed)}")
    return runs
