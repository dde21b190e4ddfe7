"""The ``mu2net`` command, run as a subprocess (console script, ``python -m`` or ``main``)."""

import argparse
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from test_report import TASK_A, build_store  # tests/ is on sys.path (no __init__.py)

from mu2net.system.store import Store

MU2NET = os.path.join(os.path.dirname(sys.executable), "mu2net")
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
VERBS = {"init", "add-task", "evolve", "status", "eval", "predict", "serve", "report", "train",
         "cache-tasks", "demo", "verify", "launch"}  # fmt: skip

# Calls mu2net.cli.main once per argv in ONE interpreter (imports are the slow part), after
# importing the tiny test family (predict has no --module flag); prints one JSON line.
IN_PROCESS = r"""
import contextlib, io, json, sys
import mu2net.train.testing
from mu2net.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    results.append({"rc": rc, "out": out.getvalue(), "err": err.getvalue()})
heavy = sorted(m for m in ("tensorflow", "seqio") if m in sys.modules)
print(json.dumps({"results": results, "heavy": heavy}))
"""


def run(args, cwd=None, timeout=600):
    return subprocess.run(args, capture_output=True, text=True, env=ENV, cwd=cwd, timeout=timeout)


def run_in_process(argvs):
    res = run([sys.executable, "-c", IN_PROCESS, json.dumps(argvs)])
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    return doc["results"], doc["heavy"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A trained-looking test_mlp system (no training), plus images and a .npy batch."""
    from PIL import Image

    d = tmp_path_factory.mktemp("cli")
    store, system, info = build_store(str(d / "store"))
    rng = np.random.default_rng(7)
    images = []
    for i, size in enumerate([(9, 7), (4, 4), (20, 11)]):  # resized to the path's 4x4
        f = str(d / f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(f)
        images.append(f)
    grey = str(d / "grey.png")
    Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8)).save(grey)
    images.append(grey)
    npy = str(d / "batch.npy")
    np.save(npy, (0.05 * rng.normal(size=(5, 4, 4, 3))).astype(np.float32))
    return {"dir": d, "url": store.url, "system": system, "info": info, "images": images,
            "npy": npy}  # fmt: skip


@pytest.fixture(scope="module")
def predicted(tiny):
    """predict on images (--json) and on the .npy batch (table), in one interpreter."""
    base = ["predict", "--store", tiny["url"], "--task", TASK_A]
    results, heavy = run_in_process(
        [
            [*base, "--json", *tiny["images"]],
            [*base, "--npy", tiny["npy"]],
            [*base, str(tiny["dir"] / "batch.npy")],  # not an image: error names the file
        ]
    )
    return results, heavy


def test_status_prints_table_without_tensorflow(tiny):
    res = run([sys.executable, "-X", "importtime", "-m", "mu2net.cli", "status",
               "--store", tiny["url"]])  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    imported = {line.split("|")[-1].strip() for line in res.stderr.splitlines()
                if line.startswith("import time:")}  # fmt: skip
    heavy = sorted(m for m in imported if m.split(".")[0] in ("tensorflow", "seqio"))
    assert not heavy, heavy[:5]
    assert "jax" in imported  # the importtime log is really there
    out = res.stdout
    assert "'tiny'" in out and "2 task(s), 1 root(s), 6 components" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("task "))
    assert lines[header].split() == ["task", "path", "val", "test", "accounted", "params",
                                     "path", "params", "shared", "iters", "TFLOPs", "seconds",
                                     "metric"]  # fmt: skip
    rows = {line.split()[0]: line.split() for line in lines[header + 2 : header + 4]}
    a, b = tiny["info"]["a"], tiny["info"]["b"]
    # Compute (TFLOPs, seconds) is what the history recorded: a number, not checked here.
    assert rows["mu2net:alpha"][:8] == [TASK_A, a.id, "0.8125", "0.7731", "579", "1,107", "2/3",
                                        "2"]  # fmt: skip
    assert rows["mu2net:beta"][:8] == ["mu2net:beta", b.id, "0.6875", "0.6543", "579", "1,107",
                                       "2/3", "1"]  # fmt: skip
    for row in rows.values():
        assert float(row[8]) >= 0 and float(row[9].replace(",", "")) >= 0
        assert row[10] == "accuracy"
    assert "last commit:" in out


def test_help_on_every_verb(tiny):
    from mu2net.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == VERBS
    res = run([MU2NET, "--help"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert all(v in res.stdout for v in VERBS)
    results, _ = run_in_process([[v, "--help"] for v in sorted(VERBS)])
    for verb, r in zip(sorted(VERBS), results):
        assert r["rc"] == 0, (verb, r)
        assert r["out"].startswith(f"usage: mu2net {verb}"), (verb, r["out"][:200])
        if verb not in ("train", "cache-tasks", "demo"):
            assert "--store" in r["out"], verb


def test_usage_errors_exit_2(tiny):
    res = run([MU2NET, "frobnicate", "--store", tiny["url"]])
    assert res.returncode == 2
    assert "usage: mu2net" in res.stderr and "invalid choice: 'frobnicate'" in res.stderr
    results, _ = run_in_process(
        [
            ["status"],
            ["predict", "--store", tiny["url"]],
            ["eval", "--store", tiny["url"], "--split", "dev"],
            ["status", "--store", str(tiny["dir"] / "nowhere")],
        ]
    )
    missing_store, missing_task, bad_split, no_store = results
    assert missing_store["rc"] == 2
    assert "the following arguments are required: --store" in missing_store["err"]
    assert missing_task["rc"] == 2 and "--task" in missing_task["err"]
    assert bad_split["rc"] == 2 and "invalid choice: 'dev'" in bad_split["err"]
    # not a usage error: the work fails, exit 1 with one line naming the directory
    assert no_store["rc"] == 1
    assert "nowhere" in no_store["err"] and "not a mu2net store" in no_store["err"]


def test_report_writes_files(tiny):
    out = tiny["dir"] / "report"
    res = run([MU2NET, "report", "--store", tiny["url"], "--out", str(out)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"report written to {out / 'index.html'}" in res.stdout
    html = (out / "index.html").read_text()
    for src in re.findall(r"<img src='([^']+)'", html):
        assert (out / src).stat().st_size > 5000
    assert "0.8125" in html and tiny["info"]["a"].id in html


def test_predict_images_json(tiny, predicted):
    import mu2net.train.testing  # noqa: F401  (registers the test_mlp family)
    from mu2net.serve import TaskPredictor

    (r, _, _), heavy = predicted
    assert r["rc"] == 0, r["err"]
    assert not heavy  # predict on a stored image path needs neither TensorFlow nor seqio
    got = json.loads(r["out"])
    predictor = TaskPredictor.load(tiny["url"], TASK_A)
    x = predictor.prepare_files(tiny["images"])
    assert x.shape == (4, 4, 4, 3)
    labels, probs = predictor.predict(TASK_A, x)
    assert [g["input"] for g in got] == tiny["images"]
    assert [g["label"] for g in got] == labels.tolist()
    assert [g["class"] for g in got] == [["x", "y", "z"][k] for k in labels]
    assert [f"{g['probability']:.4f}" for g in got] == [
        f"{p[k]:.4f}" for p, k in zip(probs, labels)
    ]
    m = re.search(r"read \d+ component file\(s\), [\d,]+ bytes \(path of 3 components; "
                  r"([\d,]+) bytes of store metadata\)", r["err"])  # fmt: skip
    # The marker and the task's index only: no manifest (those grow with the system).
    assert m and int(m.group(1).replace(",", "")) < 4000, r["err"]


def test_predict_npy_table_matches_numpy_forward(tiny, predicted):
    (_, r, _), _ = predicted
    assert r["rc"] == 0, r["err"]
    system = Store.open(tiny["url"]).load()
    p = system.params_of(system.best_path(TASK_A))
    x = np.load(tiny["npy"]).reshape(5, -1)
    for name in ("dense_0", "dense_1"):
        x = np.maximum(x @ p[name]["kernel"] + p[name]["bias"], 0)
    logits = x @ p["head"]["kernel"] + p["head"]["bias"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    lines = r["out"].splitlines()
    assert lines[0].split() == ["input", "label", "class", "probability"]
    rows = [line.split() for line in lines[2:]]
    assert [row[0] for row in rows] == [str(i) for i in range(5)]
    assert [int(row[1]) for row in rows] == probs.argmax(-1).tolist()
    assert [row[2] for row in rows] == [["x", "y", "z"][k] for k in probs.argmax(-1)]
    assert [row[3] for row in rows] == [f"{q.max():.4f}" for q in probs]


def test_predict_bad_image_names_the_file(tiny, predicted):
    (_, _, r), _ = predicted
    assert r["rc"] == 1
    assert "batch.npy: not a readable image" in r["err"]


def test_predict_reports_only_component_bytes(tiny, predicted):
    (r, _, _), _ = predicted
    store = Store.open(tiny["url"])
    path = store.load().best_path(TASK_A)
    expected = sum(
        store.latest_manifest(cid.split("/")[0])["components"][cid]["bytes"]
        for cid in path.components.values()
    )
    assert f"read 3 component file(s), {expected:,} bytes" in r["err"]


def test_predict_unknown_task_exits_1(tiny):
    res = run([MU2NET, "predict", "--store", tiny["url"], "--task", "mu2net:nope",
               "--npy", tiny["npy"]])  # fmt: skip
    assert res.returncode == 1
    assert "'mu2net:nope'" in res.stderr and "error" in res.stderr
    assert res.stdout == ""


# A tiny ViT on the bundled lfw_faces task: 1 block, 16 px, 2 candidates of 4 steps each.
TINY_VIT = [
    "--gin_file=experiments/vit_ti0_quick.gin",
    "--gin.EvolutionConfig.root_hparams={'vit_size': 'test', 'num_layers': 1, 'ds_image_size': 16}",
    "--gin.EvolutionConfig.defaults={'_mu_': 0.2, 'num_layers': 1, 'ds_image_size': 16, "
    "'opt_lr': 0.05, 'ds_crop': False, 'ds_flip_left_right': False}",
    "--gin.EvolutionConfig.extra_space={}",
    "--gin.EvolutionConfig.batch_size=16",
    "--gin.EvolutionConfig.train_examples_between_validations=64",
    "--gin.EvolutionConfig.num_validations=1",
    "--gin.EvolutionConfig.validation_examples=32",
    "--gin.EvolutionConfig.candidates_per_generation=2",
    "--gin.EvolutionConfig.samples_per_task_iteration=2",
    "--gin.EvolutionConfig.num_cycles=1",
]


@pytest.mark.slow
def test_end_to_end_init_add_task_evolve_status_eval(tmp_path):
    url = str(tmp_path / "sys")
    task = "mu2net:lfw_faces"

    def mu2net(*args):
        res = run([MU2NET, *args], cwd=str(tmp_path))
        assert res.returncode == 0, (args[0], res.stdout[-2000:], res.stderr[-3000:])
        return res.stdout

    out = mu2net("init", "--store", url, *TINY_VIT)
    assert "with root root:vit:" in out  # the ViT class root is named by its size
    out = mu2net("add-task", "--store", url, task)
    assert f"live mixture now has 1 task(s): {task}" in out
    out = mu2net("evolve", "--store", url, "--no_progress", *TINY_VIT)
    assert "1 task iteration(s) done" in out

    store = Store.open(url)
    best = store.load().best_path(task)
    assert best.metrics["task_iterations"] == 1 and best.family == "vit"
    assert best.hparams["ds_image_size"] == 16 and best.hparams["num_layers"] == 1
    records = [r for r in store.history() if r.get("task") == task]
    assert [r.get("event") for r in records] == [None, None, "task_iteration"]

    out = mu2net("status", "--store", url)
    row = next(line.split() for line in out.splitlines() if line.startswith(task))
    assert row[1] == best.id
    assert row[2] == f"{best.metrics['quality']:.4f}"
    assert row[3] == f"{best.metrics['test_quality']:.4f}"

    # re-evaluating the published path reproduces the test accuracy recorded at commit time
    out = mu2net("eval", "--store", url)
    row = next(line.split() for line in out.splitlines() if line.startswith(task))
    assert row[1] == "accuracy" and int(row[3]) > 0
    assert row[2] == row[4] == f"{best.metrics['test_quality']:.4f}"
