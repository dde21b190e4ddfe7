"""Scale benchmark: grow one system to 50+ tasks and watch what must stay flat.

Root: a small random-init ViT (``vit`` family: width 64, 2 layers, patch 4 at 16 px), the real
family the paper uses, kept tiny so 50+ task iterations fit in minutes on 2 cores. Tasks: the
bundled class-pair tasks (``mu2net:mnist5k_pair_01``, ``mu2net:animal_mnist_pair_01``, ...,
interleaved), each added to the live mixture and evolved for one small task iteration
(2 candidates x 2 validations x 2 steps of batch 32) by an :class:`Evolver` in this process.

Measured after each added task ``n``:

* ``iter_s``: wall time of the task iteration (includes the store reload of every shard);
* ``reload_s``: ``Store.load()`` of the whole system (what every task iteration starts with);
* ``store_bytes_added`` vs the new path's accounted params (bytes per accounted param);
* ``rss_mb``: resident memory of this (evolving) process;
* at checkpoints: inference for task 0 from a fresh ``Store.open(url).load_task(task)`` (its
  index file, not the manifests): open+load time and bytes, first ``System.predict`` (reads
  the path's components, compiles), and the warm latency of predicting 32 examples (median
  and best of 100, and the ratio to the system loaded at the first checkpoint, timed
  interleaved so machine load cancels): these must stay flat as tasks are added. The full
  ``Store.load()`` is timed beside it.

Prints one table (checkpoints), writes ``benchmarks/scale.json`` and ``benchmarks/scale.png``.

Usage: ``python benchmarks/scale.py [--tasks 60] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import numpy as np  # noqa: E402

ROOT = {
    "vit_size": "test",
    "vit_hidden": 64,
    "vit_mlp_dim": 128,
    "vit_heads": 2,
    "vit_patch": 4,
    "num_layers": 2,
    "ds_image_size": 16,
}


def make_config(seed: int = 0):
    """A tiny but real evolution config (v2 space, mu 0.3)."""
    from mu2net.evolution.config import EvolutionConfig

    return EvolutionConfig(
        family="vit",
        root_hparams=dict(ROOT),
        defaults={
            "_mu_": 0.3,
            "opt_lr": 0.05,
            "ds_image_size": 16,
            "ds_crop": False,
            "ds_flip_left_right": False,
        },
        space="v2",
        batch_size=32,
        train_examples_between_validations=64,
        num_validations=2,
        validation_examples=64,
        candidates_per_generation=2,
        samples_per_task_iteration=2,
        num_cycles=1,
        seed=seed,
    )


def task_list(n: int) -> list[str]:
    """``n`` pair tasks, alternating sources so the system mixes domains."""
    from mu2net.tasks.bundled import pair_task_names

    per = [pair_task_names([s]) for s in ("mnist5k", "animal_mnist", "digits")]
    out = [t for group in zip(*per) for t in group]
    if n > len(out):
        raise SystemExit(f"--tasks {n}: only {len(out)} pair tasks are registered")
    return out[:n]


def dir_bytes(path: str) -> int:
    """Bytes of every file under ``path``."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


class CountingStore:
    """Opens a store and counts the bytes its reads return (wraps the instance's ``_get``)."""

    def __init__(self, url: str):
        from mu2net.system.store import Store

        self.bytes_read = 0
        self.store = Store.open(url)
        get = self.store._get

        def counted(path: str) -> bytes:
            data = get(path)
            self.bytes_read += len(data)
            return data

        self.store._get = counted


def inference_probe(url: str, task: str, inputs: np.ndarray, control=None) -> dict[str, Any]:
    """Fresh open+load, first predict (reads the path, compiles), warm latency; bytes read.

    ``control`` is the predictor loaded at the first checkpoint: timed interleaved with this
    one, it gives a latency ratio that machine load (shared and noisy) cancels out of.
    """
    from mu2net.serve import TaskPredictor
    from mu2net.serve.predictor import clear_compile_cache

    clear_compile_cache()  # the serving process would start without it
    full = CountingStore(url)
    t0 = time.perf_counter()
    full.store.load()
    full_load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cs = CountingStore(url)
    system = cs.store.load_task(task)
    load_s = time.perf_counter() - t0
    metadata_bytes = cs.bytes_read
    t0 = time.perf_counter()
    predictor = TaskPredictor.from_system(system, task)
    labels, _ = predictor.predict(task, inputs)
    first_s = time.perf_counter() - t0
    control = control if control is not None else predictor
    lat, lat_control = [], []
    for _ in range(100):
        for s, out in ((predictor, lat), (control, lat_control)):
            t0 = time.perf_counter()
            s.predict(task, inputs)
            out.append(time.perf_counter() - t0)
    path = system.best_path(task)
    return {
        "open_load_s": load_s,
        "full_load_s": full_load_s,
        "full_load_bytes": full.bytes_read,
        "first_predict_s": first_s,
        "warm_predict_ms": 1e3 * float(np.median(lat)),
        "best_predict_ms": 1e3 * float(np.min(lat)),  # least disturbed by other jobs
        "latency_vs_first": float(np.median(lat) / np.median(lat_control)),
        "bytes_read": cs.bytes_read,
        "metadata_bytes": metadata_bytes,
        "component_bytes": cs.bytes_read - metadata_bytes,
        "path_params": system.path_params(path),
        "labels": labels,
        "predictor": predictor,
    }


