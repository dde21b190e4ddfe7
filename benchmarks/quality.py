"""Quality benchmark: the evolved system vs baselines at equal compute per task.

From one pretrained root (EfficientNet-Lite0 at 64 px, ``gin/experiments/default.gin``; or
MiniLM-L6 with ``--text``) on the bundled real tasks, per seed:

* ``evolved``: the tasks are added to the live mixture **one at a time** and evolved with
  :class:`mu2net.evolution.loop.Evolver` after each addition (one task iteration each, as the
  default run does). After each addition the store is re-read from disk and every earlier task's
  test predictions are compared with the ones it had before: **immunity** (changed count must be 0).
* ``alone`` (transfer check): the last task (``--transfer_tasks all``: every task after the
  first) evolved in a fresh system holding only the root, same config and seed; ``evolved``
  minus ``alone`` is what the earlier tasks' paths contributed.
* baselines through :func:`mu2net.evolution.baselines.run_baseline` (same trainer). A kind
  ending in ``@flops`` gets exactly the training + validation FLOPs the evolved task iteration
  of the same seed spent on that task (XLA counts), ``@seconds`` its wall seconds; a kind
  without a variant gets the reference's budget (V x cycles x generations validation
  intervals, labelled "reference accounting"). Defaults: ``finetune_all``,
  ``finetune_all_lr_grid`` (3 learning rates sharing the budget, best on validation),
  ``freeze_bottom_12``, ``adapters_16``, ``linear_probe``, all ``@flops``; ``finetune_all``
  ``@seconds``; ``finetune_all`` at the reference's accounting.
* ``scratch_vit_flops``: a random-init small ViT (``vit`` family) fully trained with the
  evolved run's FLOPs, i.e. what an independent per-task model gets.

Suites: ``--suite images4`` (the four bundled tasks), ``--suite images8`` (plus Fashion-MNIST,
OpenCV digits and two derived tasks; ``make suite-data`` first), ``--text``. ``--revisit`` adds a
second task iteration of every task after the last addition (µ2Net+), with immunity checks.

Printed: one table (test accuracy mean±std over seeds per task, average, accounted params per
task, params added to the system over the root, training examples, TFLOPs and wall seconds
per task). Written: ``benchmarks/quality.json`` (``--text``: ``quality_text.json``) shaped
``{method: {task: {"mean", "std", "runs"}, ...}, ..., "_meta": {...}}``. Long runs are split
into parts that checkpoint (``--parts``, ``--checkpoint``, ``--seed_offset``; the baselines of a
separate process take their budgets from the evolved part's JSON with ``--budgets_from``),
then merged with ``--merge``.

Usage::

    python benchmarks/quality.py                  # full image suite (see README for the time)
    python benchmarks/quality.py --quick          # tiny budget, 2 tasks, 1 seed: a smoke test
    python benchmarks/quality.py --text           # rotten_tomatoes + debates2016 on MiniLM
"""

from __future__ import annotations

import argparse
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

IMAGE_TASKS = ("mu2net:digits", "mu2net:mnist5k", "mu2net:animal_mnist", "mu2net:lfw_faces")
# 8 tasks from 6 real sources (4 wheels + 2 Debian packages: `make suite-data`); the last two
# are derived tasks (new labels on the same real images), counted as tasks, not sources.
SUITES = {
    "images4": IMAGE_TASKS,
    "images8": IMAGE_TASKS + ("mu2net:fashion_mnist", "mu2net:opencv_digits",
                              "mu2net:animal_domestic", "mu2net:mnist5k_ge5"),
}  # fmt: skip
TEXT_TASKS = ("mu2net:rotten_tomatoes", "mu2net:debates2016")
# Baselines given the evolved run's FLOPs per task (the "finetune_all" row without a variant
# is the reference's accounting: V x cycles x generations validation intervals).
EQUAL_IMAGE = (
    "finetune_all", "finetune_all_lr_grid", "freeze_bottom:12", "adapters:16", "linear_probe",
)  # fmt: skip
EQUAL_TEXT = ("finetune_all", "finetune_all_lr_grid", "freeze_bottom:4", "adapters:16")
# A small ViT from scratch: 4 layers, width 128, patch 8 at 64 px (65 tokens).
SCRATCH_VIT = {
    "vit_size": "test",
    "vit_hidden": 128,
    "vit_mlp_dim": 256,
    "vit_heads": 4,
    "vit_patch": 8,
    "num_layers": 4,
    "ds_image_size": 64,
}


