"""Multipath benchmark: µ4Net multipath agents vs the single-path best of each task.

Per seed, in one store under ``--workdir`` (resumable: rerun the same command after a kill or
a timeout and it continues from the store):

1. single-path evolution of the suite (``experiments/default.gin``: EfficientNet-Lite0 at
   64 px, the four bundled image tasks, one task iteration each);
2. one multipath task iteration of every task in turn (``experiments/multipath.gin``), whose
   published path becomes the composite one only if it beats path_0 on validation.

Printed per task (mean±std over seeds): test accuracy of the single-path best and of the
task's final published path, how often a multipath path was published, trained params as a
fraction of the params a multipath candidate activates, and compute per candidate (training
+ validation FLOPs, the frozen sub-paths' outputs included, which each example computes once and
the candidate that first needed them pays for; wall seconds likewise) against a single-path
candidate of the same seed; the same ratio as it would be without the runner's activation memo
(every generation computing its frozen activations again: the records'
``flops_without_memo``). Immunity: every task whose published path did not change keeps
bit-identical test predictions. Written: ``benchmarks/<out>.json``.

Usage::

    python benchmarks/multipath.py --seeds 1                 # the default suite, seed 0
    python benchmarks/multipath.py --quick                   # tiny ViT, 2 tasks: smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

TASKS = ("mu2net:digits", "mu2net:mnist5k", "mu2net:animal_mnist", "mu2net:lfw_faces")


def log(msg: str) -> None:
    """Progress on stderr (stdout holds the table)."""
    print(msg, file=sys.stderr, flush=True)


def _configs(quick: bool, seed: int):
    from mu2net.evolution.config import EvolutionConfig

    if quick:
        cfg = EvolutionConfig(
            family="vit", root_hparams={"vit_size": "test", "num_layers": 2, "ds_image_size": 16},
            defaults={"_mu_": 0.3, "opt_lr": 0.05, "ds_image_size": 16, "ds_crop": False,
                      "ds_flip_left_right": False}, space="v2", batch_size=32,
            train_examples_between_validations=320, num_validations=2, validation_examples=128,
            candidates_per_generation=2, samples_per_task_iteration=2, num_cycles=1, seed=seed,
        )  # fmt: skip
        multi = dataclasses.replace(
            cfg, strategy="multipath", num_cycles=2, strict_improvement=True
        )
        return cfg, multi
    common.parse_gin(["experiments/default.gin"])
    single = dataclasses.replace(EvolutionConfig(), seed=seed)
    common.parse_gin(["experiments/multipath.gin"])
    return single, dataclasses.replace(EvolutionConfig(), seed=seed)


def _candidate_cost(history: list[dict], task: str, strategy: str) -> dict[str, Any]:
    """Mean FLOPs and seconds per candidate of ``strategy``'s iterations of ``task``."""
    cands = [h for h in history if h.get("task") == task and "parent" in h]
    iters = {
        (h["task"], h["iteration"])
        for h in history
        if h.get("event") == "task_iteration" and h.get("strategy") == strategy
    }
    mine = [h for h in cands if (h["task"], h.get("iteration")) in iters]
    if not mine:
        return {}
    return {
        "candidates": len(mine),
        "flops": float(np.mean([sum(h["flops"].values()) for h in mine])),
        "flops_without_memo": float(np.mean([_without_memo(h) for h in mine])),
        "seconds": float(np.mean([h["timings"].get("total_s", 0.0) for h in mine])),
        "trainable_params": float(np.mean([h["trainable_params"] for h in mine])),
        "hparams": [h["hparams"] for h in mine],
        "quality": [h["quality"] for h in mine],
    }


def _without_memo(record: dict) -> float:
    """A candidate's FLOPs had every generation computed its frozen activations again."""
    flops = record["flops"]
    again = record.get("prefix", {}).get("flops_without_memo", flops.get("prefix", 0.0))
    return sum(flops.values()) - flops.get("prefix", 0.0) + again