def run(n_tasks: int, checkpoints: list[int], workdir: str) -> dict[str, Any]:
    """Grows the system task by task; returns per-task records and checkpoint probes."""
    from mu2net.evolution import data as evo_data
    from mu2net.evolution.live import add_tasks_to_store
    from mu2net.evolution.loop import Evolver
    from mu2net.evolution.main import open_or_create
    from mu2net.models.base import get_family
    from mu2net.system.names import agent_for_task

    cfg = make_config()
    url = os.path.join(workdir, "store")
    store = open_or_create(url, cfg, system_name="scale")
    tasks = task_list(n_tasks)
    records, probes, first_labels, control = [], [], None, None
    probe_inputs = None
    for i, task in enumerate(tasks, 1):
        before = dir_bytes(url)
        add_tasks_to_store(store, [task])
        t0 = time.perf_counter()
        summaries = Evolver(store, cfg, progress=False, log=lambda s: None).run()
        iter_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        system = store.load()
        reload_s = time.perf_counter() - t0
        path = system.best_path(task)
        rec = {
            "n": i,
            "task": task,
            "iter_s": iter_s,
            "reload_s": reload_s,
            "store_bytes_added": dir_bytes(url) - before,
            "accounted_params_at_publish": summaries[-1]["accounted_params"],
            "new_params": sum(
                c.num_params
                for c in system.path_components(path).values()
                if c.agent == agent_for_task(task)
            ),
            "test": path.metrics.get("test_quality"),
            "rss_mb": common.rss_mb(),
            "total_params": system.total_params(),
        }
        records.append(rec)
        print(
            f"[{i}/{n_tasks}] {task}: {iter_s:.1f}s test {rec['test']:.3f} "
            f"+{rec['store_bytes_added']:,} B rss {rec['rss_mb']:.0f} MiB",
            file=sys.stderr,
            flush=True,
        )
        if probe_inputs is None:
            fam = get_family("vit")
            probe_inputs = evo_data.eval_arrays(tasks[0], "test", fam, path.hparams)["inputs"][:32]
        if i in checkpoints:
            pr = inference_probe(url, tasks[0], probe_inputs, control)
            labels, predictor = pr.pop("labels"), pr.pop("predictor")
            control = control if control is not None else predictor
            if first_labels is None:
                first_labels = labels
            pr.update(n=i, task0_changed_predictions=int(np.sum(labels != first_labels)))
            probes.append(pr)
    return {"tasks": records, "probes": probes, "store_bytes": dir_bytes(url)}


