"""Crash-safety benchmark: SIGKILL ``mu2net evolve`` at random instants, restart, check the store.

Runs ``mu2net evolve --gin_file=tests/data/tiny_vit.gin`` on the small bundled tasks and kills it
with SIGKILL, then restarts it, over and over, in *chains*: a chain starts from an empty store and
ends with an uninterrupted run that must complete. Kinds of kill:

* ``timed``: the parent kills the process a random delay after its n-th committed task
  iteration (the ``[task] iteration i`` log line), so kills land anywhere in the following
  generations, test evaluations and commits;
* ``gen``: the process kills itself at the k-th write of its first per-generation commit (the
  commit after an improving generation: params, history, manifest, task index, marker), before
  the write, after its temp file but before the atomic publish, or right after the publish;
* ``write``: the same at the k-th store write of the run (any commit);
* ``lease``: the same at the k-th lease renewal (the restart waits out the dead lease);
* ``serve``: a serving reader (a ``PredictorPool`` process following the store) is SIGKILLed at
  a random file read of a reload (:class:`ServeCheck`); a new reader takes over.

Hooked kinds run through this file (``--fault-child``), which installs the hook and then calls
the same ``main``. After every kill: the store opens, every checksum verifies (``Store.verify``),
the merged system validates, and no published path changed: each path published before the kill
still exists with the same components, hparams and bit-identical params, and the same record,
unless its task committed a generation or iteration since; components never change; no committed
manifest or generation is lost, none is committed twice (a restart resumes after the last
committed generation); the serving reader answers every task from its published path, like a
fresh ``mu2net.serve.load``, and a path's predictions never change. Each chain's final system is
compared with an uninterrupted reference run (same seed): same paths, params and predictions.

By default each run is a fork of this process, which imported everything once: on a busy 2-core
CPU the ~25 s of imports per run would dominate. ``--spawn=subprocess`` runs ``python -m
mu2net.cli evolve`` each time, as the CI test (tests/test_reliability_crash.py) does. Prints a
table and writes ``benchmarks/faults.json``; ``--resume`` checkpoints it after every kill and
continues from it (inside a chain too), so a long campaign runs in parts (``--budget_s``).

Usage: ``python benchmarks/faults.py [--kills 40] [--seed 0] [--resume --budget_s 200]``.
``--fuzz N`` runs N fuzzed-store-file cases instead (the mutations and oracle of
``tests/test_system_fuzz.py``) and reports cases tried and violations (``faults_fuzz.json``,
parts with other seeds accumulate). ``--verify_tasks N`` times ``mu2net verify`` on a healthy
N-task store of real sizes (``faults_verify.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_GIN = os.path.join(REPO, "tests", "data", "tiny_vit.gin")
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "faults.json")
CHILD_FLAG = "--fault-child"
PHASES = ("before", "tmp", "after")
# Every run holds its shards' leases (``mu2net evolve``); a restart after a kill waits for the
# dead holder's lease to expire, so the TTL is short.
LEASE_TTL_S = 3.0
LEASE_FLAGS = ("--wait_for_lease", f"--lease_ttl_s={LEASE_TTL_S}")
_ITER_RE = re.compile(r"^\[(?P<task>[^\]]+)\] iteration (?P<it>\d+):")
_PROGRESS_RE = re.compile(r"(?P<task>\S+) it(?P<it>\d+):.*?(?P<done>\d+)/(?P<total>\d+)")


# ----------------------------------------------------------------------------- kill specs
@dataclasses.dataclass
class KillSpec:
    """Where to kill one run.

    Attributes:
      kind: ``"timed"`` (the parent kills ``delay`` s after the ``after_commits``-th committed task
        iteration of this run), ``"write"`` (the run kills itself at its ``put``-th store write
        other than a lease write, in ``phase`` before / tmp / after), ``"gen"`` (at the
        ``put``-th write of its first per-generation commit, the commit after an improving
        generation) or ``"lease"`` (at its ``put``-th lease renewal: a lease write to a shard
        it already leased).
    """

    kind: str
    after_commits: int = 1
    delay: float = 0.0
    put: int = 1
    phase: str = "tmp"

    def describe(self) -> str:
        """One line for the table."""
        if self.kind == "timed":
            return f"timed: {self.delay:.1f}s after commit #{self.after_commits}"
        what = {"write": "store write", "gen": "gen-commit write", "lease": "lease renewal"}
        return f"{self.kind}: {what[self.kind]} #{self.put}, {self.phase}"


HOOKED_KINDS = ("write", "gen", "lease")


def sample_specs(n: int, rng: np.random.Generator, max_delay: float = 8.0) -> list[KillSpec]:
    """``n`` kill specs: 35% timed (a random delay after a commit), 25% inside a per-generation
    commit, 20% inside any commit, 20% inside a lease renewal."""
    specs = []
    for _ in range(n):
        r = rng.random()
        phase = str(rng.choice(PHASES))
        if r < 0.35:
            specs.append(KillSpec("timed", after_commits=1, delay=float(rng.uniform(0, max_delay))))
        elif r < 0.60:
            # A generation commit writes >= 5 files: params, history, manifest, index, marker.
            specs.append(KillSpec("gen", put=int(rng.integers(1, 6)), phase=phase))
        elif r < 0.80:
            # A restart's first writes are its first commit: >= 1 params file, history, manifest.
            specs.append(KillSpec("write", put=int(rng.integers(1, 4)), phase=phase))
        else:
            # Renewals come every ttl/3 = 1 s: 1-15 lands anywhere in the first ~15 s of a run.
            specs.append(KillSpec("lease", put=int(rng.integers(1, 16)), phase=phase))
    return specs


# ----------------------------------------------------------------------------- running evolve
def evolve_args(
    store: str,
    tasks: Sequence[str],
    *,
    agent: str | None = None,
    num_cycles: int = 1,
    gin_file: str = TINY_GIN,
    bindings: Sequence[str] = (),
) -> list[str]:
    """Flags of ``mu2net.evolution.main`` for a tiny run over ``tasks``."""
    args = [
        f"--gin_file={gin_file}",
        f"--store={store}",
        f"--add_tasks={','.join(tasks)}",
        f"--gin.EvolutionConfig.num_cycles={num_cycles}",
        "--logdir=",
    ]
    args += [f"--gin.{b}" for b in bindings]
    if agent:
        args.append(f"--agent={agent}")
    return args


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of an evolve subprocess: CPU only, unbuffered output, quiet TensorFlow."""
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        CUDA_VISIBLE_DEVICES="",
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra or {})
    return env