def _registered(task: str) -> bool:
    from mu2net.tasks.registry import is_registered

    return is_registered(task)


def log(msg: str) -> None:
    """Progress goes to stderr so stdout holds only the table."""
    print(msg, file=sys.stderr, flush=True)


def _config(gin_file: str, bindings: list[str], seed: int):
    from mu2net.evolution.config import EvolutionConfig

    common.parse_gin([gin_file], bindings)
    cfg = EvolutionConfig()
    cfg.seed = seed
    return cfg


def _immunity(system, tasks, preds, event: str) -> list[dict[str, Any]]:
    """Changed test predictions of ``tasks`` (published paths) against ``preds``."""
    from mu2net.evolution.evaluation import evaluate_path

    out = []
    for task in tasks:
        _, p, _ = evaluate_path(system, task)
        out.append(
            {"added": event, "task": task, "examples": int(len(p)),
             "changed": int(np.sum(p != preds[task]))}
        )  # fmt: skip
    return out


def _spent(summaries, task: str) -> dict[str, float]:
    mine = [s for s in summaries if s["task"] == task]
    return {
        "examples": sum(s["examples"] for s in mine),
        "flops": sum(s["flops"] for s in mine),
        "train_seconds": sum(s["train_seconds"] for s in mine),
    }


def revisit_all(store, tasks, cfg, out, preds) -> None:
    """A second task iteration of every task (continual revisits, µ2Net+), in order.

    After each revisit every other task's test predictions must be unchanged (immunity); the
    revisited task's record gets its new test accuracy and the compute of both iterations.
    """
    import dataclasses

    from mu2net.evolution.evaluation import evaluate_path
    from mu2net.evolution.loop import Evolver
    from mu2net.system.store import Store

    rcfg = dataclasses.replace(cfg, num_cycles=cfg.num_cycles + 1)
    for task in tasks:
        t0 = time.time()
        summaries = Evolver(store, rcfg, tasks=[task], progress=False, log=log).run()
        system = Store.open(store.url).load()
        others = [t for t in tasks if t != task]
        out["immunity"] += _immunity(system, others, preds, f"revisit {task}")
        rec = out["tasks"][task]
        rec["test_first_cycle"] = rec["test"]
        rec["test"], preds[task], _ = evaluate_path(system, task)
        rec["seconds"] += time.time() - t0
        for key, value in _spent(summaries, task).items():
            rec[key] += value
        log(f"  revisited {task}: test {rec['test_first_cycle']:.4f} -> {rec['test']:.4f}")


def evolve_incremental(tasks, cfg, workdir: str, revisit: bool = False) -> dict[str, Any]:
    """Adds tasks one by one, evolving each; checks earlier tasks' predictions after each."""
    from mu2net.evolution.evaluation import evaluate_path
    from mu2net.evolution.live import add_tasks_to_store
    from mu2net.evolution.loop import Evolver
    from mu2net.evolution.main import open_or_create
    from mu2net.system.store import Store

    url = os.path.join(workdir, "evolved")
    store = open_or_create(url, cfg)
    preds: dict[str, np.ndarray] = {}
    out: dict[str, Any] = {"tasks": {}, "immunity": []}
    for i, task in enumerate(tasks):
        add_tasks_to_store(store, [task])
        t0 = time.time()
        summaries = Evolver(store, cfg, progress=False, log=log).run()
        wall = time.time() - t0
        system = Store.open(url).load()  # fresh read from disk, as a serving process would
        out["immunity"] += _immunity(system, tasks[:i], preds, task)
        acc, preds[task], _ = evaluate_path(system, task)
        out["tasks"][task] = {"test": acc, "seconds": wall, **_spent(summaries, task)}
    if revisit:
        revisit_all(store, tasks, cfg, out, preds)
    system = Store.open(url).load()
    root = [r for r in system.roots() if r.family == cfg.family][0]
    root_params = system.path_params(root)
    for task in tasks:
        path = system.best_path(task)
        out["tasks"][task]["accounted_params"] = system.accounted_params(path)
        out["tasks"][task]["path_params"] = system.path_params(path)
        out["tasks"][task]["test_recorded"] = path.metrics.get("test_quality")
        out["tasks"][task]["validation"] = path.metrics.get("quality")
    out["added_params"] = system.total_params() - root_params
    out["root_params"] = root_params
    out["system"] = system
    return out


