import json
import math
import multiprocessing as mp
import os
import warnings

import numpy as np
import pytest

from mu2net.system import (
    NameError_,
    Path,
    StateError,
    Store,
    StoreConflict,
    StoreError,
    System,
    agent_for_task,
)

FAMILY = "toy"
NAMES = ["embed", "block_0", "block_1", "norm", "head"]


def _params(rng, name, width=4):
    return {
        "kernel": rng.normal(size=(width, width)).astype(np.float32),
        "bias": rng.normal(size=(width,)).astype(np.float32),
    }


def build_system(seed=0):
    """A root and three task paths: A clones block_1, B shares A's block_1, C shares the root."""
    rng = np.random.default_rng(seed)
    s = System()
    root = s.add_root("root:toy", FAMILY, {n: _params(rng, n) for n in NAMES}, {"x": 1}, "root")
    for task in ["t:a", "t:b", "t:c"]:
        s.add_task(task, agent_for_task(task))
    a_agent = agent_for_task("t:a")
    comps = dict(root.components)
    comps["block_1"] = s.clone_component(root.components["block_1"], a_agent).id
    comps["head"] = s.new_component("head", FAMILY, _params(rng, "head"), a_agent).id
    a = Path(
        s.new_id(a_agent, "p"),
        "t:a",
        FAMILY,
        comps,
        {"opt_lr": 0.1},
        a_agent,
        parent=root.id,
        metrics={"quality": 0.9, "generation": 1},
    )
    s.publish(a)
    b_agent = agent_for_task("t:b")
    comps_b = dict(comps)
    comps_b["head"] = s.new_component("head", FAMILY, _params(rng, "head"), b_agent).id
    b = Path(
        s.new_id(b_agent, "p"),
        "t:b",
        FAMILY,
        comps_b,
        {"opt_lr": 0.01},
        b_agent,
        parent=a.id,
        metrics={"quality": 0.8},
    )
    s.publish(b)
    c_agent = agent_for_task("t:c")
    comps_c = dict(root.components)
    comps_c["head"] = s.new_component("head", FAMILY, _params(rng, "head"), c_agent).id
    c = Path(
        s.new_id(c_agent, "p"),
        "t:c",
        FAMILY,
        comps_c,
        {},
        c_agent,
        parent=root.id,
        metrics={"quality": 0.5},
    )
    s.publish(c)
    return s


def commit_all(store, s):
    for agent in sorted({c.agent for c in s.components.values()} | set(s.task_agents.values())):
        store.commit(s, agent)


def assert_equal_systems(s1, s2):
    assert s1.tasks == s2.tasks
    assert set(s1.paths) == set(s2.paths)
    for pid, p in s1.paths.items():
        q = s2.paths[pid]
        assert p.to_json() == q.to_json()
        assert s1.accounted_params(p) == pytest.approx(s2.accounted_params(q)) or p.is_root
        assert s1.score(p) == s2.score(q)
        for cid in p.components.values():
            c1, c2 = s1.components[cid], s2.components[cid]
            assert c1.locks == c2.locks
            for k in c1.params:
                assert np.array_equal(c1.params[k], c2.params[k])
                assert c1.params[k].tobytes() == c2.params[k].tobytes()


def test_accounting_and_locks():
    s = build_system()
    a, b, c = (s.best_path(t) for t in ["t:a", "t:b", "t:c"])
    blk = s.components[a.components["block_1"]]
    assert blk.locks == {"t:a", "t:b"}
    assert not blk.trainable
    # embed: root lock + a, b (root lock excluded from sharers) -> 1/2 each for a and b.
    n = 4 * 4 + 4
    # a: embed/block_0/norm shared with a,b,c -> 1/3 each; block_1 shared a,b -> 1/2; head 1.
    assert s.accounted_params(a) == pytest.approx(3 * n / 3 + n / 2 + n)
    assert s.accounted_params(c) == pytest.approx(3 * n / 3 + n / 1 + n)
    assert math.isnan(s.accounted_params(s.roots()[0]))
    assert s.score(a) == 0.9
    assert s.score(a, scale=0.5, params_base=s.accounted_params(a)) == pytest.approx(0.45)
    s.validate()