def command(args: Sequence[str], spec: KillSpec | None = None) -> list[str]:
    """The evolve command line; write-kills run through this file's hooked child mode."""
    if spec is not None and spec.kind in HOOKED_KINDS:
        return [
            sys.executable,
            os.path.abspath(__file__),
            CHILD_FLAG,
            spec.kind,
            str(spec.put),
            spec.phase,
            *args,
        ]
    return [sys.executable, "-m", "mu2net.cli", "evolve", *args, *LEASE_FLAGS]


@dataclasses.dataclass
class RunResult:
    """What one evolve process did."""

    returncode: int
    killed: bool
    seconds: float
    commits: list[str]
    commit_times: list[float]
    landed: str
    stdout: str
    stderr: str


def run_evolve(
    args: Sequence[str],
    spec: KillSpec | None = None,
    timeout: float = 900.0,
    env: Mapping[str, str] | None = None,
    spawn: str = "subprocess",
) -> RunResult:
    """Runs evolve once, killing it as ``spec`` says; returns what happened.

    ``spawn="subprocess"`` runs ``python -m mu2net.cli evolve``; ``"fork"`` forks this
    process (which must have called :func:`preimport`) and runs the same ``main`` in the child,
    which saves the ~25 s of imports per run on a busy CPU.
    """
    t0 = time.time()
    if spawn == "fork":
        proc = _Forked(args, spec)
    else:
        proc = subprocess.Popen(
            command(args, spec),
            cwd=REPO,
            env=child_env(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
    out_lines: list[str] = []
    err_chunks: list[str] = []
    commits: list[str] = []
    commit_times: list[float] = []
    progress = {"last": "start-up (imports, store set-up)"}
    kill_at: list[float] = []
    lock = threading.Lock()

    def read_out():
        for line in proc.stdout:
            out_lines.append(line)
            m = _ITER_RE.match(line.strip())
            if m:
                with lock:
                    commits.append(line.strip())
                    commit_times.append(time.time() - t0)
                    progress["last"] = f"after commit of {m['task']} it{m['it']}"
                    if spec and spec.kind == "timed" and len(commits) == spec.after_commits:
                        kill_at.append(time.time() + spec.delay)

    def read_err():
        buf = ""
        while True:
            ch = proc.stderr.read(256)
            if not ch:
                break
            err_chunks.append(ch)
            buf = (buf + ch)[-4096:]
            for piece in re.split(r"[\r\n]", buf)[-3:]:
                m = _PROGRESS_RE.search(piece)
                if m:
                    with lock:
                        progress["last"] = (
                            f"{m['task']} it{m['it']}, {m['done']}/{m['total']} candidates done"
                        )

    threads = [
        threading.Thread(target=read_out, daemon=True),
        threading.Thread(target=read_err, daemon=True),
    ]
    for t in threads:
        t.start()
    killed_by_parent = False
    landed = ""
    while proc.poll() is None:
        now = time.time()
        if kill_at and now >= kill_at[0] and not killed_by_parent:
            with lock:
                landed = progress["last"]
            os.kill(proc.pid, signal.SIGKILL)
            killed_by_parent = True
        if now - t0 > timeout:
            proc.kill()
            proc.wait()
            raise TimeoutError(f"evolve ran over {timeout:.0f}s: {' '.join(args)}")
        time.sleep(0.02)
    for t in threads:
        t.join(timeout=10)
    killed = proc.returncode == -signal.SIGKILL
    if killed and not landed:
        landed = progress["last"]
        if spec is not None and spec.kind in HOOKED_KINDS:
            landed += f" -> in {spec.describe().split(': ', 1)[1]}"
    return RunResult(
        returncode=proc.returncode,
        killed=killed,
        seconds=time.time() - t0,
        commits=commits,
        commit_times=commit_times,
        landed=landed,
        stdout="".join(out_lines),
        stderr="".join(err_chunks),
    )


class _Forked:
    """A forked evolve run with the part of the ``Popen`` interface :func:`run_evolve` uses."""

    def __init__(self, args: Sequence[str], spec: KillSpec | None):
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                os.close(out_r)
                os.close(err_r)
                os.dup2(out_w, 1)
                os.dup2(err_w, 2)
                sys.stdout = os.fdopen(1, "w", buffering=1)
                sys.stderr = os.fdopen(2, "w", buffering=1)
                if spec is not None and spec.kind in HOOKED_KINDS:
                    code = _child_main([spec.kind, str(spec.put), spec.phase, *args])
                else:
                    code = _evolve(args)
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(out_w)
        os.close(err_w)
        self.pid = pid
        self.stdout = os.fdopen(out_r, "r")
        self.stderr = os.fdopen(err_r, "r")
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = (
                    -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
                )
        return self.returncode

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)

    def wait(self) -> int:
        while self.poll() is None:
            time.sleep(0.02)
        return self.returncode


def preimport() -> None:
    """Imports what evolve needs once, before forking (no JAX computation runs here)."""
    os.environ.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
    import mu2net.evolution.main  # noqa: F401
    import mu2net.mixtures  # noqa: F401
    import mu2net.models.vit  # noqa: F401
    import mu2net.tasks  # noqa: F401


# ----------------------------------------------------------------------------- observing a store
def params_digest(tree: Any) -> str:
    """sha256 over every leaf (name, dtype, shape, bytes) of a params pytree."""
    h = hashlib.sha256()

    def walk(node, prefix):
        if isinstance(node, Mapping):
            for k in sorted(node):
                walk(node[k], f"{prefix}/{k}")
        else:
            a = np.ascontiguousarray(np.asarray(node))
            h.update(f"{prefix}|{a.dtype.str}|{a.shape}|".encode())
            h.update(a.tobytes())

    walk(tree, "")
    return h.hexdigest()


def observe(url: str) -> dict[str, Any]:
    """Verifies the store at ``url`` and records its published state.

    Raises whatever the store raises when it does not load, verify or validate.
    """
    from mu2net.system.store import Store

    store = Store.open(url)
    n_verified = store.verify()
    system = store.load()
    system.validate()
    records = {}
    for agent in store.shards():
        body = store.latest_manifest(agent) or {}
        records.update(body.get("components", {}))
    paths = {pid: p.to_json() for pid, p in system.paths.items()}
    return {
        "verified_components": n_verified,
        "tasks": list(system.tasks),
        "paths": json.loads(json.dumps(paths)),
        "best": {t: system.best_path(t).id for t in system.tasks if system.best_path(t)},
        "digests": {cid: params_digest(c.params) for cid, c in system.components.items()},
        "records": {cid: {k: r[k] for k in ("file", "sha256")} for cid, r in records.items()},
        "iterations": {t: _iterations(system, t) for t in system.tasks},
        "progress": {t: _progress(system, t) for t in system.tasks},
        "manifests": {agent: store.manifest_seqs(agent) for agent in store.shards()},
        "generations": generation_records(store),
    }


def _iterations(system, task: str) -> int:
    best = system.best_path(task)
    return int(best.metrics.get("task_iterations", 0)) if best else 0


def _progress(system, task: str) -> list[int]:
    """[task iterations done, generations committed in the next one] of ``task``."""
    done = _iterations(system, task)
    best = system.best_path(task)
    prog = (best.metrics.get("iteration_progress") or {}) if best else {}
    return [done, int(prog["generation"]) + 1 if prog.get("iteration") == done else 0]


def generation_records(store) -> dict[str, list[str]]:
    """``"task|iteration|generation"`` -> the history files holding that generation's records.

    Every generation's candidates are committed exactly once: with a previous commit's
    generation (a lost commit) missing, or in two files (work redone after a commit that had
    landed), a restart did not resume where the store says.
    """
    from mu2net.system import layout

    out: dict[str, set[str]] = {}
    for agent in store.shards():
        for name in (store.latest_manifest(agent) or {}).get("history_files", []):
            data = store.get_bytes(store.path_of(layout.shard_file(agent, name)))
            for line in data.splitlines():
                rec = json.loads(line) if line else {}
                if "generation" in rec and "task" in rec:
                    key = f"{rec['task']}|{rec['iteration']}|{rec['generation']}"
                    out.setdefault(key, set()).add(f"{agent}/{name}")
    return {k: sorted(v) for k, v in sorted(out.items())}


def _progress_of(obs: Mapping[str, Any], task: str) -> tuple[int, int]:
    prog = obs.get("progress", {}).get(task)
    return tuple(prog) if prog else (obs["iterations"].get(task, 0), 0)


def check_transition(
    before: Mapping[str, Any], after: Mapping[str, Any], allowed_metrics: Sequence[str] = ()
) -> list[str]:
    """Violations of "no published path changed" between two observations of one store.

    A path published in ``before`` must be in ``after`` with the same record and bit-identical
    params, unless its task committed a task iteration in between: then it may have been
    replaced by a newer path of that task, or its metrics (metadata) updated. ``allowed_metrics``
    may change on any path (e.g. ``offsprings_per_task`` of seeds in a shared shard).
    """
    bad = []
    n = len(before["tasks"])
    if after["tasks"][:n] != before["tasks"]:
        bad.append(f"live mixture changed: {before['tasks']} -> {after['tasks']}")
    for t, it in before["iterations"].items():
        if after["iterations"].get(t, 0) < it:
            bad.append(f"task {t}: iterations went back {it} -> {after['iterations'].get(t, 0)}")
        elif _progress_of(after, t) < _progress_of(before, t):
            bad.append(f"task {t}: committed generations went back")
    for agent, seqs in before.get("manifests", {}).items():
        lost = sorted(set(seqs) - set(after.get("manifests", {}).get(agent, [])))
        if lost:
            bad.append(f"shard {agent}: committed manifests {lost} lost")
    for key, files in after.get("generations", {}).items():
        if len(files) > 1:
            bad.append(f"generation {key} committed twice ({files}): a restart redid it")
    for key in set(before.get("generations", {})) - set(after.get("generations", {})):
        bad.append(f"generation {key}: its committed records were lost")
    for cid, d in before["digests"].items():
        if cid in after["digests"] and after["digests"][cid] != d:
            bad.append(f"component {cid}: params changed")
        if cid in after["records"] and cid in before["records"]:
            if after["records"][cid] != before["records"][cid]:
                bad.append(f"component {cid}: store record changed")
    for pid, rec in before["paths"].items():
        task = rec["task"]
        # A committed generation may replace the task's path too (per-generation commits).
        grown = _progress_of(after, task) > _progress_of(before, task)
        new = after["paths"].get(pid)
        if new is None:
            if rec["is_root"] or not grown:
                bad.append(f"path {pid} of {task} disappeared without a new task iteration")
            continue
        for key in ("task", "family", "components", "hparams", "agent", "parent", "is_root"):
            if new[key] != rec[key]:
                bad.append(f"path {pid} of {task}: {key} changed")
        for cid in rec["components"].values():
            if after["digests"].get(cid) != before["digests"].get(cid):
                bad.append(f"path {pid} of {task}: params of {cid} changed")
        if not grown:
            m0 = {k: v for k, v in rec["metrics"].items() if k not in allowed_metrics}
            m1 = {k: v for k, v in new["metrics"].items() if k not in allowed_metrics}
            if m0 != m1:
                diff = sorted(k for k in set(m0) | set(m1) if m0.get(k) != m1.get(k))
                bad.append(f"path {pid} of {task}: metrics {diff} changed with no new iteration")
    return bad


def same_system(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Differences between two final systems: paths, components and params (not timings)."""
    diff = []
    if a["tasks"] != b["tasks"]:
        diff.append(f"tasks {a['tasks']} != {b['tasks']}")
    if set(a["paths"]) != set(b["paths"]):
        diff.append(f"path ids {sorted(a['paths'])} != {sorted(b['paths'])}")
    if set(a.get("generations", {})) != set(b.get("generations", {})):
        diff.append(
            f"committed generations {sorted(a.get('generations', {}))} != "
            f"{sorted(b.get('generations', {}))}"
        )
    for pid in set(a["paths"]) & set(b["paths"]):
        pa, pb = a["paths"][pid], b["paths"][pid]
        if pa["components"] != pb["components"] or pa["hparams"] != pb["hparams"]:
            diff.append(f"path {pid}: components or hparams differ")
        for cid in pa["components"].values():
            if a["digests"].get(cid) != b["digests"].get(cid):
                diff.append(f"path {pid}: params of {cid} differ")
    return diff


def leftovers(url: str) -> dict[str, int]:
    """Files a killed run left behind: temp files and params files no manifest lists."""
    from mu2net.system import layout
    from mu2net.system.store import Store

    store = Store.open(url)
    tmp = orphans = 0
    for agent in store.shards():
        listed = set()
        for seq in store.manifest_seqs(agent):
            body = store.read_manifest(agent, seq)
            listed |= {r["file"] for r in body["components"].values()}
        for p in store.fs.find(store.path_of(layout.shard_dir(agent))):
            rel = p.split(f"/shards/{agent}/", 1)[1]
            if ".tmp-" in rel:
                tmp += 1
            elif rel.startswith("params/") and rel not in listed:
                orphans += 1
    lease_tmp = sum(".tmp-" in p for p in store.fs.find(store.path_of(layout.LEASES)))
    return {"tmp_files": tmp, "orphan_params": orphans, "lease_tmp_files": lease_tmp}


# ----------------------------------------------------------------------------- a serving reader
READER_FLAG = "--serve-reader"


def _prediction(pred) -> list[str]:
    """[path id, sha256 of labels and probabilities] of ``pred`` on fixed per-task inputs."""
    import zlib

    rng = np.random.default_rng(zlib.crc32(pred.task.encode()))
    x = rng.normal(size=(4, *pred.input_shape)).astype(np.float32)
    labels, probs = pred.predict(pred.task, x)
    return [pred.path_id, hashlib.sha256(probs.tobytes() + labels.tobytes()).hexdigest()]


def _reader_loop(url: str, commands, answers) -> int:
    """A serving process: a :class:`~mu2net.serve.PredictorPool` on ``url`` that reloads on
    request.

    Each command line ``refresh K`` refreshes the pool (swapping in newly published paths) and
    loads every published task it does not hold yet; with ``K > 0`` the process SIGKILLs itself
    at the K-th file read of that reload. It answers one JSON line: per task, the pool's
    ``[path id, predictions digest]`` and a fresh ``mu2net.serve.load``'s.
    """
    from mu2net.serve import PredictorPool, TaskPredictor
    from mu2net.system import store as store_mod

    real_get = store_mod.Store.get_bytes
    armed = {"reads": 0}

    def get_bytes(self, path):
        if armed["reads"]:
            armed["reads"] -= 1
            if not armed["reads"]:
                os.kill(os.getpid(), signal.SIGKILL)
        return real_get(self, path)

    store_mod.Store.get_bytes = get_bytes
    pool = None
    for line in commands:
        cmd, reads = line.split()
        if cmd != "refresh":
            return 0
        pool = pool or PredictorPool(url)
        tasks = sorted({p.task for p in store_mod.Store.open(url).load().task_paths()})
        armed["reads"] = int(reads)
        pool.refresh()
        for task in tasks:
            pool.get(task)
        armed["reads"] = 0
        out = {}
        for task in pool.loaded():
            fresh = TaskPredictor.load(url, task)
            out[task] = {"pool": _prediction(pool.get(task)), "fresh": _prediction(fresh)}
            fresh.close()
        answers.write(json.dumps(out) + "\n")
        answers.flush()
    return 0


class ServingReader:
    """A serving reader process (forked, or ``faults.py --serve-reader URL``) and its pipes."""

    def __init__(self, url: str, spawn: str, log_path: str):
        self.returncode: int | None = None
        if spawn == "fork":
            cmd_r, cmd_w = os.pipe()
            out_r, out_w = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: never returns
                code = 1
                try:
                    os.close(cmd_w)
                    os.close(out_r)
                    err = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
                    os.dup2(err, 2)
                    sys.stderr = os.fdopen(2, "w", buffering=1)
                    code = _reader_loop(url, os.fdopen(cmd_r), os.fdopen(out_w, "w"))
                except BaseException:
                    import traceback

                    traceback.print_exc()
                finally:
                    os._exit(code)
            os.close(cmd_r)
            os.close(out_w)
            self.pid, self.stdin, self.stdout = pid, os.fdopen(cmd_w, "w"), os.fdopen(out_r)
            self._proc = None
        else:
            with open(log_path, "a") as err:
                self._proc = subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), READER_FLAG, url],
                    cwd=REPO,
                    env=child_env(),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    text=True,
                    bufsize=1,
                )
            self.pid, self.stdin, self.stdout = self._proc.pid, self._proc.stdin, self._proc.stdout

    def ask(self, kill_at_read: int = 0, timeout: float = 600.0) -> dict[str, Any] | None:
        """Asks for a reload and the answers; None when the reader died (killed mid-reload)."""
        import select

        try:
            self.stdin.write(f"refresh {kill_at_read}\n")
            self.stdin.flush()
        except BrokenPipeError:
            return self._dead()
        ready, _, _ = select.select([self.stdout], [], [], timeout)
        if not ready:
            self.close()
            raise TimeoutError(f"serving reader gave no answer in {timeout:.0f} s")
        line = self.stdout.readline()
        return json.loads(line) if line else self._dead()

    def _dead(self) -> None:
        if self._proc is not None:
            self.returncode = self._proc.wait(60)
        else:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else status
        return None

    def close(self) -> None:
        """Stops the reader (by its pid) and reaps it."""
        if self.returncode is not None:
            return
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)
        self._dead()


class ServeCheck:
    """A serving reader follows a chain's store; its reloads are checked and sometimes killed.

    After every kill of ``evolve`` the reader reloads (a fraction of reloads is SIGKILLed at a
    random file read: a kill during a serving reload; a new reader then starts). Every answer
    must come from the task's published path, agree with a fresh ``mu2net.serve.load``, and a
    path's predictions never change (bit-identical probabilities, by path id, across reloads,
    restarts and the whole chain); a killed reader leaves the store's files as they were.
    """

    def __init__(
        self,
        url: str,
        spawn: str,
        rng: np.random.Generator,
        log_path: str,
        kill_fraction: float = 1 / 3,
    ):
        self.url, self.spawn, self.rng, self.log_path = url, spawn, rng, log_path
        self.kill_fraction = kill_fraction
        self.reader: ServingReader | None = None
        self.saved: dict[str, Any] = {"seen": {}, "kills": [], "reloads": 0}

    def restore(self, saved: dict[str, Any]) -> None:
        """Keeps this check's record in ``saved`` (a chain's checkpoint), continuing it."""
        for k, v in self.saved.items():
            saved.setdefault(k, v)
        self.saved = saved

    @property
    def seen(self) -> dict[str, str]:
        """Predictions digest by path id, of every answer so far."""
        return self.saved["seen"]

    @property
    def kills(self) -> list[dict[str, Any]]:
        """The serving kills delivered and what was checked after each."""
        return self.saved["kills"]

    @property
    def reloads(self) -> int:
        """Reloads checked so far."""
        return self.saved["reloads"]

    def check(self, obs: Mapping[str, Any], chain: int = 0) -> tuple[list[str], dict]:
        """One reload (maybe killed) after ``obs`` was observed; returns violations, answers."""
        if self.reader is None:
            self.reader = ServingReader(self.url, self.spawn, self.log_path)
        reads = 0
        if self.rng.random() < self.kill_fraction:
            reads = int(self.rng.integers(1, 5))
        before = _listing(self.url) if reads else None
        answers = self.reader.ask(reads)
        if answers is None and (not reads or self.reader.returncode != -signal.SIGKILL):
            raise RuntimeError(
                f"serving reader failed (rc {self.reader.returncode}); see {self.log_path}"
            )
        if answers is None:  # killed mid-reload: a new serving process takes over
            self.reader = ServingReader(self.url, self.spawn, self.log_path)
            answers = self.reader.ask(0)
            bad = self._judge(answers, obs)
            if _listing(self.url) != before:
                bad.append("a serving reader killed mid-reload changed the store's files")
            self.kills.append(
                {
                    "chain": chain,
                    "spec": f"serve: reload killed at read #{reads}",
                    "violations": bad,
                    "survived": not bad,
                }
            )
            return bad, answers
        return self._judge(answers, obs), answers

    def _judge(self, answers: Mapping[str, Any], obs: Mapping[str, Any]) -> list[str]:
        self.saved["reloads"] += 1
        bad = []
        for task in sorted(set(obs["best"]) - set(answers)):
            bad.append(f"serving: published task {task} not answered")
        for task, a in answers.items():
            if a["pool"] != a["fresh"]:
                bad.append(
                    f"serving {task}: reload answered {a['pool']}, a fresh load {a['fresh']}"
                )
            if a["pool"][0] != obs["best"].get(task):
                bad.append(
                    f"serving {task}: answered from {a['pool'][0]}, published is "
                    f"{obs['best'].get(task)}"
                )
            for pid, digest in (a["pool"], a["fresh"]):
                if self.seen.setdefault(pid, digest) != digest:
                    bad.append(f"serving {task}: predictions of published path {pid} changed")
        return bad

    def close(self) -> None:
        """Stops the reader."""
        if self.reader is not None:
            self.reader.close()
            self.reader = None


def _listing(url: str) -> dict[str, int]:
    """Every file of the store (temp files included) and its size."""
    from mu2net.system.store import Store

    store = Store.open(url)
    return {p: store.fs.size(p) for p in sorted(store.fs.find(store.root))}


# ----------------------------------------------------------------------------- chains of kills
@dataclasses.dataclass
class KillResult:
    """One delivered kill and the checks after it."""

    chain: int
    spec: str
    landed: str
    seconds: float
    verified: int
    violations: list[str]
    leftovers: dict[str, int]
    error: str = ""

    @property
    def survived(self) -> bool:
        """Store loaded, verified, validated and no published path changed."""
        return not self.error and not self.violations


def run_chain(
    url: str,
    tasks: Sequence[str],
    specs: Sequence[KillSpec],
    *,
    chain: int = 0,
    agent: str | None = None,
    num_cycles: int = 1,
    allowed_metrics: Sequence[str] = ("offsprings_per_task",),
    timeout: float = 900.0,
    spawn: str = "subprocess",
    log=print,
    serve: ServeCheck | None = None,
    progress: dict[str, Any] | None = None,
    deadline: float | None = None,
    on_progress: Callable[[], None] | None = None,
) -> tuple[list[KillResult], dict[str, Any]]:
    """Runs evolve on ``url``, killing it per ``specs`` and restarting, then lets it finish.

    The first run of a fresh store sets it up (root, tasks) and must not be killed before its
    first commit; every kill spec is tried once (a run that finishes before its kill is simply
    restarted with the next spec). With ``serve``, a serving reader reloads after every kill
    and at the end (:class:`ServeCheck`). Returns the kill results and the final run's report
    (``completed``, ``final`` observation, the reader's last ``answers``).

    ``progress`` (a JSON-able dict) holds the chain's state after every kill (``on_progress``
    is then called, e.g. to checkpoint it); a chain paused at ``deadline`` (the report says
    ``paused``) continues from it in a later call.
    """
    args = evolve_args(url, tasks, agent=agent, num_cycles=num_cycles)
    progress = {} if progress is None else progress
    if "queue" not in progress:
        progress.update(
            queue=[dataclasses.asdict(sp) for sp in specs], prev=None, seen={}, results=[]
        )
        progress["running"] = False
    results = [KillResult(**r) for r in progress["results"]]
    prev, seen_digests = progress["prev"], progress["seen"]
    queue = [KillSpec(**d) for d in progress["queue"]]
    if serve is not None:
        serve.restore(progress.setdefault("serve", {}))
    if progress["running"] and prev is not None:
        # The last part was stopped inside a run (not one of our kills): check what it left.
        obs = observe(url)
        bad = check_transition(prev, obs, allowed_metrics) + _immutability(seen_digests, obs)
        if bad:
            results.append(KillResult(chain, "interrupted: part stopped", "", 0.0, 0, bad, {}))
        prev = obs

    def keep(running: bool) -> None:
        progress.update(
            queue=[dataclasses.asdict(sp) for sp in queue],
            prev=prev,
            results=[dataclasses.asdict(r) for r in results],
            running=running,
        )
        if on_progress is not None:
            on_progress()

    while True:
        if results and deadline is not None and time.time() > deadline:
            keep(False)
            return results, {"paused": True}
        spec = queue.pop(0) if queue else None
        keep(True)
        # A set-up run may only die once the store exists (a generation commit comes after).
        if spec is not None and spec.kind in ("write", "lease") and prev is None:
            spec = KillSpec("timed", after_commits=1, delay=spec.put * 0.5)  # set-up run
        res = run_evolve(args, spec, timeout=timeout, spawn=spawn)
        if not res.killed:
            if res.returncode != 0:
                raise RuntimeError(
                    f"evolve failed (rc {res.returncode}) after {len(results)} kills:\n"
                    f"{res.stderr[-3000:]}"
                )
            final = observe(url)
            bad = check_transition(prev, final, allowed_metrics) if prev else []
            bad += _immutability(seen_digests, final)
            want = num_cycles
            undone = {t: n for t, n in final["iterations"].items() if n != want}
            if undone:
                bad.append(f"run completed with task iterations {undone}, expected {want}")
            answers = None
            if serve is not None:
                served, answers = serve.check(final, chain)
                bad += served
            if spec is not None:
                log(f"  chain {chain}: run finished before its kill ({spec.describe()})")
            # A finished run leaves nothing to kill: remaining specs would only start no-op runs.
            return results, {
                "completed": not bad,
                "violations": bad,
                "final": final,
                "answers": answers,
                "seconds": res.seconds,
            }
        try:
            obs = observe(url)
            violations = check_transition(prev, obs, allowed_metrics) if prev else []
            violations += _immutability(seen_digests, obs)
            if serve is not None:
                violations += serve.check(obs, chain)[0]
            kr = KillResult(
                chain,
                spec.describe(),
                res.landed,
                res.seconds,
                obs["verified_components"],
                violations,
                leftovers(url),
            )
            prev = obs
        except Exception as e:  # the store no longer loads: that is the failure we count
            kr = KillResult(
                chain,
                spec.describe(),
                res.landed,
                res.seconds,
                0,
                [],
                {},
                error=f"{type(e).__name__}: {e}",
            )
        results.append(kr)
        keep(False)
        log(
            f"  chain {chain} kill {len(results)}: {kr.spec:<38} landed: {kr.landed:<45} "
            f"{'ok' if kr.survived else 'FAILED ' + (kr.error or '; '.join(kr.violations))}"
        )
        if kr.error:
            return results, {
                "completed": False,
                "violations": [kr.error],
                "final": None,
                "seconds": 0.0,
            }


def _immutability(seen: dict[str, str], obs: Mapping[str, Any]) -> list[str]:
    bad = []
    for cid, d in obs["digests"].items():
        if seen.setdefault(cid, d) != d:
            bad.append(f"component {cid}: params differ from an earlier observation")
    return bad


# ----------------------------------------------------------------------------- the hooked child
def _evolve(args: Sequence[str]) -> int:
    """``mu2net evolve ARGS`` with this benchmark's lease flags, in this process."""
    from mu2net.cli import main

    return main(["evolve", *args, *LEASE_FLAGS])


