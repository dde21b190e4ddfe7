"""Per-task indexes: one task loads from one small file, and crashes never serve a stale path."""

import os

import numpy as np
import pytest
from test_system_store import FAMILY, _params, build_system, commit_all

from mu2net.system import Path, Store, StoreError, agent_for_task, task_index


def _new_best(s, task, seed, quality):
    """Publishes a new best path for ``task``: a fresh head on its current path."""
    agent = agent_for_task(task)
    old = s.best_path(task)
    head = s.new_component("head", FAMILY, _params(np.random.default_rng(seed), "head"), agent)
    path = Path(
        s.new_id(agent, "p"),
        task,
        FAMILY,
        dict(old.components, head=head.id),
        {},
        agent,
        parent=old.id,
        metrics={"quality": quality},
    )
    s.publish(path)
    return path


def _reads(store):
    """Records the files ``store`` reads."""
    seen = []
    real_get = store.get_bytes

    def get(path):
        seen.append(path)
        return real_get(path)

    store.get_bytes = get
    return seen


@pytest.fixture
def committed(tmp_path):
    s = build_system()
    url = str(tmp_path / "sys")
    commit_all(Store.create(url, "demo"), s)
    return url, s


def test_load_task_reads_one_index_and_matches_the_full_load(committed):
    url, s = committed
    full = Store.open(url).load()
    x = np.random.default_rng(0).normal(size=(4,)).astype(np.float32)
    for task in ["t:a", "t:b", "t:c"]:
        store = Store.open(url)
        seen = _reads(store)
        one = store.load_task(task)
        assert not any("manifest-" in p for p in seen), seen
        assert [os.path.basename(p).split("-")[0] for p in seen] == ["mu2net", "index"]
        assert one.tasks == [task]
        p, q = one.best_path(task), full.best_path(task)
        assert p.to_json() == q.to_json()
        for cid in p.components.values():  # same bytes: the index points at the same files
            for k, v in one.components[cid].params.items():
                assert v.tobytes() == full.components[cid].params[k].tobytes()
        assert (x @ one.params_of(p)["head"]["kernel"]).tobytes() == (
            x @ full.params_of(q)["head"]["kernel"]
        ).tobytes()
    eager = Store.open(url).load_task("t:b", lazy=False)
    assert eager.best_path("t:b").id == full.best_path("t:b").id
    assert all(c.loaded for c in eager.components.values())


def test_index_follows_new_commits_and_only_changed_tasks_get_one(committed, tmp_path):
    url, s = committed
    store = Store.open(url)
    new = _new_best(s, "t:a", seed=7, quality=0.97)
    store.commit(s, agent_for_task("t:a"))
    assert Store.open(url).load_task("t:a").best_path("t:a").id == new.id
    # t:b's shard did not commit again: its index from the first commit stays current.
    files = os.listdir(os.path.dirname(task_index.index_path(store, "t:b", "x", 0)))
    assert len(files) == 1
    # A commit of t:a that changes nothing writes no index, only its marker.
    store.commit(s, agent_for_task("t:a"))
    a_dir = os.path.dirname(task_index.index_path(store, "t:a", "x", 0))
    assert len(os.listdir(a_dir)) == 2
    assert Store.open(url).load_task("t:a").best_path("t:a").id == new.id


def test_crash_between_manifest_and_index_never_serves_the_old_path(committed, monkeypatch):
    url, s = committed
    store = Store.open(url)
    agent = agent_for_task("t:a")
    new = _new_best(s, "t:a", seed=8, quality=0.98)
    real_put = Store.put_bytes

    def crashing_put(self, path, data):
        if "/tasks/" in path:
            raise OSError("killed")  # after the manifest: the commit itself has landed
        return real_put(self, path, data)

    monkeypatch.setattr(Store, "put_bytes", crashing_put)
    with pytest.raises(OSError, match="killed"):
        store.commit(s, agent)
    monkeypatch.setattr(Store, "put_bytes", real_put)
    # The committed path is served (through the full load), not the stale index.
    reader = Store.open(url)
    seen = _reads(reader)
    assert reader.load_task("t:a").best_path("t:a").id == new.id
    assert any("manifest-" in p for p in seen)
    # The agent's next commit writes the missing index and its marker; reads are cheap again.
    restarted = Store.open(url).load()
    assert Store.open(url).commit(restarted, agent) == 2
    reader = Store.open(url)
    seen = _reads(reader)
    assert reader.load_task("t:a").best_path("t:a").id == new.id
    assert not any("manifest-" in p for p in seen)
    assert os.path.exists(task_index.indexed_marker(reader, agent, 1))


def test_index_above_the_listed_manifests_is_ignored(committed):
    url, s = committed
    store = Store.open(url)
    agent = agent_for_task("t:a")
    committed_id = s.best_path("t:a").id
    # An index of a commit the reader's listing does not include yet (or a stray file).
    body = {"seq": 5, "paths": [s.best_path("t:a").to_json()], "components": {}}
    body["paths"][0]["id"] = "bogus"
    store.put_bytes(task_index.index_path(store, "t:a", agent, 5), store.document(body))
    assert Store.open(url).load_task("t:a").best_path("t:a").id == committed_id


def test_corrupt_index_named_and_previous_falls_back(committed):
    url, _ = committed
    store = Store.open(url)
    path = task_index.find_index(store, "t:c")
    with open(path, "r+b") as f:
        f.seek(40)
        f.write(b"#")
    with pytest.raises(StoreError, match=os.path.basename(path)):
        Store.open(url).load_task("t:c")
    with pytest.warns(UserWarning, match="broken task index"):
        system = Store.open(url).load_task("t:c", on_corrupt="previous")
    assert system.best_path("t:c") is not None


def test_unknown_task_named(committed):
    url, _ = committed
    with pytest.raises(StoreError, match=r"'t:zzz' has no published path.*'t:a'"):
        Store.open(url).load_task("t:zzz")


def test_store_without_indexes_still_loads_a_task(committed, tmp_path):
    url, s = committed
    import shutil

    shutil.rmtree(os.path.join(tmp_path, "sys", "tasks"))  # a store written before indexes
    assert Store.open(url).load_task("t:b").best_path("t:b").id == s.best_path("t:b").id
