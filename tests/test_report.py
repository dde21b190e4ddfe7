"""The HTML report, on a small system built without training (numpy params, written history)."""

import os
import re

import numpy as np
import pytest

from mu2net.evolution.report import GRAPH_PNG, HISTORY_PNG, QUALITY_PNG, write_report
from mu2net.system.state import Path, System
from mu2net.system.store import Store

TASK_A, TASK_B = "mu2net:alpha", "mu2net:beta"
AGENT_A, AGENT_B, ROOT_AGENT = "mu2net~alpha", "mu2net~beta", "root~test_mlp"
ROOT_HP = {
    "num_classes": 3,
    "hidden_dim": 16,
    "ds_image_size": 4,
    "num_layers": 2,
    "adapter_layers": "",
    "opt_lr": 0.01,
}


def _params(rng, d_in=48, h=16, c=3):
    """test_mlp-shaped params (see mu2net/train/testing.py), non-zero head."""
    f32 = np.float32
    return {
        "dense_0": {"kernel": rng.normal(size=(d_in, h)).astype(f32), "bias": np.zeros(h, f32)},
        "dense_1": {"kernel": rng.normal(size=(h, h)).astype(f32), "bias": np.zeros(h, f32)},
        "head": {"kernel": rng.normal(size=(h, c)).astype(f32), "bias": np.zeros(c, f32)},
    }


def _record(
    task,
    path,
    parent,
    parent_task,
    agent,
    quality,
    mutations,
    iteration=0,
    gen=0,
    improved=True,
    t=0.0,
):
    """A history record shaped like evolution/loop.py's ``_train_child`` writes."""
    return {
        "task": task,
        "path": path,
        "parent": parent,
        "parent_task": parent_task,
        "agent": agent,
        "mutations": mutations,
        "actions": {},
        "hparams": {},
        "trainable_params": 100,
        "quality": quality,
        "score": quality,
        "evals": [[1.0, quality]],
        "improved": improved,
        "failed": False,
        "failure": None,
        "timings": {"total_s": 0.1},
        "num_compiles": 1,
        "time": t,
        "generation": gen,
        "iteration": iteration,
        "ds_mutations": {},
    }


def build_store(url, seed=0):
    """A store with a test_mlp root and two tasks sharing components, plus their history.

    ``alpha``: root dense_0, own dense_1 and head (lineage root -> p_a0 -> p_a1 = best).
    ``beta``: root dense_0, alpha's dense_1 (shared by 2 tasks), own head; parent = alpha's best.
    Returns (store, system, info) where info holds the numbers the report must show.
    """
    rng = np.random.default_rng(seed)
    store = Store.create(url, "tiny")
    system = System()
    root = system.add_root("root:test_mlp", "test_mlp", _params(rng), ROOT_HP, ROOT_AGENT)
    store.commit(system, ROOT_AGENT, note="root")

    own = _params(rng)
    system.add_task(TASK_A, AGENT_A)
    a0 = system.new_id(AGENT_A, "p")  # an ancestor only the history knows
    d1 = system.new_component(
        "dense_1", "test_mlp", own["dense_1"], AGENT_A, lineage=root.components["dense_1"]
    )
    ha = system.new_component("head", "test_mlp", own["head"], AGENT_A)
    hp_a = {**ROOT_HP, "opt_lr": 0.02}
    best_a = Path(
        system.new_id(AGENT_A, "p"),
        TASK_A,
        "test_mlp",
        {"dense_0": root.components["dense_0"], "dense_1": d1.id, "head": ha.id},
        hp_a,
        AGENT_A,
        parent=a0,
        metrics={
            "quality": 0.8125,
            "test_quality": 0.7731,
            "task_iterations": 2,
            "class_names": ["x", "y", "z"],
            "generation": 2,
        },
    )
    system.publish(best_a)
    hist_a = [
        _record(
            TASK_A,
            a0,
            root.id,
            root.task,
            AGENT_A,
            0.5,
            {"opt_lr": [0.01, 0.015], "components": {"dense_1": "clone", "head": "fresh"}},
        ),
        _record(
            TASK_A,
            "mu2net~alpha/p9",
            root.id,
            root.task,
            AGENT_A,
            0.25,
            {},
            gen=0,
            improved=False,
            t=1.0,
        ),
        {"event": "task_iteration", "task": TASK_A, "iteration": 0, "best": a0},
        _record(
            TASK_A,
            best_a.id,
            a0,
            TASK_A,
            AGENT_A,
            0.8125,
            {"opt_lr": [0.015, 0.02], "components": {"dense_1": "clone"}},
            iteration=1,
            t=2.0,
        ),
        {"event": "task_iteration", "task": TASK_A, "iteration": 1, "best": best_a.id},
    ]
    store.commit(system, AGENT_A, history=hist_a)

    system.add_task(TASK_B, AGENT_B)
    hb = system.new_component("head", "test_mlp", _params(rng)["head"], AGENT_B)
    best_b = Path(
        system.new_id(AGENT_B, "p"),
        TASK_B,
        "test_mlp",
        {"dense_0": root.components["dense_0"], "dense_1": d1.id, "head": hb.id},
        dict(ROOT_HP),
        AGENT_B,
        parent=best_a.id,
        metrics={"quality": 0.6875, "test_quality": 0.6543, "task_iterations": 1},
    )
    system.publish(best_b)
    hist_b = [
        _record(
            TASK_B,
            best_b.id,
            best_a.id,
            TASK_A,
            AGENT_B,
            0.6875,
            {"components": {"head": "fresh"}},
            t=3.0,
        ),
        {"event": "task_iteration", "task": TASK_B, "iteration": 0, "best": best_b.id},
    ]
    store.commit(system, AGENT_B, history=hist_b)
    loaded = store.load()
    info = {
        "root": root,
        "a": best_a,
        "b": best_b,
        "a0": a0,
        "shared_dense_1": d1.id,
        "accounted_a": loaded.accounted_params(loaded.best_path(TASK_A)),
        "path_params_a": loaded.path_params(loaded.best_path(TASK_A)),
    }
    return store, loaded, info