def test_round_trip(tmp_path):
    s = build_system()
    store = Store.create(str(tmp_path / "sys"), "demo")
    commit_all(store, s)
    s2 = Store.open(str(tmp_path / "sys")).load(lazy=False)
    assert_equal_systems(s, s2)
    assert all(c.committed for c in s2.components.values())


def test_lazy_load_reads_only_the_path(tmp_path):
    s = build_system()
    store = Store.create(str(tmp_path / "sys"), "demo")
    commit_all(store, s)
    reader = Store.open(str(tmp_path / "sys"))
    s2 = reader.load()
    before = reader.files_read
    c_path = s2.best_path("t:c")
    s2.params_of(c_path)
    assert reader.files_read - before == len(c_path.components)
    assert sum(c.loaded for c in s2.components.values()) == len(c_path.components)


def _component_files(root):
    return sorted(
        os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".safetensors")
    )


def test_incremental_commit_writes_only_new_components(tmp_path):
    s = build_system()
    store = Store.create(str(tmp_path / "sys"), "demo")
    commit_all(store, s)
    files_before = _component_files(tmp_path / "sys")
    # Task a gets a new best path: one new clone (block_0) and a new head.
    agent = agent_for_task("t:a")
    a = s.best_path("t:a")
    rng = np.random.default_rng(1)
    comps = dict(a.components)
    comps["block_0"] = s.clone_component(a.components["block_0"], agent).id
    comps["head"] = s.new_component("head", FAMILY, _params(rng, "head"), agent).id
    s.publish(
        Path(
            s.new_id(agent, "p"),
            "t:a",
            FAMILY,
            comps,
            {},
            agent,
            parent=a.id,
            metrics={"quality": 0.95},
        )
    )
    seq = store.commit(s, agent)
    assert seq == 1
    files_after = _component_files(tmp_path / "sys")
    new_files = sorted(set(files_after) - set(files_before))
    assert len(new_files) == 2
    assert sum(os.path.getsize(f) for f in new_files) < 2 * 400
    s2 = Store.open(str(tmp_path / "sys")).load(lazy=False)
    assert_equal_systems(s, s2)


def test_crash_between_params_and_manifest_keeps_previous_state(tmp_path, monkeypatch):
    s = build_system()
    url = str(tmp_path / "sys")
    store = Store.create(url, "demo")
    commit_all(store, s)
    agent = agent_for_task("t:a")
    a = s.best_path("t:a")
    comps = dict(
        a.components,
        head=s.new_component("head", FAMILY, _params(np.random.default_rng(2), "head"), agent).id,
    )
    s.publish(
        Path(
            s.new_id(agent, "p"),
            "t:a",
            FAMILY,
            comps,
            {},
            agent,
            parent=a.id,
            metrics={"quality": 0.99},
        )
    )
    real_put = Store.put_bytes

    def crashing_put(self, path, data):
        if "manifest-" in path:
            raise OSError("No space left on device")  # the disk fills before the manifest
        return real_put(self, path, data)

    monkeypatch.setattr(Store, "put_bytes", crashing_put)
    with pytest.raises(OSError, match="No space"):
        store.commit(s, agent)
    monkeypatch.setattr(Store, "put_bytes", real_put)
    s2 = Store.open(url).load(lazy=False)
    assert s2.best_path("t:a").metrics["quality"] == 0.9
    # A half-written temp manifest (crash mid-file) is ignored too.
    shard = tmp_path / "sys" / "shards" / agent
    (shard / "manifest-00000001.json.tmp-dead").write_text('{"format": "mu2')
    assert Store.open(url).load().best_path("t:a").metrics["quality"] == 0.9
    # The restarted agent commits again; no collision with the orphan files.
    assert store.commit(s, agent) == 1
    assert Store.open(url).load(lazy=False).best_path("t:a").metrics["quality"] == 0.99


