"""Multipath agents (µ4Net, reference §7.3): the composite model, the strategy, composite paths.

One small store serves most tests: the tiny ViT root, tasks A and B each with a hand-made
single-path model (the root's blocks, a random head; no training), then one multipath task
iteration of B (path_0 = B's path, path_1 = A's, headless). B's single path records quality 0,
so the first multipath child that learns anything is published and every composite-path
mechanism (locks, index, store, serving) is exercised.
"""

import dataclasses
import shutil

import jax
import numpy as np
import pytest
from test_evolution_system import tiny_config

from mu2net.evolution import data as evo_data
from mu2net.evolution.config import ConfigError
from mu2net.evolution.live import add_tasks_to_store
from mu2net.evolution.loop import Evolver
from mu2net.evolution.main import open_or_create
from mu2net.evolution.multipath import MultipathStrategy, main_path
from mu2net.evolution.prefix import ActivationMemo, PrefixCache
from mu2net.evolution.report import subpath_edges, write_report
from mu2net.evolution.roots import class_root
from mu2net.evolution.runner import PROGRESS_KEY, TaskIterationRunner
from mu2net.evolution.search import Mu2NetStrategy
from mu2net.evolution.strategy import IterationContext, register_strategy
from mu2net.models import get_family
from mu2net.models.multipath import (
    MAIN_SLOT,
    ROUTER,
    SUBPATHS_KEY,
    MultipathError,
    SubPath,
    check_compatible,
    encode_subpaths,
    multipath_family,
    router_weights,
)
from mu2net.serve import TaskPredictor
from mu2net.system.names import agent_for_task
from mu2net.system.state import Path, StateError
from mu2net.system.store import Store
from mu2net.system.verify import verify_store
from mu2net.train.batching import eval_batches
from mu2net.train.trainer import evaluate, predict_logits

A, B = "mu2net:lfw_faces", "mu2net:digits"


def _config(**overrides):
    base = dict(
        train_examples_between_validations=96,
        num_validations=2,
        validation_examples=64,
        space="none",
        strict_improvement=True,
    )
    return tiny_config(**{**base, **overrides})


def _single_path(system, root, task, num_classes, seed):
    """Task's path: the root's components and a random (untrained) head."""
    agent = agent_for_task(task)
    system.add_task(task, agent)
    hidden = system.component(root.components["head"]).params["kernel"].shape[0]
    rng = np.random.default_rng(seed)
    head = system.new_component(
        "head",
        root.family,
        {"kernel": rng.normal(0, 1, (hidden, num_classes)).astype(np.float32),
         "bias": np.zeros((num_classes,), np.float32)},
        agent,
    )  # fmt: skip
    comps = {**root.components, "head": head.id}
    path = Path(
        system.new_id(agent, "p"), task, root.family, comps,
        {**root.hparams, "num_classes": num_classes}, agent, parent=root.id,
    )  # fmt: skip
    system.publish(path)
    return agent


def _seed_store(url, cfg):
    store = open_or_create(url, cfg)
    system = store.load()
    root = class_root(system, cfg)
    for task, classes, seed in ((A, 2, 0), (B, 10, 1)):
        agent = _single_path(system, root, task, classes, seed)
        settings = {"split": "validation", "examples": cfg.validation_examples}
        system.best_path(task).metrics.update(
            quality=0.0, validation={**settings, "batch_size": cfg.batch_size}
        )
        store.commit(system, agent)
    add_tasks_to_store(store, [A, B], validate=False)
    return store


def _predictions(system, path, split="test"):
    family = get_family(path.family)
    arrays = evo_data.eval_arrays(path.task, split, family, path.hparams)
    _, preds = evaluate(family, path.hparams, system.params_of(path), eval_batches(arrays, 64))
    return np.asarray(preds)


def _params(system, path):
    return {n: jax.tree_util.tree_leaves(c.params) for n, c in system.path_components(path).items()}


