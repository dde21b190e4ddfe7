"""Shard leases across real processes: refusal, takeover after SIGKILL, fencing, kill in renewal.

Each child is ``python -c CHILD MODE URL AGENT TTL [PHASE]`` (see ``CHILD``). Every wait is
bounded; children that outlive a test are killed by their pid.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
from test_system_store import build_system

from mu2net.system import Store, agent_for_task, layout, lease
from mu2net.system.lease import LeaseHeldError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_GIN = os.path.join(REPO, "tests", "data", "tiny_vit.gin")
AGENT = agent_for_task("t:a")

CHILD = r"""
import os, signal, sys, time
from mu2net.system import Store
from mu2net.system.lease import LeaseLostError, ShardLease

mode, url, agent, ttl = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
store = Store.open(url)
if mode == "renew-kill":  # SIGKILL self inside the first lease renewal (PHASE: where)
    phase, real, writes = sys.argv[5], Store.put_bytes, []
    def hooked(self, path, data):
        if "/leases/" not in path:
            return real(self, path, data)
        writes.append(path)
        if len(writes) < 2:
            return real(self, path, data)
        if phase == "tmp":  # the temp file exists, its exclusive publish never happens
            with open(path + ".tmp-killed", "wb") as f:
                f.write(data[: len(data) // 2])
        if phase == "after":
            real(self, path, data)
        print("KILLED", path, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    Store.put_bytes = hooked
if mode == "take":  # wait for the lease, then commit once
    print("READY", flush=True)
    t0 = time.time()
    held = ShardLease(store, agent, ttl_s=ttl, wait=True, wait_timeout_s=60).acquire()
    print("TOOK", time.time() - t0, flush=True)
    print("SEQ", store.commit(store.load(), agent), flush=True)
    held.release()
    sys.exit(0)
held = ShardLease(store, agent, ttl_s=ttl, owner="holder-proc").acquire()
print("HELD", held.generation, flush=True)
if mode == "commit-later":  # commit when told on stdin (the test pauses us in between)
    sys.stdin.readline()
    try:
        store.commit(store.load(), agent)
    except LeaseLostError as e:
        print("LOST", e, flush=True)
        sys.exit(3)
    print("COMMITTED", flush=True)
    sys.exit(0)
time.sleep(120)  # "hold" and "renew-kill": keep the lease until killed
sys.exit(4)
"""


def _env():
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", "PYTHONPATH": REPO}


def _child(mode, url, agent=AGENT, ttl=2.0, *extra, stdin=None):
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, mode, url, agent, str(ttl), *extra],
        cwd=REPO,
        env=_env(),
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_line(proc, prefix, timeout=120):
    """The first stdout line of ``proc`` starting with ``prefix`` (bounded in time)."""
    deadline = time.time() + timeout
    lines = []
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        lines.append(line)
        if line.startswith(prefix):
            return line
    raise AssertionError(f"no {prefix!r} line from child; got {''.join(lines)[-2000:]}")


def _finish(proc, timeout=120):
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return proc.returncode, out


@pytest.fixture
def url(tmp_path):
    url = str(tmp_path / "sys")
    store = Store.create(url, "demo")
    s = build_system()
    for agent in sorted({c.agent for c in s.components.values()} | set(s.task_agents.values())):
        store.commit(s, agent)
    return url


@pytest.fixture
def reap():
    procs = []
    yield procs.append
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(10)


def test_second_agent_process_exits_naming_the_holder(tmp_path, reap):
    url = str(tmp_path / "store")
    Store.create(url, "demo")
    holder = _child("hold", url, "solo", 30)
    reap(holder)
    _wait_line(holder, "HELD")
    agent = subprocess.run(
        [
            sys.executable,
            "-m",
            "mu2net.evolution.agents",
            f"--gin_file={TINY_GIN}",
            f"--store={url}",
            "--agent=solo",
            "--tasks=mu2net:digits",
            "--cycles=1",
            "--no_progress",
            "--logdir=",
        ],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert agent.returncode != 0
    err = agent.stderr
    for part in ["holder-proc", f"pid {holder.pid}", "'solo'", "--wait_for_lease", "expires"]:
        assert part in err, (part, err[-2000:])
    assert Store.open(url).manifest_seqs("solo") == []  # it committed nothing


def test_commit_from_a_process_without_the_lease_is_refused(url, reap):
    holder = _child("hold", url, AGENT, 30)
    reap(holder)
    _wait_line(holder, "HELD")
    store = Store.open(url)
    before = sorted(os.listdir(os.path.join(url, layout.shard_dir(AGENT))))
    with pytest.raises(LeaseHeldError, match="holder-proc"):
        store.commit(store.load(), AGENT)
    assert sorted(os.listdir(os.path.join(url, layout.shard_dir(AGENT)))) == before
    assert store.commit(store.load(), agent_for_task("t:b")) == 1  # other shards: as before


def test_sigkilled_holder_is_taken_over_within_the_lease_time(url, reap):
    ttl = 2.0
    holder = _child("hold", url, AGENT, ttl)
    reap(holder)
    _wait_line(holder, "HELD")
    taker = _child("take", url, AGENT, ttl)
    reap(taker)
    _wait_line(taker, "READY")  # imported: from now on it only waits for the lease
    time.sleep(1.0)
    os.kill(holder.pid, signal.SIGKILL)
    killed_at = time.time()
    took = float(_wait_line(taker, "TOOK").split()[1])
    waited_after_kill = time.time() - killed_at
    code, out = _finish(taker)
    assert code == 0, out
    assert waited_after_kill < ttl + 2.0, waited_after_kill  # expiry + one poll, not more
    assert took > 0
    assert Store.open(url).manifest_seqs(AGENT) == [0, 1]
    assert Store.open(url).verify() > 0


def test_paused_process_whose_lease_was_taken_over_cannot_commit(url, reap):
    ttl = 1.5
    paused = _child("commit-later", url, AGENT, ttl, stdin=subprocess.PIPE)
    reap(paused)
    _wait_line(paused, "HELD")
    taker = _child("take", url, AGENT, ttl)
    reap(taker)
    os.kill(paused.pid, signal.SIGSTOP)  # stalls past its lease (a long GC, a frozen VM...)
    try:
        code, out = _finish(taker)
        assert code == 0, out
    finally:
        os.kill(paused.pid, signal.SIGCONT)
    paused.stdin.write("go\n")
    paused.stdin.flush()
    code, out = _finish(paused)
    assert code == 3, out
    assert "LOST" in out and "taken over" in out
    store = Store.open(url)
    assert store.manifest_seqs(AGENT) == [0, 1]  # only the taker's commit landed
    assert "holder-proc" not in str(store.read_manifest(AGENT, 1))


@pytest.mark.parametrize("phase", ["before", "tmp", "after"])
def test_kill_inside_lease_renewal_then_takeover(url, reap, phase):
    ttl = 1.5
    victim = _child("renew-kill", url, AGENT, ttl, phase)
    reap(victim)
    _wait_line(victim, "KILLED", timeout=120)
    victim.wait(30)
    assert victim.returncode == -signal.SIGKILL
    gen, body = lease.current(Store.open(url), AGENT)
    assert body is not None and body["owner"] == "holder-proc"  # a whole lease, never half
    taker = _child("take", url, AGENT, ttl)
    reap(taker)
    code, out = _finish(taker)
    assert code == 0, out
    assert float(out.split("TOOK")[1].split()[0]) < ttl + 2.0
    assert Store.open(url).manifest_seqs(AGENT) == [0, 1]
    assert lease.current(Store.open(url), AGENT)[0] > gen
