"""Shard leases in one process: exclusion, renewal, takeover, fencing of commits, waiting."""

import os
import threading
import time

import pytest
from test_system_store import build_system

from mu2net.errors import Mu2netError
from mu2net.system import Store, agent_for_task, layout, lease
from mu2net.system.lease import LeaseHeldError, LeaseLostError, ShardLease

AGENT = agent_for_task("t:a")


@pytest.fixture
def url(tmp_path):
    url = str(tmp_path / "sys")
    store = Store.create(url, "demo")
    s = build_system()
    for agent in sorted({c.agent for c in s.components.values()} | set(s.task_agents.values())):
        store.commit(s, agent)
    return url


def _stall(held):
    """Stops the renewal thread, as if the process were paused (SIGSTOP, a long GC...)."""
    held._stop.set()
    held._thread.join(5)


def _system(url):
    return Store.open(url).load()


def test_second_holder_is_refused_with_the_holders_identity(url):
    first = ShardLease(Store.open(url), AGENT, owner="alice@box").acquire()
    try:
        with pytest.raises(LeaseHeldError) as err:
            ShardLease(Store.open(url), AGENT).acquire()
        msg = str(err.value)
        assert isinstance(err.value, Mu2netError)
        for part in ["alice@box", f"pid {os.getpid()}", AGENT, "--wait_for_lease", "--agent="]:
            assert part in msg, (part, msg)
        # Another shard is free.
        ShardLease(Store.open(url), agent_for_task("t:b")).acquire().release()
    finally:
        first.release()
    ShardLease(Store.open(url), AGENT).acquire().release()  # released: free again


def test_renewal_keeps_the_lease_past_its_ttl_and_files_stay_few(url):
    held = ShardLease(Store.open(url), AGENT, ttl_s=0.6).acquire()
    try:
        time.sleep(2.0)
        assert held.renewals >= 3
        with pytest.raises(LeaseHeldError):
            ShardLease(Store.open(url), AGENT, ttl_s=0.6).acquire()
        held.check()
        files = os.listdir(os.path.join(url, layout.lease_dir(AGENT)))
        assert len([f for f in files if layout.LEASE_RE.match(f)]) <= 3, files
    finally:
        held.release()


def test_takeover_after_expiry_fences_the_old_holder(url):
    old_store, new_store = Store.open(url), Store.open(url)
    old = ShardLease(old_store, AGENT, ttl_s=0.4).acquire()
    _stall(old)
    time.sleep(0.6)
    new = ShardLease(new_store, AGENT, ttl_s=5).acquire()
    try:
        with pytest.raises(LeaseLostError, match="taken over"):
            old.check()
        s = _system(url)
        with pytest.raises(LeaseLostError):
            old_store.commit(s, AGENT)  # the stalled process can no longer commit
        assert new_store.commit(s, AGENT) == 1
        assert lease.held_by_process(Store.open(url), AGENT) is new  # the process's lease
        assert Store.open(url).manifest_seqs(AGENT) == [0, 1]
        # A lost lease cannot be renewed either.
        with pytest.raises(LeaseLostError):
            old.renew()
    finally:
        new.release()
        old.release()
    assert Store.open(url).commit(_system(url), AGENT) == 2  # no lease anywhere: as before


def test_stalled_but_unchallenged_holder_keeps_its_shard(url):
    store = Store.open(url)
    held = ShardLease(store, AGENT, ttl_s=0.3).acquire()
    _stall(held)
    time.sleep(0.5)  # expired, nobody took it: check() renews
    assert store.commit(_system(url), AGENT) == 1
    held.release()


def test_wait_for_lease_waits_for_release_and_times_out(url):
    first = ShardLease(Store.open(url), AGENT).acquire()
    with pytest.raises(LeaseHeldError, match="waited"):
        ShardLease(Store.open(url), AGENT, wait=True, wait_timeout_s=0.3).acquire()
    threading.Timer(0.5, first.release).start()
    t0 = time.time()
    second = ShardLease(Store.open(url), AGENT, wait=True, wait_timeout_s=10).acquire()
    assert 0.4 < time.time() - t0 < 5
    second.release()


def test_racing_acquirers_exactly_one_wins(url):
    results = []
    barrier = threading.Barrier(6)

    def go():
        barrier.wait()
        try:
            results.append(ShardLease(Store.open(url), AGENT).acquire())
        except LeaseHeldError:
            results.append(None)

    threads = [threading.Thread(target=go) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    winners = [r for r in results if r is not None]
    assert len(results) == 6 and len(winners) == 1
    winners[0].release()


def test_unreadable_lease_counts_as_expired(url):
    held = ShardLease(Store.open(url), AGENT, ttl_s=60).acquire()
    _stall(held)
    path = os.path.join(url, layout.lease_path(AGENT, held.generation))
    with open(path, "r+b") as f:
        f.seek(30)
        f.write(b"\x00garbage")
    taker = ShardLease(Store.open(url), AGENT).acquire()  # not locked forever by a broken file
    with pytest.raises(LeaseLostError):
        held.check()
    taker.release()


def test_memory_store_and_context_manager():
    url = f"memory://lease-{time.time_ns()}"
    store = Store.create(url, "demo")
    s = build_system()
    with ShardLease(store, "root"):
        with pytest.raises(LeaseHeldError):
            ShardLease(Store.open(url), "root").acquire()
        assert store.commit(s, "root") == 0
    ShardLease(Store.open(url), "root").acquire().release()


def test_hold_auto_leases_shards_this_process_commits(url):
    store = Store.open(url)
    s = _system(url)
    other = agent_for_task("t:c")
    with lease.hold(store, [AGENT], ttl_s=10, auto=True) as leases:
        store.commit(s, other)  # not leased at start: leased at its first commit
        assert {h.agent for h in leases} == {AGENT, other}
        with pytest.raises(LeaseHeldError):
            ShardLease(Store.open(url), other).acquire()  # another holder: refused
    assert lease.current(Store.open(url), other)[1]["released"]


def test_bad_ttl_is_a_store_error(url):
    with pytest.raises(Mu2netError, match="ttl_s"):
        ShardLease(Store.open(url), AGENT, ttl_s=0)


def test_status_names_live_holders(url, capsys):
    from mu2net import cli

    with ShardLease(Store.open(url), AGENT, owner="carol@lab"):
        assert cli.main(["status", "--store", url]) == 0
        assert f"shard {AGENT!r} is being evolved: held by owner 'carol@lab'" in (
            capsys.readouterr().out
        )
    cli.main(["status", "--store", url])
    assert "being evolved" not in capsys.readouterr().out