@pytest.fixture(scope="module")
def evolved(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("multipath") / "sys")
    cfg = _config()
    store = _seed_store(url, cfg)
    before = store.load()
    snapshot = {
        t: (before.best_path(t).to_json(), _params(before, before.best_path(t)),
            _predictions(before, before.best_path(t)))
        for t in (A, B)
    }  # fmt: skip
    # Two generations of one child: the second reuses the first's sub-path activations.
    mcfg = dataclasses.replace(cfg, strategy="multipath", candidates_per_generation=1)
    summaries = Evolver(store, mcfg, progress=False, log=lambda s: None, tasks=[B]).run()
    return url, cfg, snapshot, summaries


def test_multipath_path_is_published_and_composite(evolved):
    url, _, snapshot, summaries = evolved
    system = Store.open(url).load()
    best = system.best_path(B)
    assert summaries[0]["strategy"] == "multipath" and best.is_composite
    assert best.family == "multipath:vit"
    assert [s.task for s in best.subpaths] == [B, A]
    assert best.subpaths[0].path == snapshot[B][0]["id"]
    assert set(best.components) >= {ROUTER, "head_adapter_path_1", "path_0/head"}
    assert "path_1/head" not in best.components  # other tasks' paths run headless
    system.validate()
    # Only the router and connectors trained: a small fraction of what is activated.
    record = next(h for h in Store.open(url).history() if h.get("path") == best.id)
    assert record["trainable_params"] == 42 + 330
    assert record["trainable_params"] < 0.01 * system.path_params(best)
    # The sub-paths' outputs were computed once per example (prefix cache and memo): the
    # iteration paid for fewer rows than its generations used, and the head costs ~nothing.
    rows = [h for h in Store.open(url).history() if h.get("task") == B and "prefix" in h]
    assert rows and sum(h["prefix"]["rows_reused"] for h in rows) > 0
    prefix = sum(h["flops"]["prefix"] for h in rows)
    assert 0 < prefix < sum(h["prefix"]["flops_without_memo"] for h in rows)
    assert record["flops"]["train"] < 1e-3 * prefix


def test_prefix_cache_runs_each_sub_path_as_its_own_part(evolved):
    url = evolved[0]
    system = Store.open(url).load()
    best = system.best_path(B)
    family = get_family(best.family)
    params = system.params_of(best)
    frozen = {n: params[n] for n in family.frozen_names(best.hparams)}
    x = evo_data.eval_arrays(B, "test", family, best.hparams)["inputs"][:16]
    batches = [{"inputs": x[:8]}, {"inputs": x[8:]}]
    memo = ActivationMemo()
    cache = PrefixCache(family, batches[:1], batches[1:], memo)
    train, val = cache.features(best.hparams, frozen, ("ids",), 1)
    direct = np.asarray(family.apply_stages(frozen, x, best.hparams, 0, 1))
    np.testing.assert_allclose(np.concatenate([train[0]["inputs"], val[0]["inputs"]]), direct,
                               atol=1e-5)  # fmt: skip
    assert cache.rows_computed == 2 * 16  # two parts (path_0, path_1), 16 examples each
    # The same sub-paths under other ids (another composite path): every row is reused.
    again = PrefixCache(family, batches[1:], batches[:1], memo)
    again.features(best.hparams, frozen, ("other", "ids"), 1)
    assert (again.rows_computed, again.rows_reused, again.flops) == (0, 32, 0.0)


def test_at_init_predictions_equal_path0(evolved):
    url, _, snapshot, _ = evolved
    system = Store.open(url).load()
    best = system.best_path(B)
    family = get_family(best.family)
    params = {**system.params_of(best), **family.init_own(best.hparams)}
    arrays = evo_data.eval_arrays(B, "test", family, best.hparams)
    _, preds = evaluate(family, best.hparams, params, eval_batches(arrays, 64))
    np.testing.assert_array_equal(np.asarray(preds), snapshot[B][2])


