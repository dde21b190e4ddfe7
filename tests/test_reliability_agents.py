"""The multiagent framework: agents sharing one store (evolution/agents.py).

Fast tests use a toy family and the store directly (the races, parent fallback, ownership);
slow tests run real tiny agents: heterogeneous agents in one ``memory://`` store in-process, and
three agent processes on a ``file://`` store at once for two cycles.
"""

import os
import subprocess
import sys
import time
import uuid

import jax
import numpy as np
import pytest

from mu2net.evolution import agents as ag
from mu2net.evolution.config import ConfigError, EvolutionConfig
from mu2net.evolution.mutations import ChildTarget, Lineage, MutationError, make_child
from mu2net.system.names import NameError_
from mu2net.system.state import Path, System
from mu2net.system.store import Store, StoreError
from mu2net.train.testing import FAMILY as MLP

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_GIN = os.path.join(REPO, "tests", "data", "tiny_vit.gin")
TOY = "toy"
NAMES = ["embed", "block", "head"]


def _p(rng):
    return {"kernel": rng.normal(size=(3, 3)).astype(np.float32)}


def _path(s, agent, task, comps, parent):
    return Path(s.new_id(agent, "p"), task, TOY, comps, {}, agent, parent=parent)


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ------------------------------------------------------------------------------ the races
def _race(url, store_cls):
    """B publishes block b1; A builds a path sharing b1; B drops b1 before A commits."""
    rng = np.random.default_rng(0)
    s = System()
    root = s.add_root("root:toy", TOY, {n: _p(rng) for n in NAMES}, {}, "root")
    s.add_task("t:a", "a")
    s.add_task("t:b", "b")
    store = store_cls.create(url, "race")
    store.commit(s, "root")
    store.commit(s, "a")
    b1 = s.new_component("block", TOY, _p(rng), "b")
    hb = s.new_component("head", TOY, _p(rng), "b")
    pb = _path(s, "b", "t:b", {**root.components, "block": b1.id, "head": hb.id}, root.id)
    s.publish(pb)
    store.commit(s, "b")
    # Agent A reloads and builds a child of B's path that shares b1.
    sa = store_cls.open(url).load()
    ha = sa.new_component("head", TOY, _p(rng), "a")
    pa = _path(sa, "a", "t:a", {**sa.paths[pb.id].components, "head": ha.id}, pb.id)
    sa.publish(pa)
    # Meanwhile agent B (which has not seen A's path) replaces its path: b1 is unused for B.
    sb = store_cls.open(url).load()
    sb.unlock_task("t:b", "b")
    b2 = sb.new_component("block", TOY, _p(rng), "b")
    pb2 = _path(sb, "b", "t:b", {**pb.components, "block": b2.id}, pb.id)
    sb.publish(pb2)
    store_cls.open(url).commit(sb, "b")
    store_cls.open(url).commit(sa, "a")  # A publishes a path that uses b1
    return b1


@pytest.mark.parametrize("store_cls", [Store])
def test_component_shared_across_agents_is_never_lost(tmp_path, store_cls):
    b1 = _race(str(tmp_path / "s"), store_cls)
    system = store_cls.open(str(tmp_path / "s")).load()
    system.validate()
    pa = system.best_path("t:a")
    assert pa.components["block"] == b1.id
    assert _same(system.params_of(pa)["block"], b1.params)  # bit-identical
    assert system.best_path("t:b").components["block"] != b1.id


def _mlp_system():
    hp4 = {**MLP.default_hparams(), "ds_image_size": 4, "_mu_": 0.0}
    s = System()
    root = s.add_root(
        "root:mlp", MLP.name, jax.device_get(MLP.init(jax.random.PRNGKey(0), hp4)), hp4, "root"
    )
    s.add_task("t:x", "x")
    hp8 = {**hp4, "ds_image_size": 8}
    params8 = jax.device_get(MLP.init(jax.random.PRNGKey(1), hp8))
    comps = {n: s.new_component(n, MLP.name, params8[n], "x").id for n in params8}
    # Its parent (an earlier path of t:x at 8 px) was replaced and is gone from the system.
    orphan = Path(s.new_id("x", "p"), "t:x", MLP.name, comps, hp8, "x", parent="x/p-gone")
    s.publish(orphan)
    return s, root, orphan