def evolve_alone(task: str, cfg, workdir: str) -> dict[str, Any]:
    """``task`` evolved in a system that holds only the root (no transfer from other tasks)."""
    from mu2net.evolution.live import add_tasks_to_store
    from mu2net.evolution.loop import Evolver
    from mu2net.evolution.main import open_or_create

    url = os.path.join(workdir, "alone_" + task.replace(":", "_"))
    store = open_or_create(url, cfg)
    add_tasks_to_store(store, [task])
    t0 = time.time()
    Evolver(store, cfg, progress=False, log=log).run()
    system = store.load()
    path = system.best_path(task)
    mine = [h for h in store.history() if h.get("event") == "task_iteration" and h["task"] == task]
    return {
        "test": path.metrics["test_quality"],
        "seconds": time.time() - t0,
        "examples": sum(h["examples"] for h in mine),
        "flops": sum(h["flops"] for h in mine),
        "accounted_params": system.accounted_params(path),
    }


def _baseline_record(r, accounted_params: float) -> dict[str, Any]:
    """The JSON record of one ``run_baseline`` result."""
    return {
        "test": r.test,
        "validation": r.validation,
        "seconds": r.seconds,
        "examples": r.examples,
        "flops": r.flops,
        "hparams": {k: v for k, v in r.hparams.items() if k.startswith("opt_")},
        "trainable_params": r.trainable_params,
        "path_params": r.path_params,
        "accounted_params": accounted_params,
    }


def _kind_config(cfg, kind: str, task: str, budgets):
    """(baseline kind, config) of a kind with an optional ``@variant``; errors name the kind.

    ``@same_examples`` trains ``candidates_per_generation`` times longer, so it processes as
    many training examples as the evolved task iteration. ``@flops`` / ``@seconds`` give it
    exactly the FLOPs / wall seconds the evolved task iteration of the same seed spent.
    """
    import dataclasses

    base_kind, _, variant = kind.partition("@")
    if not variant:
        return base_kind, cfg
    if variant == "same_examples":
        return base_kind, dataclasses.replace(
            cfg, num_validations=cfg.num_validations * cfg.candidates_per_generation
        )
    if variant in ("flops", "seconds"):
        if not budgets or task not in budgets:
            raise ValueError(f"{kind!r} needs the evolved part of the same run (--parts evolved)")
        return base_kind, dataclasses.replace(
            cfg,
            budget_flops=budgets[task]["flops"] if variant == "flops" else 0.0,
            budget_seconds=budgets[task]["seconds"] if variant == "seconds" else 0.0,
        )
    raise ValueError(f"unknown baseline variant {variant!r} in {kind!r}")


def baselines(system, cfg, tasks, kinds, seed: int, budgets=None) -> dict[str, dict[str, Any]]:
    """Runs every baseline kind on every task; params accounted as if the tasks shared the root.

    ``budgets``: {task: {"flops", "seconds"}} the evolved run spent (for ``@flops``/``@seconds``).
    """
    from mu2net.evolution.baselines import run_baseline

    out: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        res = {}
        for task in tasks:
            base_kind, kcfg = _kind_config(cfg, kind, task, budgets)
            r = run_baseline(system, kcfg, task, base_kind, seed=seed)
            frozen = r.path_params - r.trainable_params
            res[task] = _baseline_record(r, r.trainable_params + frozen / len(tasks))
            log(
                f"  {kind:>24} {task}: test {r.test:.4f} ({r.seconds:.0f}s, {r.examples} ex, "
                f"{r.flops / 1e12:.2f} TFLOPs)"
            )
        res["_added_params"] = sum(v["trainable_params"] for v in res.values())
        out[kind.replace(":", "_").replace("@", "_")] = res
    return out


