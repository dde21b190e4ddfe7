"""The embedded default run (``make demo`` / ``mu2net demo``).

Evolves the bundled real image tasks from the pretrained EfficientNet-Lite0 root with
``gin/experiments/default.gin``, then trains the fine-tune-all baseline here, per task, with
the same training + validation FLOPs the task's evolution spent (XLA's count, see
:mod:`mu2net.evolution.budget`), and prints one table: test accuracy of both, the compute
each used (FLOPs and seconds), params per task and sharing. Re-running resumes from the
store (``--fresh`` starts over); the baseline is trained again on every run.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time

DEMO_TASKS = ("mu2net:digits", "mu2net:mnist5k", "mu2net:animal_mnist", "mu2net:lfw_faces")


def run_demo(store_url: str, fresh: bool = False, progress: bool = True) -> list[list[str]]:
    """Runs the default experiment into ``store_url`` and prints the results table."""
    import argparse

    from mu2net import gin_utils
    from mu2net.evolution.budget import compute_by_task
    from mu2net.evolution.config import EvolutionConfig
    from mu2net.evolution.live import add_tasks_to_store
    from mu2net.evolution.loop import Evolver
    from mu2net.evolution.main import open_or_create

    if fresh and os.path.exists(store_url):
        shutil.rmtree(store_url)
    args = argparse.Namespace(
        gin_file=["experiments/default.gin"], gin_bindings=[], gin_search_paths=""
    )
    gin_utils.parse_gin(args)
    config = EvolutionConfig()
    t0 = time.time()
    print(
        f"mu2net demo: evolving {len(DEMO_TASKS)} bundled image tasks from the pretrained "
        f"{config.family} root into {store_url}, then fine-tuning each with the same FLOPs"
    )
    store = open_or_create(store_url, config, system_name="demo")
    add_tasks_to_store(store, DEMO_TASKS)
    evolver = Evolver(
        store, config, logdir=os.path.join(store_url, "tensorboard"), progress=progress
    )
    evolver.run()
    t_evolve = time.time() - t0
    system = store.load()
    spent = compute_by_task(store.history())
    rows = [_row(system, config, task, spent.get(task, {})) for task in DEMO_TASKS]
    _print_table(rows)
    total = system.total_params()
    print(
        f"\nsystem: {len(DEMO_TASKS)} tasks, {total:,} params in use "
        f"({total / len(DEMO_TASKS):,.0f} per task); evolution {t_evolve:.0f}s, "
        f"total {time.time() - t0:.0f}s. Inspect with `mu2net status --store {store_url}` "
        f"and `mu2net report --store {store_url} --out report/`."
    )
    return rows


def _row(system, config, task: str, spent: dict) -> list[str]:
    """One task's row: evolved vs fine-tune all at the evolved run's FLOPs."""
    from mu2net.evolution.baselines import run_baseline

    path = system.best_path(task)
    flops = float(spent.get("flops", 0.0))
    # Without a recorded spend (a store from before compute accounting) the reference's
    # interval budget is used, and the row says so.
    cfg = dataclasses.replace(config, budget_flops=flops) if flops else config
    tuned = run_baseline(system, cfg, task, "finetune_all", seed=config.seed)
    comps = system.path_components(path)
    shared = sum(1 for c in comps.values() if len(c.locks) > 1)
    return [
        task,
        f"{path.metrics.get('test_quality', float('nan')):.4f}",
        f"{tuned.test:.4f}",
        f"{flops / 1e12:.2f}" if flops else "-",
        f"{tuned.flops / 1e12:.2f}",
        f"{spent.get('seconds', 0.0):.0f}",
        f"{tuned.seconds:.0f}",
        f"{system.accounted_params(path):,.0f}",
        f"{tuned.path_params:,}",
        f"{shared}/{len(comps)}",
    ]


def _print_table(rows: list[list[str]]) -> None:
    from mu2net.text_table import table

    headers = [
        "task",
        "evolved test",
        "fine-tune all test",
        "evolved TFLOPs",
        "fine-tune TFLOPs",
        "evolved s",
        "fine-tune s",
        "params/task (evolved, accounted)",
        "params/task (fine-tune)",
        "components shared",
    ]
    print()
    print(table(headers, rows))
    wins = sum(float(r[1]) >= float(r[2]) for r in rows)
    evo = sum(float(r[1]) for r in rows) / len(rows)
    ft = sum(float(r[2]) for r in rows) / len(rows)
    print(
        f"\naverage test accuracy: evolved {evo:.4f}, fine-tune all {ft:.4f} at the same FLOPs "
        f"per task; evolved >= fine-tune on {wins}/{len(rows)} tasks"
    )