def _orphan_child(s, orphan, root):
    target = ChildTarget("t:x", 3, "x", {"ds_image_size": 4})
    return make_child(s, MLP, orphan, target, {}, np.random.default_rng(0), Lineage(s, {}, root))


def test_missing_parent_falls_back_to_the_root():
    s, root, orphan = _mlp_system()
    # Without a root to close the walk, dense_0 at 4 px has no source (and no fresh init).
    with pytest.raises(MutationError, match="dense_0"):
        _orphan_child(s, orphan, None)
    c = _orphan_child(s, orphan, root)
    assert c.actions["dense_0"] in ("share", "clone")
    src = c.path.components["dense_0"]
    got = c.frozen.get("dense_0", c.trainable.get("dense_0"))
    assert _same(got, s.component(root.components["dense_0"]).params)
    if c.actions["dense_0"] == "share":
        assert src == root.components["dense_0"]
    # dense_1 still comes from the live parent, never from the root.
    assert _same(c.frozen.get("dense_1", c.trainable.get("dense_1")), orphan_params(s, orphan))


def test_retired_parent_falls_back_to_the_nearest_live_ancestor():
    s, root, orphan = _mlp_system()
    hp4 = dict(root.hparams)
    s.add_task("t:y", "y")
    params = jax.device_get(MLP.init(jax.random.PRNGKey(7), hp4))
    comps = {n: s.new_component(n, MLP.name, params[n], "y").id for n in params}
    grand = Path(s.new_id("y", "p"), "t:y", MLP.name, comps, hp4, "y", parent=root.id)
    s.publish(grand)
    # The orphan's parent is gone; its recorded ancestry continues at the live grandparent.
    orphan.metrics["ancestry"] = ["x/p-gone", grand.id]
    c = _orphan_child(s, orphan, root)
    got = c.frozen.get("dense_0", c.trainable.get("dense_0"))
    assert _same(got, s.component(grand.components["dense_0"]).params)
    assert not _same(got, s.component(root.components["dense_0"]).params)
    assert c.path.metrics["ancestry"][:3] == [orphan.id, "x/p-gone", grand.id]


def orphan_params(s, orphan):
    return s.component(orphan.components["dense_1"]).params


def test_agent_definition_errors():
    with pytest.raises(NameError_, match="a/b"):
        ag.Agent("a/b", ("mu2net:digits",))
    with pytest.raises(ag.AgentError, match="at least one task"):
        ag.Agent("a", ())
    with pytest.raises(NameError_, match="bad/task"):
        ag.Agent("a", ("bad/task",))
    with pytest.raises(ConfigError, match="no_such_field"):
        ag.Agent("a", ("mu2net:digits",), overrides={"no_such_field": 1}).build_config()
    cfg = ag.Agent("a", ("t:x",), config=EvolutionConfig(seed=3), overrides={"batch_size": 8})
    assert (cfg.build_config().seed, cfg.build_config().batch_size) == (3, 8)


def test_a_task_belongs_to_the_agent_that_published_it(tmp_path):
    s, _, _ = _mlp_system()
    url = str(tmp_path / "s")
    store = Store.create(url, "own")
    store.commit(s, "root")
    store.commit(s, "x")
    with pytest.raises(ag.AgentError, match="'t:x' is evolved by agent 'x'"):
        ag.claim_tasks(Store.open(url), ag.Agent("y", ("t:x",)))
    assert ag.claim_tasks(Store.open(url), ag.Agent("x", ("t:x",))).best_path("t:x")


def test_agents_race_to_create_the_store_and_root(tmp_path):
    """Two agents on an empty store: one creates marker and root, the other reuses them."""
    url = f"file://{tmp_path}/s"
    cfg = EvolutionConfig(family=MLP.name, root_hparams={"ds_image_size": 4})
    first = ag.open_shared(url, cfg)
    second = ag.open_shared(url, cfg)
    roots = second.load().roots()
    assert len(roots) == 1 and roots[0].family == MLP.name
    assert first.load().roots()[0].id == roots[0].id


# ------------------------------------------------------------------------------ real agents
def _batch(path, n=8):
    size = int(path.hparams["ds_image_size"])
    return np.random.default_rng(0).uniform(-1, 1, size=(n, size, size, 3)).astype(np.float32)