def scratch(tasks, cfg, seed: int, workdir: str, budgets=None) -> dict[str, Any]:
    """A random-init small ViT per task trained fully with the fine-tune-all budget.

    With ``budgets`` it gets the evolved task iteration's FLOPs instead (``scratch_vit_flops``).
    """
    import dataclasses

    from mu2net.evolution.baselines import run_baseline
    from mu2net.evolution.main import open_or_create

    vcfg = dataclasses.replace(
        cfg,
        family="vit",
        pretrained=False,
        checkpoint="",
        root_hparams=dict(SCRATCH_VIT),
        defaults={**cfg.defaults, "ds_image_size": 64, "opt_lr": 0.05},
    )
    store = open_or_create(os.path.join(workdir, "scratch_vit"), vcfg)
    system = store.load()
    name = "scratch_vit_flops" if budgets else "scratch_vit"
    res = {}
    for task in tasks:
        _, tcfg = _kind_config(vcfg, "finetune_all@flops" if budgets else "", task, budgets)
        r = run_baseline(system, tcfg, task, "finetune_all", seed=seed)
        res[task] = _baseline_record(r, r.path_params)
        log(f"  {name:>24} {task}: test {r.test:.4f} ({r.seconds:.0f}s)")
    res["_added_params"] = sum(v["path_params"] for v in res.values())
    return {name: res}