def _writer(url, task, seed):
    rng = np.random.default_rng(seed)
    store = Store.open(url)
    s = store.load()
    agent = agent_for_task(task)
    s.add_task(task, agent)
    root = s.roots()[0]
    comps = dict(root.components)
    comps["head"] = s.new_component("head", FAMILY, _params(rng, "head"), agent).id
    comps["block_1"] = s.clone_component(root.components["block_1"], agent).id
    s.publish(
        Path(
            s.new_id(agent, "p"),
            task,
            FAMILY,
            comps,
            {},
            agent,
            parent=root.id,
            metrics={"quality": 0.5 + seed / 10},
        )
    )
    store.commit(s, agent)


def test_two_writers_in_two_processes(tmp_path):
    url = str(tmp_path / "sys")
    store = Store.create(url, "demo")
    s = System()
    rng = np.random.default_rng(0)
    s.add_root("root:toy", FAMILY, {n: _params(rng, n) for n in NAMES}, {}, "root")
    store.commit(s, "root")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(url, t, i)) for i, t in enumerate(["w:x", "w:y"])]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    merged = Store.open(url).load(lazy=False)
    assert sorted(merged.tasks) == ["w:x", "w:y"]
    x, y = merged.best_path("w:x"), merged.best_path("w:y")
    assert set(x.components.values()) & set(y.components.values()) == {
        merged.roots()[0].components[n] for n in ["embed", "block_0", "norm"]
    }
    assert len(merged.components) == len(NAMES) + 4
    merged.validate()


def test_same_shard_concurrent_commit_conflicts(tmp_path):
    url = str(tmp_path / "sys")
    store = Store.create(url, "demo")
    s = build_system()
    commit_all(store, s)
    agent = agent_for_task("t:c")
    seq = store.latest_manifest(agent)["seq"]
    # Another writer got seq+1 first: this commit must fail loudly, not overwrite.
    manifest = tmp_path / "sys" / "shards" / agent / f"manifest-{seq + 1:08d}.json"
    manifest.write_bytes(
        (tmp_path / "sys" / "shards" / agent / f"manifest-{seq:08d}.json").read_bytes()
    )
    with pytest.raises(StoreError):
        store.commit(s, agent)
    with pytest.raises(StoreConflict):
        store.put_bytes(str(manifest), b"x")


def test_fsspec_memory_store():
    url = "memory://mu2net-test-store"
    store = Store.create(url, "demo")
    s = build_system()
    commit_all(store, s)
    assert_equal_systems(s, Store.open(url).load(lazy=False))
    reader = Store.open(url)
    before = reader.files_read
    one = reader.load_task("t:b")  # store marker + the task's index, on an object-store-like fs
    assert reader.files_read - before == 2 and one.tasks == ["t:b"]
    assert one.params_of(one.best_path("t:b"))["head"]["kernel"].tobytes() == (
        s.params_of(s.best_path("t:b"))["head"]["kernel"].tobytes()
    )


# ---------------------------------------------------------------------------------- bad input
@pytest.fixture
def committed(tmp_path):
    url = str(tmp_path / "sys")
    store = Store.create(url, "demo")
    s = build_system()
    commit_all(store, s)
    return url, s, tmp_path / "sys"


def test_unknown_component_in_path():
    s = build_system()
    bad = Path("x/p0", "t:a", FAMILY, {"head": "nobody/c9"}, {}, "x")
    with pytest.raises(StateError, match="nobody/c9"):
        s.publish(bad)


