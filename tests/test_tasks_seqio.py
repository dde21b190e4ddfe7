"""Plain seqio tasks (registered with seqio alone) join a system, with their own metrics.

``tests/data/seqio_user_tasks.py`` is written with seqio, TensorFlow and numpy only.
"""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from test_cli import MU2NET, TINY_VIT

import mu2net.tasks as T
from mu2net.errors import Mu2netError
from mu2net.system.store import Store

DATA = os.path.join(os.path.dirname(__file__), "data")
sys.path.insert(0, DATA)
import seqio_user_tasks  # noqa: E402

# The environment a newcomer has: none of the quieting variables set.
CLEAN_ENV = {k: v for k, v in os.environ.items()
             if k not in ("TF_CPP_MIN_LOG_LEVEL", "JAX_PLATFORMS", "CUDA_VISIBLE_DEVICES",
                          "MU2NET_VERBOSE")}  # fmt: skip
CLEAN_ENV["PYTHONPATH"] = os.pathsep.join([DATA, os.environ.get("PYTHONPATH", "")])
NOISE = re.compile(r"^[IWEF]\d{4} |absl|tensorflow|oneDNN|cuda|cuInit|XLA|InitializeLog", re.I)


def run(*args, env=None):
    return subprocess.run([MU2NET, *args], capture_output=True, text=True,
                          env=env or CLEAN_ENV, timeout=900)  # fmt: skip


def test_facts_read_from_the_seqio_task():
    info = T.task_info("user:blobs")
    assert (info.num_classes, info.modality, info.metric_name) == (2, "image", "macro_f1")
    assert info.split_sizes == seqio_user_tasks.SIZES and info.class_names == ("0", "1")
    assert T.is_registered("user:blobs")
    T.validate_task("user:blobs")


def test_metric_api_runs_the_tasks_metric_fns():
    t, p = np.array([0, 0, 0, 1]), np.array([0, 0, 0, 0])
    name, fn = T.primary_metric("user:blobs")
    assert name == "macro_f1" and fn(t, p) == pytest.approx((6 / 7 + 0) / 2)
    assert T.task_metrics("user:blobs", t, p) == {"macro_f1": pytest.approx(3 / 7),
                                                  "support": 4.0}  # fmt: skip
    name, fn = T.primary_metric("digits")  # mu2net's own tasks: top-1 accuracy
    assert name == "accuracy" and fn(t, p) == 0.75
    with pytest.raises(T.TaskError, match="3 targets but 4 predictions"):
        fn(t[:3], p)


@pytest.mark.parametrize(
    "task, fact",
    [
        ("user:no_classes", r"number of classes \(num_classes\) is unknown.*describe_task"),
        ("user:float_targets", r"'targets' is float32; mu2net needs integer class labels"),
        ("user:unlabelled_test", r"split 'test' is unlabelled"),
    ],
)
def test_missing_fact_is_named(task, fact):
    with pytest.raises(T.TaskError, match=fact) as e:
        T.validate_task(task)
    assert isinstance(e.value, Mu2netError) and task in str(e.value)


def test_describe_task_gives_the_missing_fact():
    try:
        info = T.describe_task("user:no_classes", num_classes=2, class_names=["dark", "light"])
        assert info.num_classes == 2 and T.task_info("user:no_classes").class_names[1] == "light"
    finally:
        T.registry._INFOS.pop("user:no_classes", None)
    with pytest.raises(T.TaskError, match="num_classes"):
        T.task_info("user:no_classes")


def test_tfds_source_under_mock_data():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=64):
        info = T.validate_task("user:tfds_mnist")
    assert info.num_classes == 10 and info.metric_name == "accuracy"  # from TFDS's ClassLabel