def _predictions(system):
    from mu2net.serve import TaskPredictor

    out = {}
    for p in system.task_paths():
        predictor = TaskPredictor.from_system(system, p.task)
        out[p.task] = (p.id, predictor.predict(p.task, _batch(p))[1])
    return out


@pytest.mark.slow
def test_heterogeneous_agents_share_a_memory_store():
    """A ViT agent, an MLP agent and a ViT agent at another image size, one fsspec store."""
    url = f"memory://mu2net-agents-{uuid.uuid4().hex}"
    mlp_cfg = EvolutionConfig(
        family=MLP.name, root_hparams={"ds_image_size": 8, "hidden_dim": 16},
        defaults={"ds_image_size": 8, "ds_crop": False, "ds_flip_left_right": False},
        space="v2", batch_size=32, train_examples_between_validations=64, num_validations=1,
        validation_examples=64, candidates_per_generation=1, samples_per_task_iteration=2,
    )  # fmt: skip
    vit8 = ag.Agent("vit8", ("mu2net:lfw_faces",), gin_files=(TINY_GIN,))
    mlp = ag.Agent("mlp", ("mu2net:digits_pair_01",), config=mlp_cfg)
    vit16 = ag.Agent(
        "vit16", ("mu2net:digits_parity",), gin_files=(TINY_GIN,),
        overrides={"defaults": {"ds_image_size": 16, "ds_crop": False, "opt_lr": 0.05}},
    )  # fmt: skip
    quiet = dict(log=lambda s: None)
    ag.run_agent(url, vit8, 1, **quiet)
    store = Store.open(url)
    before = _predictions(store.load())
    ag.run_agent(url, mlp, 1, **quiet)
    ag.run_agent(url, vit16, 1, **quiet)

    store = Store.open(url)
    system = store.load()
    system.validate()
    assert sorted(r.family for r in system.roots()) == ["test_mlp", "vit"]
    fam = {p.task: p.family for p in system.task_paths()}
    assert fam == {"mu2net:lfw_faces": "vit", "mu2net:digits_pair_01": "test_mlp",
                   "mu2net:digits_parity": "vit"}  # fmt: skip
    # The first agent's predictions are bit-identical after the others ran.
    after = _predictions(system)
    assert after["mu2net:lfw_faces"][0] == before["mu2net:lfw_faces"][0]
    np.testing.assert_array_equal(after["mu2net:lfw_faces"][1], before["mu2net:lfw_faces"][1])
    # Parents come from the agent's own family only; the 16 px agent reused the 8 px ViT work.
    paths_by_id = {p.id: p for p in system.paths.values()}
    history = store.history()
    cands = [h for h in history if "parent" in h and "improved" in h]
    for h in cands:
        want = "test_mlp" if h["task"] == "mu2net:digits_pair_01" else "vit"
        parent = paths_by_id.get(h["parent"])
        assert parent is None or parent.family == want, h
    # A child of an 8 px ViT path (the root or lfw's) gets its position embedding interpolated.
    v16 = [
        h for h in cands if h["task"] == "mu2net:digits_parity" and h["parent_task"] != h["task"]
    ]
    assert v16 and all(h["actions"].get("posembed_input") == "adapt" for h in v16)
    p16 = system.best_path("mu2net:digits_parity")
    vit_ids = {c for p in system.paths.values() if p.family == "vit" and p.task != p16.task
               for c in p.components.values()}  # fmt: skip
    assert set(p16.components.values()) & vit_ids, "nothing of the shared ViT work was reused"
    # Every agent's commit records what it saw: the later agents saw the earlier ones' paths.
    views = {h["agent"]: h for h in history if h.get("event") == "agent_view"}
    assert views["vit16"]["seen"]["mu2net:lfw_faces"]["agent"] == "vit8"
    assert views["vit16"]["seen"]["mu2net:digits_pair_01"]["agent"] == "mlp"
    for agent in ("vit8", "mlp", "vit16"):
        assert all(cid.startswith(agent + "/") for cid in
                   store.latest_manifest(agent)["components"])  # fmt: skip


CONC_TASKS = {
    "a0": "mu2net:lfw_faces",
    "a1": "mu2net:digits_pair_01",
    "a2": "mu2net:digits_pair_23",
}


