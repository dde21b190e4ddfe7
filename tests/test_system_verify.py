"""``mu2net verify``: every fault of the catalogue is found and named; healthy stores pass."""

import glob
import hashlib
import json
import os
import time

import numpy as np
import pytest
from test_system_store import FAMILY, _params, build_system, commit_all
from test_system_task_index import _new_best

from mu2net import cli
from mu2net.system import Path, Store, System, agent_for_task, layout, task_index
from mu2net.system.documents import StoreError, canonical, sha256
from mu2net.system.verify import last_result, record_result, verify_store

A = agent_for_task("t:a")


@pytest.fixture
def store_url(tmp_path):
    s = build_system()
    url = str(tmp_path / "sys")
    commit_all(Store.create(url, "demo"), s)
    return url, s


def _component_file(url, agent, name="head"):
    body = Store.open(url).latest_manifest(agent)
    cid, rec = next((c, r) for c, r in body["components"].items() if r["name"] == name)
    return os.path.join(url, layout.shard_file(agent, rec["file"])), cid


def _only(report, kind):
    assert not report.ok
    assert [f.kind for f in report.faults] == [kind], [f.line() for f in report.faults]
    return report.faults[0]


def test_healthy_store_passes(store_url):
    url, _ = store_url
    report = verify_store(Store.open(url))
    assert report.ok, [f.line() for f in report.faults]
    assert report.tasks == 3 and report.shards == 4 and report.components >= 8
    assert report.files >= report.components + 4  # every component file and manifest read


def test_corrupt_component_names_file_and_tasks(store_url):
    url, _ = store_url
    file, _ = _component_file(url, A, "block_1")  # t:a's clone, shared with t:b
    data = bytearray(open(file, "rb").read())
    data[-3] ^= 0x40
    open(file, "wb").write(bytes(data))
    fault = _only(verify_store(Store.open(url)), "corrupt")
    assert fault.file == file and fault.tasks == ["t:a", "t:b"]
    assert "checksum" in fault.detail