def _activated(system, hparams: dict, trained: float) -> float:
    """Params a multipath candidate runs: its sub-paths' components plus what it trains."""
    from mu2net.models.multipath import decode_subpaths, subpath_names

    total = trained
    for sub in decode_subpaths(hparams):
        names = subpath_names(sub)
        comps = _subpath_components(system, sub.path, names)
        total += sum(system.component(comps[n]).num_params for n in names)
    return total


def _subpath_components(system, pid: str, names: list[str]) -> dict[str, str]:
    """Component ids of path ``pid``, published or kept as a sub-path with all of ``names``."""
    found = [system.paths[pid]] if pid in system.paths else []
    found += [p.subpath(s.slot) for p in system.task_paths() for s in p.subpaths if s.path == pid]
    for path in found:
        if all(n in path.components for n in names):
            return path.components
    raise KeyError(pid)


def _test_predictions(system, path) -> np.ndarray:
    from mu2net.evolution import data as evo_data
    from mu2net.models.base import get_family
    from mu2net.train.batching import eval_batches
    from mu2net.train.trainer import evaluate

    family = get_family(path.family)
    arrays = evo_data.eval_arrays(path.task, "test", family, path.hparams)
    _, preds = evaluate(family, path.hparams, system.params_of(path), eval_batches(arrays, 64))
    return np.asarray(preds).reshape(-1)


