"""A serving reload while the writer is killed in the middle of a commit.

A writer process commits a new path for one task and stops at one point of that commit (before
or inside one of its writes: the params file, the manifest, the task index, the index marker);
while it is stopped there, the serving pool of this process reloads (``PredictorPool.refresh``)
and a fresh ``mu2net.serve.load`` answers too; then the writer is SIGKILLed, the pool reloads
again, the writer "restarts" (commits again), and the pool reloads a last time. At every
reload the pool answers from a committed path -- the old one until the new manifest exists, the
new one after -- with predictions bit-identical to that path's, the other task's answers never
change, and no file the store held before the kill changes. The final store equals one where
the same commit ran uninterrupted (same path ids, same params, same predictions).

Every writer is forked from one helper process (one import for all of them); it waits until
the test kills it, and every wait is bounded.
"""

import hashlib
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from serve_fixtures import batch, build_store, publish_head, task_name

from mu2net.serve import PredictorPool, load
from mu2net.system import Store, agent_for_task
from mu2net.system.store import flatten
from mu2net.system.verify import verify_store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK, OTHER = task_name(0), task_name(1)
SEED = 7  # the new head's params

# One line per writer on stdin: "URL PUT PHASE". The writer (a fork) commits a new head for
# TASK and stops at its PUT-th store write: before it, with only its temp file written, or
# after it; it prints "AT <pid>" and waits to be killed. The helper prints "EXIT <pid> <rc>".
HELPER = r"""
import os, signal, sys, time
import numpy as np
from serve_fixtures import publish_head, task_name
from mu2net.system import Store

def stop():
    print("AT", os.getpid(), flush=True)
    time.sleep(300)
    os._exit(5)

def writer(url, put, phase):
    real, n = Store.put_bytes, [0]
    def hooked(self, path, data):
        n[0] += 1
        if n[0] != put:
            return real(self, path, data)
        if phase == "before":
            stop()
        if phase == "tmp":  # the temp file is written, its exclusive link never happens
            os.link = lambda *a, **k: stop()
            return real(self, path, data)
        real(self, path, data)
        stop()
    Store.put_bytes = hooked
    store = Store.open(url)
    publish_head(store, store.load(), task_name(0), np.random.default_rng(int(sys.argv[1])))
    os._exit(6)  # the commit finished: the kill point was never reached

for line in sys.stdin:
    url, put, phase = line.split()
    pid = os.fork()
    if pid == 0:
        writer(url, int(put), phase)
    _, status = os.waitpid(pid, 0)
    rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    print("EXIT", pid, rc, flush=True)
"""

# (write, phase): the commit writes the params file, the manifest, the index, the marker.
POINTS = [(1, "tmp"), (2, "before"), (2, "after"), (3, "tmp"), (4, "before")]


def _answer(pred, task):
    labels, probs = pred.predict(task, batch(5, seed=3))
    return pred.path_id, hashlib.sha256(probs.tobytes() + labels.tobytes()).hexdigest()


def _files(root):
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            if ".tmp-" not in n:
                with open(os.path.join(d, n), "rb") as f:
                    out[os.path.join(d, n)] = f.read()
    return out


def _line(proc, prefix):
    """The helper's next stdout line, which must start with ``prefix``."""
    line = proc.stdout.readline()
    assert line.startswith(prefix), (prefix, line, proc.poll())
    return line.split()


@pytest.fixture
def helper():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.path.join(REPO, "tests")}
    proc = subprocess.Popen(
        [sys.executable, "-c", HELPER, str(SEED)],
        cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    yield proc
    proc.stdin.close()
    try:
        proc.wait(60)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _params(system):
    """Every component's params as bytes, by id."""
    out = {}
    for cid, c in system.components.items():
        tree = c.params if isinstance(c.params, dict) else {"": c.params}
        out[cid] = {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in flatten(tree).items()}
    return out


def _reload_and_check(pool, url, expect, other, where):
    """The pool reloads; it, and a fresh reader, answer ``expect``; the other task is as it was."""
    pool.refresh()
    assert _answer(pool.get(TASK), TASK) == expect, where
    assert _answer(load(url, TASK), TASK) == expect, where
    assert _answer(pool.get(OTHER), OTHER) == other, where


def test_serving_reload_while_the_writer_is_killed_mid_commit(tmp_path, helper):
    ref_store, _ = build_store(str(tmp_path / "reference"), 2)
    new_path = publish_head(ref_store, ref_store.load(), TASK, np.random.default_rng(SEED))
    new = _answer(PredictorPool(ref_store.url).get(TASK), TASK)
    assert new[0] == new_path.id
    reference = ref_store.load(lazy=False)
    for put, phase in POINTS:
        where = f"killed at write {put} ({phase})"
        store, _ = build_store(str(tmp_path / f"{put}-{phase}"), 2)
        pool = PredictorPool(store.url)
        old, other = _answer(pool.get(TASK), TASK), _answer(pool.get(OTHER), OTHER)
        landed = put >= 3 or (put, phase) == (2, "after")  # the new manifest exists
        helper.stdin.write(f"{store.url} {put} {phase}\n")
        helper.stdin.flush()
        pid = int(_line(helper, "AT")[1])
        before = _files(store.url)
        _reload_and_check(pool, store.url, new if landed else old, other, where)  # writer stopped
        os.kill(pid, signal.SIGKILL)
        assert _line(helper, "EXIT")[1:] == [str(pid), str(-signal.SIGKILL)], where
        _reload_and_check(pool, store.url, new if landed else old, other, where)
        # The restart: the agent commits again (the lost path, or the missing indexes).
        restarted = Store.open(store.url)
        system = restarted.load()
        if system.best_path(TASK).id == new[0]:
            restarted.commit(system, agent_for_task(TASK))
        else:
            publish_head(restarted, system, TASK, np.random.default_rng(SEED))
        _reload_and_check(pool, store.url, new, other, where)
        after = _files(store.url)
        assert {f: after.get(f) for f in before} == before, f"{where}: a committed file changed"
        assert verify_store(Store.open(store.url)).ok, where
        final = Store.open(store.url).load(lazy=False)
        assert {p: (q.components, q.hparams) for p, q in final.paths.items()} == {
            p: (q.components, q.hparams) for p, q in reference.paths.items()
        }, where
        assert _params(final) == _params(reference), where
