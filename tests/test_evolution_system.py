"""Invariants of the evolution layer on real bundled tasks with a tiny random ViT root.

Immunity (bit-identical params and predictions of earlier tasks), determinism, quality above
the linear probe, and a task added to a running continuous service.
"""

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from mu2net.evolution.baselines import run_baseline
from mu2net.evolution.config import EvolutionConfig
from mu2net.evolution.evaluation import evaluate_path
from mu2net.evolution.live import add_tasks_to_store
from mu2net.evolution.loop import Evolver
from mu2net.evolution.main import open_or_create
from mu2net.system.store import Store

TASKS = ["mu2net:lfw_faces", "mu2net:digits", "mu2net:mnist5k_ge5"]


def tiny_config(**overrides):
    base = dict(
        family="vit",
        root_hparams={"vit_size": "test", "num_layers": 2, "ds_image_size": 16},
        defaults={
            "_mu_": 0.3,
            "opt_lr": 0.05,
            "ds_image_size": 16,
            "ds_crop": False,
            "ds_flip_left_right": False,
            "opt_lr_warmup_ratio": 0.05,
        },
        space="v2",
        batch_size=32,
        train_examples_between_validations=320,
        num_validations=2,
        validation_examples=128,
        candidates_per_generation=2,
        samples_per_task_iteration=2,
        num_cycles=1,
        seed=0,
    )
    base.update(overrides)
    return EvolutionConfig(**base)


def _snapshot(system, task):
    path = system.best_path(task)
    params = {
        n: {k: np.array(v) for k, v in _leaves(c.params)}
        for n, c in system.path_components(path).items()
    }
    return path.to_json(), params


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, f"{prefix}/{k}")
    else:
        yield prefix, tree


def _assert_same(snap_a, snap_b):
    rec_a, params_a = snap_a
    rec_b, params_b = snap_b
    assert rec_a["components"] == rec_b["components"]
    for n in params_a:
        for k in params_a[n]:
            assert params_a[n][k].tobytes() == params_b[n][k].tobytes(), (n, k)


@pytest.fixture(scope="module")
def evolved(tmp_path_factory):
    """One system grown task by task, with snapshots taken after each addition."""
    url = str(tmp_path_factory.mktemp("evo") / "sys")
    cfg = tiny_config()
    store = open_or_create(url, cfg)
    snapshots, predictions = [], []
    for task in TASKS:
        add_tasks_to_store(store, [task])
        Evolver(store, cfg, progress=False, logdir=url + "_tb").run()
        system = store.load()
        snapshots.append({t: _snapshot(system, t) for t in TASKS[: len(snapshots) + 1]})
        predictions.append({t: evaluate_path(system, t)[1] for t in TASKS[: len(snapshots)]})
    return url, cfg, snapshots, predictions


def test_immunity_earlier_tasks_bit_identical(evolved):
    url, cfg, snapshots, predictions = evolved
    final = snapshots[-1]
    for i, snap in enumerate(snapshots[:-1]):
        for task, s in snap.items():
            _assert_same(s, final[task])
            assert np.array_equal(predictions[i][task], predictions[-1][task]), task
    # Later tasks did reuse earlier work: some component is shared across tasks.
    system = Store.open(url).load()
    locks = [c.locks for c in system.components.values()]
    assert any(len({lk for lk in lk_set if not lk.startswith("@root/")}) > 1 for lk_set in locks)


def test_history_records_every_decision(evolved):
    url, *_ = evolved
    history = Store.open(url).history()
    cands = [h for h in history if "parent" in h]
    assert len(cands) == len(TASKS) * 2
    for h in cands:
        assert {"mutations", "hparams", "quality", "evals", "timings", "trainable_params"} <= set(h)
    assert sum(h.get("event") == "task_iteration" for h in history) == len(TASKS)


def test_tensorboard_scalars_per_task(evolved):
    import glob

    import tensorflow as tf

    url, *_ = evolved
    tags = set()
    for f in glob.glob(url + "_tb/**/events.out.tfevents.*", recursive=True):
        for event in tf.compat.v1.train.summary_iterator(f):
            tags.update(v.tag for v in event.summary.value)
    for task in TASKS:
        for name in ("best_score_per_generation", "accounted_params", "candidates_per_second"):
            assert f"{task}/{name}" in tags