def _child_main(argv: Sequence[str]) -> int:
    """``faults.py --fault-child KIND PUT PHASE evolve-args...``: SIGKILL self at a write.

    ``KIND`` "write" counts the store writes other than lease writes (params, history,
    manifest, indexes); "gen" those of the run's first per-generation commit only (its note ends
    in ``genN``); "lease" the lease renewals (writes to a shard's lease this run already wrote).
    """
    kind, put_index, phase, *args = argv
    put_index = int(put_index)
    from mu2net.system import store as store_mod

    original, original_commit = store_mod.Store.put_bytes, store_mod.Store.commit
    count = [0]
    leased: set[str] = set()
    gen_commit = {"n": 0, "inside": False}

    def die():
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def counted(path: str) -> bool:
        if "/leases/" in path:
            shard = path.split("/leases/", 1)[1].split("/", 1)[0]
            renewal = shard in leased
            leased.add(shard)
            return kind == "lease" and renewal
        return kind == "write" or (kind == "gen" and gen_commit["inside"])

    def hooked(self, path, data):
        if not counted(path):
            return original(self, path, data)
        count[0] += 1
        if count[0] != put_index:
            return original(self, path, data)
        if phase == "before":
            die()
        if phase == "tmp":
            # The temp file is written, the exclusive publish (link or mv) never happens.
            real_link, real_mv = os.link, self.fs.mv
            os.link = lambda *a, **k: die()
            self.fs.mv = lambda *a, **k: die()
            try:
                return original(self, path, data)
            finally:
                os.link, self.fs.mv = real_link, real_mv
        original(self, path, data)
        die()

    def commit(self, system, agent, history=(), note=""):
        is_gen = re.search(r" gen\d+$", note) is not None
        gen_commit["n"] += is_gen
        gen_commit["inside"] = is_gen and gen_commit["n"] == 1
        try:
            return original_commit(self, system, agent, history, note)
        finally:
            gen_commit["inside"] = False

    store_mod.Store.put_bytes = hooked
    store_mod.Store.commit = commit
    return _evolve(args)