def evolved_budgets(path: str, seed: int) -> dict[str, dict[str, float]]:
    """{task: {"flops", "seconds"}} of the evolved run of ``seed`` in a results JSON."""
    import json

    with open(path) as f:
        runs = json.load(f)["_raw"]["runs"]
    out = {}
    # The evolved row of that file, whatever its --evolved_label ("evolved", "evolved_1x4"...).
    label = next((m for m in runs if m.startswith("evolved")), "evolved")
    for task, recs in runs.get(label, {}).items():
        for r in recs:
            if isinstance(r, dict) and r.get("seed") == seed and "flops" in r:
                out[task] = {"flops": r["flops"], "seconds": r["seconds"]}
    if not out:
        raise SystemExit(f"{path}: no evolved run of seed {seed} with FLOPs recorded")
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """All methods x seeds; returns the JSON document."""
    tasks = (
        list(args.tasks.split(","))
        if args.tasks
        else list(TEXT_TASKS if args.text else SUITES[args.suite])
    )
    missing = [t for t in tasks if not _registered(t)]
    if missing:
        raise SystemExit(f"tasks not registered: {missing} (Debian data: run `make suite-data`)")
    gin_file = "experiments/text_minilm.gin" if args.text else common.DEFAULT_GIN
    bindings = list(args.gin_bindings)
    if args.quick:
        tasks = tasks[:2]
        bindings += [
            "EvolutionConfig.train_examples_between_validations = 64",
            "EvolutionConfig.validation_examples = 64",
        ]
    kinds = (
        args.baselines.split(",")
        if args.baselines
        else (
            [f"{k}@flops" for k in EQUAL_TEXT] + ["finetune_all@seconds", "finetune_all"]
            if args.text
            else [f"{k}@flops" for k in EQUAL_IMAGE] + ["finetune_all@seconds", "finetune_all"]
        )
    )
    meta = common.machine()
    meta.update(
        tasks=tasks,
        gin_file=gin_file,
        gin_bindings=bindings,
        seeds=args.seeds,
        baselines=kinds,
        transfer_seeds=args.transfer_seeds,
    )
    runs: dict[str, dict[str, list]] = {}  # method -> task -> [per-seed record]
    immunity, t_start = [], time.time()

    def add(method: str, task: str, rec: Any) -> None:
        if isinstance(rec, dict):
            rec = {**rec, "seed": seed}
        runs.setdefault(method, {}).setdefault(task, []).append(rec)

    parts = set(args.parts.split(","))

    def checkpoint() -> None:
        # Partial results survive a kill: the document is rewritten after every method.
        meta["seconds"] = time.time() - t_start
        meta["load_average_end"] = common.load_average()
        if args.checkpoint and runs:
            common.write_json(args.checkpoint, _document(runs, tasks, immunity, meta))

    for seed in range(args.seed_offset, args.seed_offset + args.seeds):
        cfg = _config(gin_file, bindings, seed)
        meta["config"] = {k: v for k, v in vars(cfg).items()}
        workdir = tempfile.mkdtemp(prefix=f"mu2net_quality_s{seed}_")
        try:
            budgets = evolved_budgets(args.budgets_from, seed) if args.budgets_from else None
            if "evolved" in parts:
                log(f"seed {seed}: evolving {tasks} one by one")
                evo = evolve_incremental(tasks, cfg, workdir, args.revisit)
                budgets = {
                    t: {"flops": r["flops"], "seconds": r["seconds"]}
                    for t, r in evo["tasks"].items()
                }
                for task, rec in evo["tasks"].items():
                    add(args.evolved_label, task, rec)
                    log(f"  {args.evolved_label:>16} {task}: test {rec['test']:.4f}")
                add(args.evolved_label, "_added_params", evo["added_params"])
                meta["root_params"] = evo["root_params"]
                immunity += [{**r, "seed": seed} for r in evo["immunity"]]
                system = evo["system"]
                checkpoint()
            else:
                from mu2net.evolution.main import open_or_create

                system = open_or_create(os.path.join(workdir, "root_only"), cfg).load()
            if "alone" in parts and seed - args.seed_offset < args.transfer_seeds:
                alone = tasks[1:] if args.transfer_tasks == "all" else tasks[-1:]
                for task in alone:
                    rec = evolve_alone(task, cfg, workdir)
                    add("alone", task, rec)
                    log(f"  {'alone':>16} {task}: test {rec['test']:.4f}")
                checkpoint()
            if "baselines" in parts:
                for kind in kinds:
                    for method, res in baselines(system, cfg, tasks, [kind], seed, budgets).items():
                        for task, rec in res.items():
                            add(method, task, rec)
                    checkpoint()
            if "scratch" in parts and not args.text:
                for method, res in scratch(tasks, cfg, seed, workdir).items():
                    for task, rec in res.items():
                        add(method, task, rec)
                checkpoint()
            if "scratch_flops" in parts and not args.text:
                for method, res in scratch(tasks, cfg, seed, workdir, budgets).items():
                    for task, rec in res.items():
                        add(method, task, rec)
                checkpoint()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    meta["seconds"] = time.time() - t_start
    meta["load_average_end"] = common.load_average()
    return _document(runs, tasks, immunity, meta)


def merge(paths: list[str], rename: dict[str, str] | None = None) -> dict[str, Any]:
    """One document from several runs' JSON files (e.g. seeds run in parallel processes).

    ``rename`` maps a file's method label to the merged one (``evolved_1x4`` -> ``evolved``).
    """
    import json

    runs: dict[str, dict[str, list]] = {}
    immunity, meta = [], None
    for path in paths:
        with open(path) as f:
            doc = json.load(f)
        for label, per_task in doc["_raw"]["runs"].items():
            method = (rename or {}).get(label, label)
            for task, recs in per_task.items():
                have = runs.setdefault(method, {}).setdefault(task, [])
                seen = {r["seed"] for r in have if isinstance(r, dict)}
                # A (method, task, seed) run in two files counts once: the first file wins.
                have.extend(r for r in recs if not isinstance(r, dict) or r["seed"] not in seen)
        immunity += doc["_raw"]["immunity"]
        if meta is None:
            meta = dict(doc["_meta"])
            meta["merged_from"] = []
        meta["merged_from"].append(
            {
                "file": path,
                "seconds": doc["_meta"]["seconds"],
                "load_average_start": doc["_meta"]["load_average_start"],
                "load_average_end": doc["_meta"]["load_average_end"],
            }
        )
    meta["seeds"] = sorted(
        {
            r["seed"]
            for per in runs.values()
            for recs in per.values()
            for r in recs
            if isinstance(r, dict)
        }
    )
    meta["load_average_end"] = max(m["load_average_end"] for m in meta["merged_from"])
    return _document(runs, meta["tasks"], immunity, meta)