def _single_results(url: str, tasks: list[str]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Test accuracy and predictions of the single-path system (saved once, next to the store).

    A resumed run reads them back: by then some tasks' published paths may be multipath.
    """
    import json

    from mu2net.evolution.evaluation import evaluate_path
    from mu2net.system.store import Store

    done = os.path.join(url + "_single", "test.json")
    if not os.path.exists(done):
        os.makedirs(os.path.dirname(done), exist_ok=True)
        system = Store.open(url).load()
        accs = {}
        for i, t in enumerate(tasks):
            accs[t], preds, _ = evaluate_path(system, t)
            np.save(os.path.join(os.path.dirname(done), f"{i}.npy"), preds, allow_pickle=False)
        with open(done + ".tmp", "w") as f:
            json.dump(accs, f)
        os.replace(done + ".tmp", done)
    with open(done) as f:
        accs = json.load(f)
    preds = {
        t: np.load(os.path.join(os.path.dirname(done), f"{i}.npy"), allow_pickle=False)
        for i, t in enumerate(tasks)
    }
    return accs, preds


def run_seed(seed: int, args) -> dict[str, Any]:
    """Both phases for one seed (resuming from the store); returns the seed's record."""
    from mu2net.evolution.evaluation import evaluate_path
    from mu2net.evolution.live import add_tasks_to_store
    from mu2net.evolution.loop import Evolver
    from mu2net.evolution.main import open_or_create
    from mu2net.models.multipath import MAIN_SLOT
    from mu2net.system.store import Store

    tasks = list(args.tasks.split(",")) if args.tasks else list(TASKS[: 2 if args.quick else 4])
    single, multi = _configs(args.quick, seed)
    url = os.path.join(args.workdir, f"s{seed}")
    store = open_or_create(url, single)
    add_tasks_to_store(store, tasks)
    t0 = time.time()
    Evolver(store, single, progress=False, log=log).run()
    log(f"seed {seed}: single-path done ({time.time() - t0:.0f} s)")
    single_test, preds = _single_results(url, tasks)
    for t in tasks:
        t1 = time.time()
        Evolver(store, multi, progress=False, log=log, tasks=[t]).run()
        log(f"seed {seed}: multipath {t} ({time.time() - t1:.0f} s)")
    system = Store.open(url).load()
    history = store.history()
    out: dict[str, Any] = {"tasks": {}, "immunity": []}
    for t in tasks:
        best = system.best_path(t)
        acc, _, _ = evaluate_path(system, t)
        # Every single-path model of phase 1 (published, or a multipath path's path_0)
        # predicts exactly as before.
        single = best.subpath(MAIN_SLOT) if best.is_composite else best
        changed = int(np.sum(_test_predictions(system, single) != preds[t]))
        out["immunity"].append({"task": t, "changed": changed, "examples": int(len(preds[t]))})
        mp = _candidate_cost(history, t, "multipath")
        sp = _candidate_cost(history, t, "mu2net")
        trained = mp.get("trainable_params", 0.0)
        activated = np.mean([_activated(system, h, trained) for h in mp.get("hparams", [])] or [0])
        out["tasks"][t] = {
            "single_test": single_test[t],
            "final_test": acc,
            "published_multipath": bool(best.is_composite),
            "trained_fraction": mp.get("trainable_params", 0.0) / activated if activated else None,
            "flops_ratio": mp["flops"] / sp["flops"] if mp and sp else None,
            "flops_ratio_without_memo": (
                mp["flops_without_memo"] / sp["flops_without_memo"] if mp and sp else None
            ),
            "seconds_ratio": mp["seconds"] / sp["seconds"] if mp and sp else None,
            "multipath": {k: v for k, v in mp.items() if k != "hparams"},
            "single": {k: v for k, v in sp.items() if k != "hparams"},
        }
    return out


def print_table(doc: dict[str, Any]) -> None:
    """One row per task: accuracies, publish rate, trained fraction, compute ratios."""
    rows = []
    for t, r in doc["tasks"].items():
        rows.append([
            t, common.pm(r["single_test"]), common.pm(r["final_test"]),
            f"{r['published']}/{r['seeds']}", common.pm(r["trained_fraction"], 4),
            common.pm(r["flops_ratio"]), common.pm(r["flops_ratio_without_memo"]),
            common.pm(r["seconds_ratio"]),
        ])  # fmt: skip
    print(
        common.table(
            ["task", "single-path test", "final test", "multipath published", "trained/activated",
             "FLOPs/candidate vs single", "same, no memo", "seconds/candidate vs single"],
            rows,
        )
    )  # fmt: skip
    print(
        f"immunity: {doc['immunity_changed']} of {doc['immunity_examples']} test predictions of "
        f"the single-path models changed ({doc['immunity_checks']} checks)"
    )


def main(argv=None) -> int:
    """Runs the seeds, writes the JSON, prints the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--seed_offset", type=int, default=0)
    p.add_argument("--tasks", default="", help="comma-separated tasks (default: the suite)")
    p.add_argument("--quick", action="store_true", help="tiny ViT, 2 tasks (smoke test)")
    p.add_argument("--workdir", default="/tmp/mu2net_bench_multipath")
    p.add_argument("--out", default="multipath")
    args = p.parse_args(argv)
    if args.quick:
        args.workdir += "_quick"
    seeds = list(range(args.seed_offset, args.seed_offset + args.seeds))
    runs = {s: run_seed(s, args) for s in seeds}
    tasks = list(runs[seeds[0]]["tasks"])
    doc: dict[str, Any] = {"tasks": {}, "_meta": {"seeds": seeds, **common.machine()}}
    for t in tasks:
        recs = [runs[s]["tasks"][t] for s in seeds]
        doc["tasks"][t] = {
            k: common.mean_std([r[k] for r in recs])
            for k in ("single_test", "final_test", "trained_fraction", "flops_ratio",
                      "flops_ratio_without_memo", "seconds_ratio")
        }  # fmt: skip
        doc["tasks"][t].update(
            published=sum(r["published_multipath"] for r in recs), seeds=len(seeds),
            runs=recs,
        )  # fmt: skip
    checks = [c for s in seeds for c in runs[s]["immunity"]]
    doc["immunity_checks"] = len(checks)
    doc["immunity_changed"] = sum(c["changed"] for c in checks)
    doc["immunity_examples"] = sum(c["examples"] for c in checks)
    common.write_json(args.out, doc)
    print_table(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