def test_missing_and_truncated_component(store_url):
    url, _ = store_url
    file, _ = _component_file(url, A)
    os.remove(file)
    fault = _only(verify_store(Store.open(url)), "missing")
    assert fault.file == file and fault.tasks == ["t:a"]
    file_c, _ = _component_file(url, agent_for_task("t:c"))
    os.truncate(file_c, os.path.getsize(file_c) // 2)
    report = verify_store(Store.open(url))
    assert sorted(f.kind for f in report.faults) == ["missing", "truncated"]
    assert next(f for f in report.faults if f.kind == "truncated").tasks == ["t:c"]


def test_corrupt_manifest_names_it(store_url):
    url, _ = store_url
    path = Store.open(url).manifest_path(A, 0)
    text = open(path).read()
    open(path, "w").write(text.replace('"quality": 0.9', '"quality": 0.1'))
    report = verify_store(Store.open(url))
    assert [f.kind for f in report.faults] == ["corrupt", "dangling"], report.faults
    fault, dangling = report.faults
    assert fault.file == path and "checksum" in fault.detail
    assert fault.tasks == []  # no earlier readable state of the shard to name tasks from
    # t:b shares t:a's block_1, which only the broken manifest lists.
    assert dangling.tasks == ["t:b"]


def test_dangling_reference(store_url):
    url, s = store_url
    store = Store.open(url)
    body = store.latest_manifest(A)
    body["seq"] = 1
    body["paths"][0]["components"]["head"] = "t~a/c999"  # no shard holds it
    store.put_bytes(store.manifest_path(A, 1), store.document(body))
    fault = _only(verify_store(Store.open(url)), "dangling")
    assert fault.file == store.manifest_path(A, 1) and fault.tasks == ["t:a"]
    assert "t~a/c999" in fault.detail


def test_path_of_a_task_no_shard_lists(store_url):
    """A (re-signed) manifest that lost its task entry: the fuzzer found load dropping the task
    from the live mixture silently; now load refuses and verify names the manifest."""
    url, _ = store_url
    store = Store.open(url)
    c = agent_for_task("t:c")
    body = store.latest_manifest(c)
    assert [t["task"] for t in body["tasks"]] == ["t:c"]
    body.update(seq=1, tasks=[])
    store.put_bytes(store.manifest_path(c, 1), store.document(body))
    fault = _only(verify_store(Store.open(url)), "dangling")
    assert fault.file == store.manifest_path(c, 1) and fault.tasks == ["t:c"]
    with pytest.raises(StoreError, match="manifest-00000001.*no shard lists"):
        Store.open(url).load()


def test_manifest_that_lost_its_tasks_path(store_url):
    """A re-signed manifest without its task's path (found by a sweep of every re-signed
    deletion): the task's index shows it had one, so load refuses and verify names it."""
    url, _ = store_url
    store = Store.open(url)
    body = store.latest_manifest(A)
    body.update(seq=1, paths=[p for p in body["paths"] if p["task"] != "t:a"])
    store.put_bytes(store.manifest_path(A, 1), store.document(body))
    with pytest.raises(StoreError, match="manifest-00000001.*'t:a' has task indexes but no"):
        Store.open(url).load()
    fault = _only(verify_store(Store.open(url)), "dangling")
    assert fault.file == store.manifest_path(A, 1)


def test_path_whose_family_is_not_its_components(store_url):
    """A re-signed manifest whose path names another (valid-looking) family: found by the long
    fuzz run loading silently; now load refuses and verify names the manifest and task."""
    url, _ = store_url
    store = Store.open(url)
    body = store.latest_manifest(A)
    body["seq"] = 1
    body["paths"][0]["family"] = FAMILY + ".."
    store.put_bytes(store.manifest_path(A, 1), store.document(body))
    fault = _only(verify_store(Store.open(url)), "dangling")
    assert fault.file == store.manifest_path(A, 1) and fault.tasks == ["t:a"]
    with pytest.raises(StoreError, match="manifest-00000001.*inconsistent.*not of family"):
        Store.open(url).load()


def test_stale_index_is_found_and_repaired_without_touching_params(store_url):
    url, s = store_url
    new = _new_best(s, "t:a", seed=7, quality=0.97)
    Store.open(url).commit(s, A)
    store = Store.open(url)
    lost = task_index.index_path(store, "t:a", A, 1)
    os.remove(lost)  # the newest index is lost: readers would serve the previous path
    assert Store.open(url).load_task("t:a").best_path("t:a").id != new.id
    fault = _only(verify_store(Store.open(url)), "stale-index")
    assert fault.tasks == ["t:a"] and fault.repairable
    params = {f: _digest(f) for f in glob.glob(f"{url}/shards/*/params/*")}
    manifests = {f: _digest(f) for f in glob.glob(f"{url}/shards/*/manifest-*")}
    report = verify_store(Store.open(url), repair=True)
    assert report.ok and report.repaired == [lost]
    assert {f: _digest(f) for f in glob.glob(f"{url}/shards/*/params/*")} == params
    assert {f: _digest(f) for f in glob.glob(f"{url}/shards/*/manifest-*")} == manifests
    assert Store.open(url).load_task("t:a").best_path("t:a").id == new.id


def test_corrupt_index_is_repairable(store_url):
    url, _ = store_url
    path = task_index.find_index(Store.open(url), "t:b")
    with open(path, "r+b") as f:
        f.seek(60)
        f.write(b"\xff\xff")
    fault = _only(verify_store(Store.open(url)), "corrupt")
    assert fault.file == path and fault.repairable and fault.tasks == ["t:b"]
    assert verify_store(Store.open(url), repair=True).ok
    assert Store.open(url).load_task("t:b").best_path("t:b").task == "t:b"


def _digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_cli_verify_exit_code_and_status_shows_the_last_run(store_url, capsys):
    url, _ = store_url
    assert cli.main(["status", "--store", url]) == 0
    assert "last verify: never" in capsys.readouterr().out
    assert cli.main(["verify", "--store", url]) == 0
    out = capsys.readouterr().out
    assert "OK" in out
    cli.main(["status", "--store", url])
    assert "last verify:" in (out := capsys.readouterr().out) and ": OK" in out
    file, _ = _component_file(url, A)
    os.remove(file)
    assert cli.main(["verify", "--store", url]) == 1
    captured = capsys.readouterr()
    assert f"missing: {file}" in captured.out and "t:a" in captured.out
    assert "1 fault(s)" in captured.err
    assert last_result(Store.open(url))["ok"] is False
    cli.main(["status", "--store", url])
    assert "1 fault(s)" in capsys.readouterr().out


def test_verify_record_is_a_checked_document(store_url):
    url, _ = store_url
    store = Store.open(url)
    path = record_result(store, verify_store(store))
    doc = json.loads(open(path).read())
    assert doc["sha256"] == sha256(canonical(doc["body"])) and doc["body"]["ok"]
    assert layout.VERIFY_RE.match(os.path.basename(path))


def test_fifty_task_store_verifies_in_bounded_time(tmp_path):
    rng = np.random.default_rng(0)
    s = System()
    root = s.add_root("root:toy", FAMILY, {n: _params(rng, n, 16) for n in "abc"}, {}, "root")
    for i in range(50):
        task = f"t:task{i}"
        agent = agent_for_task(task)
        s.add_task(task, agent)
        head = s.new_component("c", FAMILY, _params(rng, "c", 16), agent)
        s.publish(
            Path(
                s.new_id(agent, "p"),
                task,
                FAMILY,
                dict(root.components, c=head.id),
                {},
                agent,
                parent=root.id,
                metrics={"quality": 0.5},
            )  # fmt: skip
        )
    url = str(tmp_path / "sys50")
    commit_all(Store.create(url, "fifty"), s)
    t0 = time.time()
    report = verify_store(Store.open(url))
    seconds = time.time() - t0
    assert report.ok, [f.line() for f in report.faults]
    assert report.tasks == 50 and report.components == 53
    print(f"\nverify, 50-task store: {report.summary()} (wall {seconds:.2f} s)")
    assert seconds < 30.0


def test_index_of_a_commit_the_load_did_not_read(store_url):
    """CI caught a reader failing while an agent committed a task's first path: the reader read
    the manifest before the commit and listed the task's folder after its index landed. Indexes
    of commits newer than the manifest read must not count; older ones still do."""
    url, _ = store_url
    store = Store.open(url)
    body = store.latest_manifest(A)
    body.update(seq=1, paths=[p for p in body["paths"] if p["task"] != "t:a"])
    store.put_bytes(store.manifest_path(A, 1), store.document(body))
    old = task_index.index_path(store, "t:a", A, 0)
    new = task_index.index_path(store, "t:a", A, 2)
    os.replace(old, new)
    system = Store.open(url).load()
    assert "t:a" in system.tasks and "t:a" not in {p.task for p in system.task_paths()}
    os.replace(new, old)
    with pytest.raises(StoreError, match="'t:a' has task indexes but no"):
        Store.open(url).load()