def _document(runs, tasks, immunity, meta) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for method, per_task in runs.items():
        entry: dict[str, Any] = {}
        for task in tasks:
            recs = per_task.get(task, [])
            if not recs:
                continue
            entry[task] = common.mean_std([r["test"] for r in recs])
            for key in ("accounted_params", "seconds", "examples", "flops"):
                entry[task][key] = common.mean_std([r.get(key) for r in recs])["mean"]
        if entry:
            entry["average"] = common.mean_std(
                [
                    np.mean([per_task[t][i]["test"] for t in tasks if t in per_task])
                    for i in range(min(len(per_task[t]) for t in tasks if t in per_task))
                ]
            )
            # Inside "average" so every value of a method is a {"mean", ...} dict (demo.py).
            added = common.mean_std(per_task.get("_added_params", []))["mean"]
            entry["average"]["added_params"] = added
        doc[method] = entry
    doc["_immunity"] = {
        "changed_predictions": int(sum(r["changed"] for r in immunity)),
        "checks": immunity,
    }
    if "alone" in runs and "evolved" in runs:
        doc["_transfer"] = {}
        for t, recs in runs["alone"].items():
            if t.startswith("_"):
                continue
            seeds = [r["seed"] for r in recs]
            evo = {r["seed"]: r["test"] for r in runs["evolved"][t]}
            doc["_transfer"][t] = {
                "seeds": seeds,
                "with_earlier_tasks": [evo[sd] for sd in seeds],
                "alone": [r["test"] for r in recs],
            }
    doc["_meta"] = meta
    doc["_raw"] = {"runs": runs, "immunity": immunity}
    return doc


def print_table(doc: dict[str, Any]) -> None:
    """The one table: methods x (tasks, average, params, examples, time)."""
    tasks = doc["_meta"]["tasks"]
    short = [t.split(":")[-1] for t in tasks]
    headers = [
        "method",
        *short,
        "average",
        "acct params/task",
        "params added",
        "train ex/task",
        "TFLOPs/task",
        "s/task",
    ]
    rows = []
    for method, entry in doc.items():
        if method.startswith("_"):
            continue
        per = [entry[t] for t in tasks if t in entry]
        acct = np.mean([e["accounted_params"] for e in per]) if per else float("nan")
        ex = np.mean([e["examples"] for e in per if e.get("examples")] or [float("nan")])
        sec = np.mean([e["seconds"] for e in per])
        tfl = np.mean([e["flops"] for e in per if e.get("flops")] or [float("nan")]) / 1e12
        added = entry["average"].get("added_params")
        rows.append(
            [
                method,
                *[common.pm(entry[t]) if t in entry else "-" for t in tasks],
                common.pm(entry["average"]),
                f"{acct:,.0f}",
                f"{added:,.0f}" if added is not None else "-",
                f"{ex:,.0f}" if np.isfinite(ex) else "-",
                f"{tfl:.2f}" if np.isfinite(tfl) else "-",
                f"{sec:.0f}",
            ]
        )
    print(common.table(headers, rows))
    imm = doc["_immunity"]
    seeds = doc["_meta"]["seeds"]
    print(
        f"\nimmunity: {imm['changed_predictions']} changed test predictions of earlier tasks "
        f"over {len(imm['checks'])} checks ({sum(c['examples'] for c in imm['checks'])} "
        f"predictions); seeds={seeds}; mean±std over seeds; 'alone' = evolved without the "
        f"earlier tasks (transfer: evolved - alone); load avg "
        f"{doc['_meta']['load_average_start'][0]:.1f}->{doc['_meta']['load_average_end'][0]:.1f}"
    )