# ----------------------------------------------------------------------------- the benchmark
CONFIGS = (
    {"tasks": ["mu2net:lfw_faces", "mu2net:digits"], "agent": None, "num_cycles": 2},
    {"tasks": ["mu2net:lfw_faces", "mu2net:digits"], "agent": "solo", "num_cycles": 2},
)
CHAIN_KILLS = 2  # kills per chain: more chains, so more set-ups and final runs are checked


def benchmark(
    kills: int,
    seed: int,
    workdir: str,
    spawn: str = "fork",
    log=print,
    checkpoint: str | None = None,
    budget_s: float | None = None,
) -> dict[str, Any]:
    """Reference runs, then chains of kills until ``kills`` kills were delivered.

    With ``checkpoint`` (a JSON file) the state is saved after the references and after every
    chain, and a later call with the same seed resumes from it; ``budget_s`` stops starting new
    chains after that many seconds (so a long campaign runs in parts).
    """
    t0 = time.time()
    state = _resume(checkpoint, seed, kills) or {
        "seed": seed,
        "kills_wanted": kills,
        "refs": [],
        "chains": [],
        "kills": [],
        "serve_kills": [],
        "seconds": 0.0,
    }
    rng = np.random.default_rng(seed)
    if "rng" in state:
        rng.bit_generator.state = state["rng"]

    def save():
        state["rng"] = rng.bit_generator.state
        state["seconds"] = state.get("seconds_before", 0.0) + time.time() - t0
        if checkpoint:
            _write_json(checkpoint, summarize(state))

    state["seconds_before"] = state.get("seconds", 0.0)
    if not state["refs"]:
        iteration_seconds = []
        for i, cfg in enumerate(CONFIGS):
            url = os.path.join(workdir, f"reference-{i}")
            res = run_evolve(evolve_args(url, **cfg), spawn=spawn)
            if res.returncode != 0:
                raise RuntimeError(f"reference run failed:\n{res.stderr[-3000:]}")
            serve = ServeCheck(url, spawn, rng, os.path.join(workdir, "reader.log"), 0.0)
            obs = observe(url)
            _, answers = serve.check(obs)
            serve.close()
            state["refs"].append({"final": obs, "answers": answers})
            iteration_seconds += list(np.diff(res.commit_times))
            log(
                f"reference {i} ({cfg}): {res.seconds:.0f}s, commits at "
                f"{[round(t) for t in res.commit_times]}s"
            )
        # Timed kills land up to 1.2 task iterations after a commit: anywhere in the next
        # iteration's generations, test evaluation or commit (or, rarely, the one after).
        state["max_delay_s"] = (
            1.2 * float(np.mean(iteration_seconds)) if iteration_seconds else 10.0
        )
        save()
    deadline = None if budget_s is None else t0 + budget_s
    while len(state["kills"]) < kills and (deadline is None or time.time() < deadline):
        if state["chains"] and not state["chains"][-1]["completed"]:
            break  # a chain that did not complete ends the campaign: that is the finding
        if not _one_chain(state, rng, workdir, spawn, log, deadline, save):
            break  # paused inside the chain: the next part continues it
        save()
    save()
    return summarize(state)