def test_beats_linear_probe_on_most_tasks(evolved):
    url, cfg, *_ = evolved
    system = Store.open(url).load()
    wins = 0
    for task in TASKS:
        probe = run_baseline(system, cfg, task, "linear_probe")
        wins += system.best_path(task).metrics["quality"] > probe.validation
    assert wins >= 2


def test_same_seed_same_system(tmp_path):
    cfg = tiny_config(samples_per_task_iteration=2)
    results = []
    for run in range(2):
        url = str(tmp_path / f"run{run}")
        store = open_or_create(url, cfg)
        add_tasks_to_store(store, ["mu2net:lfw_faces"])
        Evolver(store, cfg, progress=False).run()
        results.append(_snapshot(store.load(), "mu2net:lfw_faces"))
    (rec0, p0), (rec1, p1) = results
    assert rec0["hparams"] == rec1["hparams"]
    assert rec0["metrics"]["quality"] == rec1["metrics"]["quality"]
    for n in p0:
        for k in p0[n]:
            assert p0[n][k].tobytes() == p1[n][k].tobytes(), (n, k)


def test_resume_after_finished_iteration_does_nothing_more(evolved):
    url, cfg, *_ = evolved
    before = {a: Store.open(url).manifest_seqs(a) for a in Store.open(url).shards()}
    assert Evolver(Store.open(url), cfg, progress=False).run() == []
    after = {a: Store.open(url).manifest_seqs(a) for a in Store.open(url).shards()}
    assert before == after


@pytest.mark.slow
def test_add_task_while_continuous_service_runs(tmp_path):
    url = str(tmp_path / "live")
    gin_file = os.path.join(os.path.dirname(__file__), "data", "tiny_vit_service.gin")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [
        sys.executable,
        "-m",
        "mu2net.evolution.main",
        f"--gin_file={gin_file}",
        f"--store={url}",
        "--add_tasks=mu2net:lfw_faces",
        "--continuous",
        "--max_task_iterations=2",
        "--no_progress",
        "--gin.EvolutionConfig.poll_seconds=0.5",
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.time() + 400
        while time.time() < deadline:
            try:
                if Store.open(url).load().best_path("mu2net:lfw_faces") is not None:
                    break
            except Exception:  # the store may not exist yet
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(1)
        first = _snapshot(Store.open(url).load(), "mu2net:lfw_faces")
        add = subprocess.run(
            [
                sys.executable,
                "-m",
                "mu2net.cli",
                "add-task",
                f"--store={url}",
                "mu2net:animal_halves",
            ],
            env=env,
            capture_output=True,
            text=True,
        )
        assert add.returncode == 0, add.stderr
        out, _ = proc.communicate(timeout=400)
        assert proc.returncode == 0, out
    finally:
        proc.kill()
    system = Store.open(url).load()
    assert system.best_path("mu2net:animal_halves") is not None
    _assert_same(first, _snapshot(system, "mu2net:lfw_faces"))


def test_size_scaled_score_survives_discarded_candidates(tmp_path):
    """With s < 1 the score needs the path's params, also for a candidate that is discarded."""
    # Hardly any learning and a strict rule: children of the task's own path are discarded.
    defaults = {**tiny_config().defaults, "opt_lr": 1e-7}
    cfg = tiny_config(
        scale=0.9,
        strict_improvement=True,
        space="none",
        defaults=defaults,
        samples_per_task_iteration=4,
        train_examples_between_validations=64,
    )
    store = open_or_create(str(tmp_path / "sys"), cfg)
    add_tasks_to_store(store, ["mu2net:lfw_faces"])
    Evolver(store, cfg, progress=False).run()
    history = [h for h in store.history() if "path" in h]
    discarded = [h for h in history if not h["improved"]]
    assert len(history) == 4 and discarded
    assert all(0 < h["score"] < h["quality"] for h in discarded)  # s^(params/P) < 1