@pytest.fixture()
def tiny(tmp_path):
    return build_store(str(tmp_path / "store"))


def test_report_files_and_numbers(tiny, tmp_path):
    store, system, info = tiny
    out = write_report(store, str(tmp_path / "report"))
    assert out == str(tmp_path / "report" / "index.html")
    text = open(out, encoding="utf-8").read()
    srcs = re.findall(r"<img src='([^']+)'", text)
    assert sorted(srcs) == sorted([GRAPH_PNG, QUALITY_PNG, HISTORY_PNG])
    for src in srcs:
        assert not os.path.isabs(src)
        with open(os.path.join(os.path.dirname(out), src), "rb") as f:
            data = f.read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, src

    # accounted params: dense_0 (root's) and dense_1 (alpha's) are halved between alpha and
    # beta (the root's lock is no sharer, reference §1.3); the head is alpha's own.
    expected = (48 * 16 + 16) / 2 + (16 * 16 + 16) / 2 + (16 * 3 + 3)
    assert info["accounted_a"] == expected
    for needle in [
        "0.8125",
        "0.7731",
        "0.6875",
        "0.6543",
        f"{expected:,.0f}",
        f"{info['path_params_a']:,}",
        info["a"].id,
        info["b"].id,
    ]:
        assert needle in text, needle
    # summary rows: alpha shares dense_0 (root) and dense_1 (beta) -> 2/3 shared components
    row_a = re.search(r"<tr><td>mu2net:alpha</td>.*?</tr>", text).group(0)
    assert "2/3" in row_a and "0.8125" in row_a
    # the shared-components table lists alpha's dense_1 as used by both tasks
    assert re.search(
        rf"{re.escape(info['shared_dense_1'])}</td><td>dense_1</td>"
        r"<td class='n'>272</td><td>mu2net:alpha, mu2net:beta</td>",
        text,
    )


def test_report_lineage_and_hparams(tiny, tmp_path):
    store, _, info = tiny
    text = open(write_report(store, str(tmp_path / "r")), encoding="utf-8").read()
    section_a = text.split("<h2>Task mu2net:alpha</h2>")[1].split("<h2>Task")[0]
    # hparams of the best path, the changed one highlighted against the root
    assert "<td>opt_lr</td><td><span class='diff'>0.02</span></td><td>0.01</td>" in section_a
    # lineage: best (it 1) -> a0 (it 0) -> root, with each ancestor's mutations
    lineage = section_a.split("Lineage")[1]
    ids = re.findall(r"<tr><td>([^<]+)</td>", lineage)
    assert ids == [info["a"].id, info["a0"], info["root"].id]
    assert "<td>opt_lr: 0.015 → 0.02; components: dense_1=clone</td>" in lineage
    assert "<td>opt_lr: 0.01 → 0.015; components: dense_1=clone, head=fresh</td>" in lineage
    # beta's lineage crosses into alpha's history (its parent is alpha's best path)
    section_b = text.split("<h2>Task mu2net:beta</h2>")[1]
    ids_b = re.findall(r"<tr><td>([^<]+)</td><td>mu2net:", section_b.split("Lineage")[1])
    assert ids_b == [info["b"].id, info["a"].id, info["a0"]]


def test_report_of_root_only_store(tmp_path):
    store = Store.create(str(tmp_path / "s"), "empty")
    system = System()
    system.add_root(
        "root:test_mlp", "test_mlp", _params(np.random.default_rng(0)), ROOT_HP, ROOT_AGENT
    )
    store.commit(system, ROOT_AGENT)
    text = open(write_report(store, str(tmp_path / "r")), encoding="utf-8").read()
    assert re.findall(r"<img src='([^']+)'", text) == [GRAPH_PNG]
    assert "0 task(s), 1 root(s), 3 components" in text
    assert not os.path.exists(tmp_path / "r" / HISTORY_PNG)


def test_report_imports_neither_tensorflow_nor_seqio(tiny, tmp_path):
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from mu2net.system.store import Store\n"
        "from mu2net.evolution.report import write_report\n"
        f"write_report(Store.open({str(tiny[0].url)!r}), {str(tmp_path / 'r')!r})\n"
        "bad = [m for m in ('tensorflow', 'seqio') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert os.path.exists(tmp_path / "r" / "index.html")