def _one_chain(
    state: dict[str, Any],
    rng: np.random.Generator,
    workdir: str,
    spawn: str,
    log,
    deadline: float | None = None,
    save=None,
) -> bool:
    """Runs (or continues) chain number ``len(state["chains"])``; records it in ``state``.

    Returns False when the chain paused at ``deadline`` (``state["chain_in_progress"]`` holds
    it, checkpointed by ``save`` after every kill).
    """
    c = len(state["chains"])
    cfg = CONFIGS[c % len(CONFIGS)]
    ref = state["refs"][c % len(CONFIGS)]
    url = os.path.join(workdir, f"chain-{c}")
    progress = state.get("chain_in_progress")
    specs: list[KillSpec] = []
    if progress is None or progress.get("chain") != c:
        shutil.rmtree(url, ignore_errors=True)  # what a part stopped in this chain left behind
        left = state["kills_wanted"] - len(state["kills"])
        specs = sample_specs(min(CHAIN_KILLS, left), rng, state["max_delay_s"])
        progress = state["chain_in_progress"] = {"chain": c}
    serve = ServeCheck(
        url, spawn, np.random.default_rng([state["seed"], c]), os.path.join(workdir, "reader.log")
    )
    try:
        kr, report = run_chain(
            url,
            cfg["tasks"],
            specs,
            chain=c,
            agent=cfg["agent"],
            num_cycles=cfg["num_cycles"],
            spawn=spawn,
            log=log,
            serve=serve,
            progress=progress,
            deadline=deadline,
            on_progress=save,
        )
    finally:
        serve.close()
    if report.get("paused"):
        return False
    del state["chain_in_progress"]
    state["kills"] += [dataclasses.asdict(r) | {"survived": r.survived} for r in kr]
    state["serve_kills"] += serve.kills
    same = same_system(ref["final"], report["final"]) if report["final"] else None
    same_answers = report.get("answers") == ref["answers"] if report["final"] else None
    state["chains"].append(
        {
            "chain": c,
            "config": cfg,
            "kills": len(kr),
            "serve_kills": len(serve.kills),
            "serving_reloads": serve.reloads,
            "completed": report["completed"],
            "violations": report["violations"],
            "matches_reference": same == [],
            "reference_differences": same,
            "predictions_match_reference": same_answers,
        }
    )
    log(
        f"chain {c}: {len(kr)} kills + {len(serve.kills)} serving kills, completed="
        f"{report['completed']}, same system as the uninterrupted run: {same == []}, same "
        f"predictions: {same_answers}"
    )
    shutil.rmtree(url, ignore_errors=True)
    return True