@pytest.mark.slow
def test_seqio_tasks_added_evolved_and_scored_by_their_metric(tmp_path):
    url = str(tmp_path / "sys")
    module = ["--module", "seqio_user_tasks_mock_tfds"]

    def ok(*args):
        res = run(*args)
        assert res.returncode == 0, (args[0], res.stdout[-2000:], res.stderr[-3000:])
        noise = [line for line in res.stderr.splitlines() if NOISE.search(line)]
        assert not noise, noise[:5]  # quiet by default, on a machine without accelerators
        assert res.stderr.startswith(f"mu2net {args[0]}: ")  # first line: what it does
        return res.stdout

    ok("init", "--store", url, *TINY_VIT)
    out = ok("add-task", "--store", url, *module, "user:blobs", "user:tfds_mnist")
    assert "live mixture now has 2 task(s): user:blobs, user:tfds_mnist" in out

    # a missing fact (each is named, see test_missing_fact_is_named): one line, nothing committed
    res = run("add-task", "--store", url, *module, "user:unlabelled_test")
    assert res.returncode == 1 and "split 'test' is unlabelled" in res.stderr, res.stderr[-2000:]
    assert Store.open(url).load().tasks == ["user:blobs", "user:tfds_mnist"]

    ok("evolve", "--store", url, *module, "--no_progress", *TINY_VIT)
    system = Store.open(url).load()
    for task in ("user:blobs", "user:tfds_mnist"):
        assert system.best_path(task) is not None, task
    out = ok("eval", "--store", url, *module)
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("user:")}
    blobs = rows["user:blobs"]
    assert blobs[1] == "macro_f1" and "support=32.0000" in blobs[5]
    # the published test quality is the task's own metric, and eval reproduces it
    assert blobs[2] == blobs[4] == f"{system.best_path('user:blobs').metrics['test_quality']:.4f}"
    assert rows["user:tfds_mnist"][1] == "accuracy"


def test_verbose_shows_what_quiet_hides(tmp_path):
    url = str(tmp_path / "sys")
    assert Store.create(url, "v")
    quiet = run("add-task", "--store", url, "--module", "seqio_user_tasks", "user:blobs")
    loud = run("add-task", "--store", url, "--verbose", "--module", "seqio_user_tasks",
               "user:blobs")  # fmt: skip
    assert quiet.returncode == loud.returncode == 0, (quiet.stderr[-2000:], loud.stderr[-2000:])
    assert not [line for line in quiet.stderr.splitlines() if NOISE.search(line)], quiet.stderr
    assert [line for line in loud.stderr.splitlines() if NOISE.search(line)], loud.stderr


def _evolve_blobs(tmp_path, **overrides):
    from test_evolution_system import tiny_config

    from mu2net.evolution.live import add_tasks_to_store
    from mu2net.evolution.loop import Evolver
    from mu2net.evolution.main import open_or_create

    cfg = tiny_config(
        root_hparams={"vit_size": "test", "num_layers": 1, "ds_image_size": 8},
        defaults={"opt_lr": 0.05, "ds_image_size": 8, "ds_crop": False},
        train_examples_between_validations=64, num_validations=1, validation_examples=32,
        candidates_per_generation=1, samples_per_task_iteration=1, **overrides,
    )  # fmt: skip
    store = open_or_create(str(tmp_path / "sys"), cfg)
    add_tasks_to_store(store, ["user:blobs"])
    Evolver(store, cfg, progress=False, log=lambda s: None).run()
    return store


def test_quality_metric_is_the_score_and_is_recorded(tmp_path):
    from mu2net.evolution.evaluation import evaluate_path

    store = _evolve_blobs(tmp_path, quality_metric="macro_f1")
    system = store.load()
    path = system.best_path("user:blobs")
    assert path.metrics["quality_metric"] == "macro_f1"
    assert path.metrics["validation"]["metric"] == "macro_f1"
    # The whole validation split (32) is validated on, so its macro-F1 is the path's quality.
    f1, preds, targets = evaluate_path(system, "user:blobs", "validation", metric="macro_f1")
    assert path.metrics["quality"] == pytest.approx(f1)
    accuracy = float(np.mean(preds == targets))
    assert f1 != pytest.approx(accuracy) or accuracy == 1.0  # not accuracy under another name
    (cand,) = [h for h in store.history() if h.get("task") == "user:blobs" and "path" in h]
    assert cand["quality"] == pytest.approx(f1)


def test_unknown_quality_metric_is_named_before_training(tmp_path):
    with pytest.raises(Mu2netError, match="quality_metric 'f2'.*macro_f1"):
        _evolve_blobs(tmp_path, quality_metric="f2")
    system = Store.open(str(tmp_path / "sys")).load()
    assert system.best_path("user:blobs") is None