@pytest.mark.parametrize("name", ["../evil", "a/b", "tab\tname", "new\nline", "", "x..y"])
def test_bad_task_names(name):
    with pytest.raises(NameError_, match="invalid task name|non-empty"):
        System().add_task(name, "agent")


@pytest.mark.parametrize("name", ["../evil", "a/b", ".hidden", "ctl\x01"])
def test_bad_agent_names(tmp_path, name):
    with pytest.raises(NameError_, match="invalid agent name"):
        Store.create(str(tmp_path / "s"), "demo").commit(System(), name)


def test_truncated_params_file(committed):
    url, s, root = committed
    f = _component_files(root)[0]
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) // 2])
    loaded = Store.open(url).load()
    with pytest.raises(StoreError, match=os.path.basename(f)):
        for c in loaded.components.values():
            c.params  # noqa: B018


def test_checksum_mismatch(committed):
    url, s, root = committed
    f = _component_files(root)[-1]
    data = bytearray(open(f, "rb").read())
    data[-1] ^= 0xFF
    open(f, "wb").write(bytes(data))
    with pytest.raises(StoreError, match="checksum mismatch"):
        Store.open(url).verify()


def _latest_manifest_file(root, agent):
    d = root / "shards" / agent
    return sorted(p for p in d.iterdir() if p.name.startswith("manifest-"))[-1]


def test_newer_manifest_version_is_refused_and_previous_loads(committed):
    url, s, root = committed
    agent = agent_for_task("t:b")
    store = Store.open(url)
    store.commit(s, agent)  # seq 1, identical content
    mf = _latest_manifest_file(root, agent)
    doc = json.loads(mf.read_text())
    doc["version"] = 99
    mf.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match=r"manifest-00000001.json: format version 99"):
        Store.open(url).load()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s2 = Store.open(url).load(on_corrupt="previous", lazy=False)
    assert any("format version 99" in str(w.message) for w in caught)
    assert_equal_systems(s, s2)


def test_truncated_and_foreign_manifest(committed):
    url, s, root = committed
    agent = agent_for_task("t:c")
    mf = _latest_manifest_file(root, agent)
    text = mf.read_text()
    mf.write_text(text[: len(text) // 3])
    with pytest.raises(StoreError, match="corrupt or truncated JSON"):
        Store.open(url).load()
    mf.write_text(json.dumps({"format": "something-else", "version": 1}))
    with pytest.raises(StoreError, match="foreign file"):
        Store.open(url).load()


def test_tampered_manifest_checksum(committed):
    url, s, root = committed
    mf = _latest_manifest_file(root, agent_for_task("t:a"))
    doc = json.loads(mf.read_text())
    doc["body"]["paths"][0]["metrics"]["quality"] = 1.0
    mf.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="checksum mismatch"):
        Store.open(url).load()


def test_missing_component_file_named(committed):
    url, s, root = committed
    f = _component_files(root)[0]
    os.remove(f)
    with pytest.raises(StoreError, match="file missing"):
        Store.open(url).verify()


def test_not_a_store(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file.txt").write_text("hello")
    with pytest.raises(StoreError, match="not a mu2net store"):
        Store.open(str(tmp_path / "x"))
    with pytest.raises(StoreError, match="not empty"):
        Store.create(str(tmp_path / "x"), "demo")


def test_published_component_cannot_change():
    s = build_system()
    a = s.best_path("t:a")
    c = s.components[a.components["head"]]
    with pytest.raises(StateError, match="can never change"):
        c.set_trained(c.params)


def test_republish_keeps_shared_uncommitted_components():
    s = build_system()
    a = s.best_path("t:a")
    agent = agent_for_task("t:a")
    new = Path(s.new_id(agent, "p"), "t:a", FAMILY, dict(a.components), {}, agent, parent=a.id)
    s.publish(new)
    assert s.best_path("t:a") is new
    assert all(cid in s.components for cid in new.components.values())
    assert s.components[new.components["head"]].locks == {"t:a"}
    s.validate()