def summarize(state: Mapping[str, Any]) -> dict[str, Any]:
    """The report (also the checkpoint): counts per kind and everything needed to resume."""
    kills = state["kills"]
    by_kind = {
        kind: {
            "tried": sum(k["spec"].startswith(kind + ":") for k in kills),
            "survived": sum(k["spec"].startswith(kind + ":") and k["survived"] for k in kills),
        }
        for kind in ("timed", "gen", "write", "lease")
    }
    serve = state.get("serve_kills", [])
    by_kind["serve"] = {"tried": len(serve), "survived": sum(k["survived"] for k in serve)}
    return {
        **state,
        "kills_tried": len(kills) + len(serve),
        "kills_survived": sum(k["survived"] for k in kills) + by_kind["serve"]["survived"],
        "by_kind": by_kind,
        "corrupted_stores": sum(bool(k.get("error")) for k in kills),
        "lost_commits": _count(state, ("lost", "went back", "disappeared", "missing")),
        "changed_published_predictions": _count(state, ("predictions", "params")),
        "chains_completed": sum(c["completed"] for c in state["chains"]),
        "chains_matching_reference": sum(bool(c["matches_reference"]) for c in state["chains"]),
        "chains_with_reference_predictions": sum(
            bool(c.get("predictions_match_reference")) for c in state["chains"]
        ),
        "done": len(kills) >= state["kills_wanted"],
    }