def plot(doc: dict[str, Any], out: str) -> None:
    """Five panels: latency, load, bytes/param, RSS, iteration time vs number of tasks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec, pr = doc["tasks"], doc["probes"]
    n = [r["n"] for r in rec]
    pn = [p["n"] for p in pr]
    fig, ax = plt.subplots(2, 3, figsize=(14, 8))
    ax[0, 0].plot(pn, [p["warm_predict_ms"] for p in pr], "o-", label="median of 100")
    ax[0, 0].plot(pn, [p["best_predict_ms"] for p in pr], "s--", label="best of 100")
    ax[0, 0].legend()
    twin = ax[0, 0].twinx()
    twin.plot(pn, [p["latency_vs_first"] for p in pr], "k:", label="ratio to n=1, interleaved")
    twin.set(ylabel="ratio", ylim=(0.8, 1.2))
    twin.legend(loc="lower right")
    ax[0, 0].set(title="task-0 inference latency (32 ex, warm)", xlabel="tasks", ylabel="ms")
    ax[0, 1].plot(pn, [p["open_load_s"] + p["first_predict_s"] for p in pr], "o-", label="total")
    ax[0, 1].plot(pn, [p["open_load_s"] for p in pr], "s--", label="open+load (task index)")
    ax[0, 1].plot(pn, [p["full_load_s"] for p in pr], "x:", label="full Store.load()")
    ax[0, 1].set(title="load task 0 for inference (fresh)", xlabel="tasks", ylabel="s")
    ax[0, 1].legend()
    ax[0, 2].scatter(
        [r["accounted_params_at_publish"] for r in rec],
        [r["store_bytes_added"] for r in rec],
        s=12,
        label="vs accounted params",
    )
    ax[0, 2].scatter(
        [r["new_params"] for r in rec],
        [r["store_bytes_added"] for r in rec],
        s=12,
        marker="x",
        label="vs new params (components the task created)",
    )
    ax[0, 2].set(title="store bytes added per task", xlabel="params", ylabel="bytes")
    ax[0, 2].legend(fontsize=8)
    ax[1, 0].plot(n, [r["rss_mb"] for r in rec])
    ax[1, 0].set(title="RSS of the evolving process", xlabel="tasks", ylabel="MiB")
    ax[1, 1].plot(n, [r["iter_s"] for r in rec], label="task iteration")
    ax[1, 1].plot(n, [r["reload_s"] for r in rec], label="Store.load()")
    ax[1, 1].set(title="time per task iteration", xlabel="tasks", ylabel="s")
    ax[1, 1].legend()
    ax[1, 2].plot(pn, [p["bytes_read"] / 1e3 for p in pr], "o-", label="total")
    ax[1, 2].plot(pn, [p["metadata_bytes"] / 1e3 for p in pr], "s--", label="marker + index")
    ax[1, 2].plot(pn, [p["full_load_bytes"] / 1e3 for p in pr], "x:", label="full load: manifests")
    ax[1, 2].set(title="bytes read to serve task 0", xlabel="tasks", ylabel="kB")
    ax[1, 2].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=90)


def main(argv=None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=60)
    p.add_argument("--quick", action="store_true", help="6 tasks (smoke test)")
    p.add_argument("--keep", default="", help="keep the store in this directory")
    p.add_argument("--replot", action="store_true", help="table and PNG from the JSON only")
    args = p.parse_args(argv)
    if args.replot:
        name = "scale" + ("_quick" if args.quick else "")
        with open(common.json_path(name)) as f:
            report(json.load(f), name)
        return 0
    if args.quick:
        args.tasks = 6
    import mu2net.models.vit  # noqa: F401
    import mu2net.tasks  # noqa: F401

    n = args.tasks
    checkpoints = sorted({1, 2, 5, *range(10, n + 1, 10), n})
    workdir = args.keep or tempfile.mkdtemp(prefix="mu2net_scale_")
    meta = common.machine()
    t0 = time.time()
    try:
        doc = run(n, checkpoints, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    meta.update(
        seconds=time.time() - t0,
        load_average_end=common.load_average(),
        root=ROOT,
        config={k: v for k, v in vars(make_config()).items()},
    )
    doc["_meta"] = meta
    name = "scale" + ("_quick" if args.quick else "")
    common.write_json(name, doc)
    report(doc, name)
    return 0


def report(doc: dict[str, Any], name: str) -> None:
    """Prints the table and writes the PNG of a scale document."""
    meta, n = doc["_meta"], len(doc["tasks"])
    path = common.json_path(name)
    png = os.path.join(common.HERE, name + ".png")
    plot(doc, png)
    rec = {r["n"]: r for r in doc["tasks"]}
    rows = []
    for pr in doc["probes"]:
        r = rec[pr["n"]]
        window = [x for x in doc["tasks"] if abs(x["n"] - pr["n"]) < 5]
        rows.append(
            [
                pr["n"],
                f"{pr['warm_predict_ms']:.2f}",
                f"{pr['best_predict_ms']:.2f}",
                f"{pr['latency_vs_first']:.3f}",
                f"{pr['open_load_s']:.3f}",
                f"{pr['first_predict_s']:.2f}",
                f"{pr['bytes_read']:,}",
                f"{pr['metadata_bytes']:,}",
                f"{pr['full_load_s']:.3f}",
                pr["task0_changed_predictions"],
                f"{np.mean([x['iter_s'] for x in window]):.1f}",
                f"{np.mean([x['reload_s'] for x in window]):.3f}",
                f"{r['rss_mb']:.0f}",
                f"{r['total_params']:,}",
            ]
        )
    print(
        common.table(
            [
                "tasks",
                "t0 predict ms",
                "best ms",
                "vs n=1",
                "open+load s",
                "1st predict s",
                "bytes read",
                "metadata B",
                "full load s",
                "t0 changed",
                "iter s (±4)",
                "reload s",
                "RSS MiB",
                "system params",
            ],
            rows,
        )
    )
    bpp = [
        r["store_bytes_added"] / r["accounted_params_at_publish"]
        for r in doc["tasks"]
        if r["accounted_params_at_publish"]
    ]
    bpn = [r["store_bytes_added"] / r["new_params"] for r in doc["tasks"] if r["new_params"]]
    print(
        f"\nstore bytes added per new param: median {np.median(bpn):.2f} "
        f"(min {min(bpn):.2f}, max {max(bpn):.2f}); per accounted param at publish: "
        f"median {np.median(bpp):.2f} "
        f"(min {min(bpp):.2f}, max {max(bpp):.2f}); store {doc['store_bytes']:,} B for {n} "
        f"tasks; mean test acc {np.mean([r['test'] for r in doc['tasks']]):.3f}; "
        f"{meta['seconds']:.0f}s; load avg {meta['load_average_start'][0]:.1f}->"
        f"{meta['load_average_end'][0]:.1f}\nwrote {path} and {png}"
    )


if __name__ == "__main__":
    sys.exit(main())