def test_router_weights_are_per_example_and_sum_to_one(evolved):
    url = evolved[0]
    system = Store.open(url).load()
    best = system.best_path(B)
    path0 = best.subpath(MAIN_SLOT)
    arrays = evo_data.eval_arrays(B, "test", get_family(path0.family), path0.hparams)
    logits0 = predict_logits(
        get_family(path0.family), path0.hparams, system.params_of(path0), arrays["inputs"]
    )
    router = system.component(best.components[ROUTER]).params
    w = np.asarray(router_weights(router, logits0))
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=0, atol=1e-6)
    assert np.ptp(w[:, 0]) > 0  # the weights depend on the example
    assert w.shape == (len(logits0), 2)


def test_immunity_sub_path_tasks_are_bit_identical(evolved):
    url, _, snapshot, _ = evolved
    system = Store.open(url).load()
    a = system.best_path(A)
    assert a.to_json() == snapshot[A][0]
    after = _params(system, a)
    assert after.keys() == snapshot[A][1].keys()
    for name, leaves in snapshot[A][1].items():
        for x, y in zip(leaves, after[name], strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    np.testing.assert_array_equal(_predictions(system, a), snapshot[A][2])
    # B's single path lives on as path_0, its params unchanged.
    path0 = system.best_path(B).subpath(MAIN_SLOT)
    for name, leaves in snapshot[B][1].items():
        for x, y in zip(leaves, _params(system, path0)[name], strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sub_path_components_stay_locked_and_kept(evolved):
    url = evolved[0]
    system = Store.open(url).load()
    a, best = system.best_path(A), system.best_path(B)
    used = {cid for n, cid in best.components.items() if n.startswith("path_1/")}
    assert used and all(B in system.component(cid).locks for cid in used)
    with pytest.raises(StateError, match="committed or locked"):
        system.discard_components(sorted(used)[:1])
    # Unpublishing A's path (as a new best of A would) keeps what the composite path uses.
    system.unpublish(a)
    system.drop_unpublished_except(set())
    assert used <= set(system.components)
    assert all(not system.is_trainable(cid, a.agent) for cid in used)
    system.validate()


def test_store_round_trip_index_loading_verify_and_serving(evolved):
    url = evolved[0]
    store = Store.open(url)
    full = store.load()
    best = full.best_path(B)
    one = store.load_task(B)
    # The task's index lists its own and its sub-paths' components, and nothing else.
    assert set(one.components) == set(best.components.values())
    assert not any(c.loaded for c in one.components.values())  # lazy
    report = verify_store(store)
    assert report.ok, [str(f) for f in report.faults]
    predictor = TaskPredictor.load(url, B)
    arrays = evo_data.eval_arrays(B, "test", get_family(best.family), best.hparams)
    labels, _ = predictor.predict(B, arrays["inputs"][:40])
    np.testing.assert_array_equal(labels, _predictions(full, best)[:40])


def test_report_lists_sub_path_edges(evolved, tmp_path):
    store = Store.open(evolved[0])
    system = store.load()
    best = system.best_path(B)
    edges = subpath_edges(system)
    assert {(e["path"], e["slot"], e["task"]) for e in edges} == {
        (best.id, "path_0", B),
        (best.id, "path_1", A),
    }
    page = open(write_report(store, str(tmp_path / "r"))).read()
    assert "Multipath sub-paths" in page and best.subpaths[1].path in page


def _errors_leave_store_unchanged(url, cfg, task, match, edit=None):
    store = Store.open(url)
    seqs = {a: store.manifest_seqs(a) for a in store.shards()}
    system = store.load()
    if edit is not None:
        edit(system)
    commits = []
    runner = TaskIterationRunner(
        cfg, MultipathStrategy(), commit=lambda *a: commits.append(a), log=lambda s: None
    )
    with pytest.raises(MultipathError, match=match):
        runner.run(system, task, 5, agent_for_task(task))
    assert not commits
    assert {a: store.manifest_seqs(a) for a in store.shards()} == seqs


def test_bad_inputs_error_and_commit_nothing(evolved, tmp_path):
    url, cfg = evolved[0], evolved[1]
    copy = str(tmp_path / "s")
    shutil.copytree(url, copy)
    mcfg = dataclasses.replace(cfg, strategy="multipath")
    # A task with no published single-path model.
    _errors_leave_store_unchanged(
        copy, mcfg, A, "no published single-path model",
        edit=lambda s: s.unpublish(s.best_path(A)),
    )  # fmt: skip
    # num_paths larger than the paths available (one other task).
    three = dataclasses.replace(mcfg, defaults={**mcfg.defaults, "num_paths": 3})
    _errors_leave_store_unchanged(copy, three, A, r"num_paths=3 needs 2 .* there are 1")


def test_single_path_agent_refuses_a_multipath_task(evolved):
    url, cfg = evolved[0], evolved[1]
    system = Store.open(url).load()
    runner = TaskIterationRunner(cfg, Mu2NetStrategy(), commit=None, log=lambda s: None)
    with pytest.raises(ConfigError, match="agent class 'multipath:vit'"):
        runner.run(system, B, 1, agent_for_task(B))


def test_incompatible_modality_is_refused():
    vit = SubPath(MAIN_SLOT, "x/p0", B, "vit", {"ds_image_size": 16, "num_classes": 10}, "x")
    text = SubPath("path_1", "y/p0", "t", "bert", {"ds_max_length": 16, "num_classes": 2}, "y")
    with pytest.raises(MultipathError, match="takes text inputs"):
        check_compatible(vit, text)
    family = multipath_family("vit")
    hp = {SUBPATHS_KEY: encode_subpaths([vit, text]), "num_paths": 2, "num_classes": 10}
    with pytest.raises(MultipathError, match="y/p0"):
        family.validate_hparams(hp)


class _Killed(Exception):
    pass


class KilledMultipath(MultipathStrategy):
    name = "test_killed_multipath"

    def propose(self, ctx, gen, n):
        if gen.index == 1:
            raise _Killed  # as if the process died here
        return super().propose(ctx, gen, n)


register_strategy("test_killed_multipath", KilledMultipath)


def test_killed_multipath_iteration_resumes(tmp_path):
    cfg = _config(samples_per_task_iteration=4, num_validations=1)
    store = _seed_store(str(tmp_path / "s"), cfg)
    killed = dataclasses.replace(cfg, strategy="test_killed_multipath")
    with pytest.raises(_Killed):
        Evolver(store, killed, progress=False, log=lambda s: None, tasks=[B]).run()
    kept = store.load().best_path(B)
    assert kept.is_composite and kept.metrics[PROGRESS_KEY]["generation"] == 0
    # Resumed with other validation settings: the composite best is re-validated first.
    mcfg = dataclasses.replace(cfg, strategy="multipath", validation_examples=48)
    lines = []
    Evolver(store, mcfg, progress=False, log=lines.append, tasks=[B]).run()
    assert any("re-validated" in line and kept.id in line for line in lines)
    done = store.load().best_path(B)
    assert done.is_composite and done.metrics["task_iterations"] == 1
    gens = [h["generation"] for h in store.history() if h.get("task") == B and "parent" in h]
    assert sorted(gens) == [0, 0, 1, 1]  # generation 0 was not trained again
    assert main_path(store.load(), B).id == kept.subpaths[0].path


@pytest.mark.parametrize("by_decay", [False, True])
def test_prune_keeps_best_then_decay_survivors(by_decay):
    cfg = _config(max_population=2, prune_by_decay=by_decay)
    paths = [
        Path(f"x/p{i}", B, "vit", {}, {}, "x", metrics={"quality": 1.0 - 0.1 * i}) for i in range(5)
    ]
    # Every path but the worst already has many children: the decay rule passes over them.
    offspring = {p.id: 10 for p in paths[:-1]}
    ctx = IterationContext(
        task=B, iteration=0, agent="x", info=None, system=None, family=None, config=cfg,
        space={}, defaults={}, root=None, population=list(paths), seeds=[],
        offspring=offspring, lineage=None, score=lambda p, q=None: p.metrics["quality"],
    )  # fmt: skip
    runner = TaskIterationRunner(cfg, MultipathStrategy(), log=lambda s: None)
    runner.prune(ctx, np.random.default_rng(0))
    want = ["x/p0", "x/p4"] if by_decay else ["x/p0", "x/p1"]
    assert [p.id for p in ctx.population] == want