def _count(state: Mapping[str, Any], words: Sequence[str]) -> int:
    """Violations (after kills, serving kills and at chain ends) that mention any of ``words``."""
    found = [v for k in [*state["kills"], *state.get("serve_kills", [])] for v in k["violations"]]
    found += [v for c in state["chains"] for v in c["violations"]]
    return sum(any(w in v for w in words) for v in found)


def _resume(checkpoint: str | None, seed: int, kills: int) -> dict[str, Any] | None:
    if not checkpoint or not os.path.exists(checkpoint):
        return None
    with open(checkpoint) as f:
        state = json.load(f)
    if state.get("seed") != seed or "rng" not in state:
        raise SystemExit(
            f"{checkpoint}: a checkpoint of another campaign (seed {state.get('seed')})"
        )
    state["kills_wanted"] = kills
    return state


def _write_json(path: str, body: Mapping[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(body, f, indent=1, default=str)
    os.replace(tmp, path)


def print_table(report: Mapping[str, Any]) -> None:
    """The benchmark's table."""
    rows = [["#", "chain", "kill", "landed", "verified", "leftovers", "result"]]
    for i, k in enumerate(report["kills"], 1):
        left = k["leftovers"]
        rows.append(
            [
                str(i),
                str(k["chain"]),
                k["spec"],
                k["landed"],
                str(k["verified"]),
                f"{left.get('tmp_files', 0)} tmp, {left.get('orphan_params', 0)} orphan",
                "survived" if k["survived"] else "FAILED",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))
    for i, k in enumerate(report.get("serve_kills", []), 1):
        print(
            f"serving kill {i} (chain {k['chain']}): {k['spec']}: "
            f"{'survived' if k['survived'] else 'FAILED ' + '; '.join(k['violations'])}"
        )
    print()
    for ch in report["chains"]:
        print(
            f"chain {ch['chain']}: {ch['kills']} kills + {ch.get('serve_kills', 0)} serving, run "
            f"completed: {ch['completed']}, final system identical to the uninterrupted run: "
            f"{ch['matches_reference']}, same predictions: {ch.get('predictions_match_reference')}"
        )
    for kind, n in report.get("by_kind", {}).items():
        print(f"{kind} kills survived / tried: {n['survived']} / {n['tried']}")
    print(
        f"\nkills survived / tried: {report['kills_survived']} / {report['kills_tried']} "
        f"({report['seconds']:.0f}s)"
    )


def fuzz(cases: int, seed: int, out: str) -> int:
    """The long run of the fuzzed readers: ``cases`` mutated store files, one table."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import test_system_fuzz  # the same mutations and oracle as the CI test

    t0 = time.time()
    stats = test_system_fuzz.run_cases(cases, seed=seed)
    report = {
        "cases_tried": stats["cases"],
        "bad_files": stats["bad_files"],
        "distinct_bad_files": stats["distinct_bad_files"],
        "violations": len(stats["violations"]),
        "first_violations": stats["violations"][:20],
        "by_mutation": dict(sorted(stats["kinds"].items())),
        "seconds": time.time() - t0,
        "seed": seed,
    }
    rows = [[k, str(v)] for k, v in report["by_mutation"].items()]
    width = max(len(r[0]) for r in rows) if rows else 8
    print(f"{'mutation':<{width}}  cases")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(
        f"fuzzed store files: {report['cases_tried']} cases tried, {report['violations']} "
        f"violations (crash outside mu2net errors, unnamed file, or a different system) "
        f"in {report['seconds']:.0f} s"
    )
    for v in report["first_violations"]:
        print("  " + v[:300])
    # Parts of a long run (other seeds) accumulate in one file: totals over all parts.
    parts = {}
    if os.path.exists(out):
        with open(out) as f:
            parts = json.load(f).get("parts", {})
    parts[str(seed)] = report
    totals = {
        "cases_tried": sum(r["cases_tried"] for r in parts.values()),
        "bad_files": sum(r.get("bad_files", 0) for r in parts.values()),
        "violations": sum(r["violations"] for r in parts.values()),
        "seconds": sum(r["seconds"] for r in parts.values()),
        "seeds": sorted(int(k) for k in parts),
    }
    print(f"all parts: {totals}")
    _write_json(out, {**totals, "parts": parts})
    return 0 if report["violations"] == 0 else 1


def verify_benchmark(n_tasks: int, workdir: str, out: str) -> int:
    """Times ``mu2net verify`` on a healthy store of ``n_tasks`` tasks of real sizes.

    The root is EfficientNet-Lite0 (19 components, 4.7M params, freshly initialised); each task
    publishes a path with its own 10-class head and three cloned (and changed) blocks, committed
    to its own shard, as evolution would leave it. Writes ``faults_verify.json``.
    """
    import jax

    import mu2net.models.efficientnet  # noqa: F401  (registers the family)
    from mu2net.models.base import get_family
    from mu2net.system import Path, Store, System, agent_for_task
    from mu2net.system.verify import verify_store

    family = get_family("efficientnet_lite0")
    hp = family.default_hparams()
    root_params = jax.tree.map(np.asarray, family.init(jax.random.PRNGKey(0), hp))
    rng = np.random.default_rng(0)
    url = os.path.join(workdir, f"verify-{n_tasks}")
    shutil.rmtree(url, ignore_errors=True)
    store = Store.create(url, "verify")
    s = System()
    root = s.add_root("root:effnet", family.name, root_params, hp, "root")
    store.commit(s, "root")
    t0 = time.time()
    for i in range(n_tasks):
        task, agent = f"bench:task{i}", agent_for_task(f"bench:task{i}")
        s.add_task(task, agent)
        comps = dict(root.components)
        for name in ["head", *(f"block_{b}" for b in rng.choice(16, 3, replace=False))]:
            src = s.component(root.components[name])
            params = jax.tree.map(
                lambda a: (a + 1e-3 * rng.standard_normal(a.shape)).astype(a.dtype), src.params
            )
            if name == "head":  # a 10-class task, not ImageNet's 1,000
                params = jax.tree.map(lambda a: np.ascontiguousarray(a[..., :10]), params)
            c = s.new_component(name, family.name, params, agent, lineage=src.id)
            comps[name] = c.id
        s.publish(
            Path(
                s.new_id(agent, "p"),
                task,
                family.name,
                comps,
                {**hp, "num_classes": 10},
                agent,
                parent=root.id,
                metrics={"quality": 0.5},
            )
        )
        store.commit(s, agent)
    build_s = time.time() - t0
    runs = []
    for _ in range(2):
        report = verify_store(Store.open(url))
        if not report.ok:
            raise RuntimeError([f.line() for f in report.faults[:5]])
        runs.append(report)
    body = {
        "tasks": runs[-1].tasks,
        "shards": runs[-1].shards,
        "components": runs[-1].components,
        "files": runs[-1].files,
        "bytes": runs[-1].bytes,
        "seconds": [r.seconds for r in runs],
        "build_seconds": build_s,
        "load_average": os.getloadavg(),
    }
    print(
        f"verify, healthy {n_tasks}-task store: {runs[-1].summary()} (runs: "
        f"{', '.join(f'{r.seconds:.2f} s' for r in runs)})"
    )
    _write_json(out, body)
    shutil.rmtree(url, ignore_errors=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark and writes ``benchmarks/faults.json``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=40, help="evolve kills to deliver")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="", help="where the stores go (default: a temp dir)")
    p.add_argument("--out", default=OUT)
    p.add_argument(
        "--spawn",
        choices=("fork", "subprocess"),
        default="fork",
        help="fork: import once, fork a child per run (fast on a busy CPU); subprocess: "
        "`python -m mu2net.cli evolve` per run (what the CI test does)",
    )
    p.add_argument(
        "--fuzz",
        type=int,
        default=0,
        help="instead of kills: run this many fuzzed-store-file cases (tests/test_system_fuzz.py)"
        " and report cases tried and crashes outside mu2net errors",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="checkpoint to --out after every kill and resume from it (same --seed): a long "
        "campaign in parts",
    )
    p.add_argument("--budget_s", type=float, default=None, help="start no chain after this")
    p.add_argument(
        "--verify_tasks",
        type=int,
        default=0,
        help="instead of kills: time `mu2net verify` on a healthy store of N tasks",
    )
    args = p.parse_args(argv)
    if args.verify_tasks:
        workdir = args.workdir or tempfile.mkdtemp(prefix="mu2net-verify-")
        out = args.out.replace("faults.json", "faults_verify.json")
        return verify_benchmark(args.verify_tasks, workdir, out)
    if args.fuzz:
        return fuzz(args.fuzz, args.seed, args.out.replace("faults.json", "faults_fuzz.json"))
    if args.spawn == "fork":
        preimport()
    workdir = args.workdir or tempfile.mkdtemp(prefix="mu2net-faults-")
    os.makedirs(workdir, exist_ok=True)
    try:
        report = benchmark(
            args.kills,
            args.seed,
            workdir,
            spawn=args.spawn,
            checkpoint=args.out if args.resume else None,
            budget_s=args.budget_s,
        )
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    report["load_average"] = report.get("load_average", []) + [os.getloadavg()]
    report["spawn"] = args.spawn
    print_table(report)
    _write_json(args.out, report)
    return 0 if report["kills_survived"] == report["kills_tried"] else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == CHILD_FLAG:
        sys.exit(_child_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == READER_FLAG:
        sys.exit(_reader_loop(sys.argv[2], sys.stdin, sys.stdout))
    sys.exit(main())