def pareto_plot(doc: dict[str, Any], path: str) -> str:
    """Mean test accuracy vs accounted params per task; marker area = TFLOPs per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = doc["_meta"]["tasks"]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for method, entry in doc.items():
        per = [] if method.startswith("_") else [entry[t] for t in tasks if t in entry]
        if not per:
            continue
        params = np.mean([e["accounted_params"] for e in per]) / 1e6
        tflops = np.mean([e["flops"] or 0.0 for e in per]) / 1e12
        avg = entry["average"]
        ax.errorbar(params, avg["mean"], yerr=avg["std"] or 0.0, fmt="none", ecolor="grey")
        ax.scatter(params, avg["mean"], s=60 + 400 * tflops, alpha=0.6)
        n = len(avg["runs"])
        ax.annotate(f"{method} ({n} seed{'s' * (n > 1)})", (params, avg["mean"]), fontsize=7,
                    xytext=(5, 3), textcoords="offset points")  # fmt: skip
    ax.set_xlabel("accounted params per task (M)")
    ax.set_ylabel("mean test accuracy over the suite")
    ax.set_title("Quality vs params per task (marker area ~ TFLOPs per task)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _print_transfer(doc: dict[str, Any]) -> None:
    for t, tr in doc.get("_transfer", {}).items():
        w, a = np.mean(tr["with_earlier_tasks"]), np.mean(tr["alone"])
        print(
            f"transfer {t}: evolved after the earlier tasks {w:.4f} vs alone {a:.4f} "
            f"(delta {w - a:+.4f}, seeds {tr['seeds']})"
        )


def main(argv=None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--seed_offset", type=int, default=0, help="first seed (parallel runs)")
    p.add_argument("--merge", nargs="+", default=None, help="merge these JSON files and print")
    p.add_argument(
        "--transfer_seeds",
        type=int,
        default=1,
        help="seeds for which the 'alone' (no earlier tasks) runs are done",
    )
    p.add_argument(
        "--transfer_tasks",
        choices=("last", "all"),
        default="last",
        help="which tasks get an 'alone' run: the last added (default) or every later one",
    )
    p.add_argument("--tasks", default="", help="comma-separated tasks (default: the suite)")
    p.add_argument("--baselines", default="", help="comma-separated baseline kinds")
    p.add_argument("--text", action="store_true", help="text suite on the MiniLM root")
    p.add_argument("--suite", choices=sorted(SUITES), default="images4", help="image suite")
    p.add_argument(
        "--revisit",
        action="store_true",
        help="after the last addition, a second task iteration of every task (µ2Net+), "
        "checking immunity after each",
    )
    p.add_argument("--quick", action="store_true", help="tiny budget and 2 tasks (smoke test)")
    p.add_argument(
        "--parts",
        default="evolved,alone,baselines,scratch_flops",
        help="comma-separated parts to run (split them over processes, then --merge)",
    )
    p.add_argument(
        "--checkpoint", default="", help="rewrite benchmarks/<NAME>.json after every method"
    )
    p.add_argument(
        "--gin_bindings",
        action="append",
        default=[],
        help="extra gin bindings, e.g. EvolutionConfig.num_cycles=2",
    )
    p.add_argument(
        "--evolved_label",
        default="evolved",
        help="row name of the evolved system (e.g. for a variant run with --gin_bindings)",
    )
    p.add_argument(
        "--budgets_from",
        default="",
        help="results JSON whose evolved runs set the @flops/@seconds budgets (per seed)",
    )
    p.add_argument("--out", default="", help="JSON name (default quality / quality_text)")
    p.add_argument(
        "--rename", default="", help="with --merge: OLD=NEW method labels, comma-separated"
    )
    p.add_argument("--plot", action="store_true", help="also write the Pareto plot (<name>.png)")
    args = p.parse_args(argv)
    import mu2net.models.vit  # noqa: F401  (registers the families)
    import mu2net.tasks  # noqa: F401

    rename = dict(kv.split("=", 1) for kv in args.rename.split(",") if kv)
    doc = merge(args.merge, rename) if args.merge else run(args)
    # A checkpointed part run ends in its own file; only a full run or a merge is the result.
    name = args.out or args.checkpoint or ("quality_text" if args.text else "quality")
    if args.quick and not args.out:
        name += "_quick"
    path = common.write_json(name, doc)
    print_table(doc)
    _print_transfer(doc)
    if args.plot:
        png = pareto_plot(doc, os.path.join(common.HERE, name + ".png"))
        print(f"wrote {png}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