def _observe(url):
    store = Store.open(url)
    system = store.load()
    system.validate()
    return system, _predictions(system)


@pytest.mark.slow
def test_three_agent_processes_share_one_store(tmp_path):
    url = f"file://{tmp_path}/store"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONUNBUFFERED": "1"}  # fmt: skip
    procs = {
        a: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mu2net.evolution.agents",
                f"--gin_file={TINY_GIN}",
                f"--store={url}",
                f"--agent={a}",
                f"--tasks={t}",
                "--cycles=2",
                "--no_progress",
                "--logdir=",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for a, t in CONC_TASKS.items()
    }
    # Poll the store while the agents write: it always loads and validates, and a task's
    # predictions change only when its own agent commits a new iteration.
    seen: dict[str, dict[str, np.ndarray]] = {}
    observations = 0
    deadline = time.time() + 900
    while any(p.poll() is None for p in procs.values()):
        assert time.time() < deadline, "agents did not finish"
        if os.path.exists(f"{tmp_path}/store/mu2net-store.json"):
            try:
                system, preds = _observe(url)
            except StoreError as e:
                if "marker missing" in str(e) or "not a mu2net store" in str(e):
                    continue
                raise
            observations += 1
            for task, (pid, probs) in preds.items():
                if pid in seen.setdefault(task, {}):
                    np.testing.assert_array_equal(seen[task][pid], probs, err_msg=task)
                seen[task][pid] = probs
        time.sleep(1.0)
    logs = {a: p.stdout.read() for a, p in procs.items()}
    for a, p in procs.items():
        assert p.returncode == 0, f"agent {a} failed:\n{logs[a][-3000:]}"

    store = Store.open(url)
    system, preds = _observe(url)
    assert sorted(system.tasks) == sorted(CONC_TASKS.values())
    for a, task in CONC_TASKS.items():
        best = system.best_path(task)
        assert best.agent == a and best.metrics["task_iterations"] == 2  # no lost update
        np.testing.assert_array_equal(seen[task][best.id], preds[task][1])
        # Each agent committed exactly its two iterations, in order, into its own shard only.
        seqs = store.manifest_seqs(a)  # commits after improving generations, then each end
        assert seqs == list(range(len(seqs))) and len(seqs) >= 2
    ids = {}
    for shard in store.shards():
        for seq in store.manifest_seqs(shard):
            for cid, rec in store.read_manifest(shard, seq)["components"].items():
                assert cid.startswith(shard + "/"), (shard, cid)
                assert ids.setdefault(cid, rec["file"]) == rec["file"], f"id {cid} reused"
    files = [f"{cid.split('/')[0]}/{f}" for cid, f in ids.items()]
    assert len(files) == len(set(files))
    # Visibility: an agent's second iteration saw every iteration the others had committed
    # (at least one second before its reload); and agents did see each other's paths.
    commits = []
    for a in CONC_TASKS:
        for seq in store.manifest_seqs(a):
            body = store.read_manifest(a, seq)
            commits.append((body["created"], a, body["note"]))
    views = [h for h in store.history() if h.get("event") == "agent_view"]
    assert len(views) >= 6  # one per commit: each task iteration, and each improving generation
    cross = 0
    for v in views:
        for created, a, _ in commits:
            if a != v["agent"] and created < v["reloaded"] - 1.0:
                assert CONC_TASKS[a] in v["seen"], (v, a)
        cross += sum(1 for t in v["seen"].values() if t["agent"] != v["agent"])
    assert cross > 0, "no agent ever saw another agent's path"
    assert observations > 0


def test_open_shared_raises_store_errors_other_than_races(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    cfg = EvolutionConfig(family=MLP.name, root_hparams={"ds_image_size": 4})
    with pytest.raises(StoreError, match="not empty"):
        ag.open_shared(str(foreign), cfg, retries=2)
    url = str(tmp_path / "s")
    ag.open_shared(url, cfg)
    manifest = next((tmp_path / "s" / "shards").rglob("manifest-*.json"))
    manifest.write_text("{")
    t0 = time.time()
    with pytest.raises(StoreError, match=manifest.name):
        ag.open_shared(url, cfg)
    assert time.time() - t0 < 5  # no retries on a broken store
