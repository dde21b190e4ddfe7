"""The embedded default run (``make demo`` / ``mu2net demo``).

Evolves the bundled real image tasks from the pretrained EfficientNet-Lite0 root with
``gin/experiments/default.gin``, then prints one table: test accuracy of the evolved system
next to a linear probe trained here with the same per-task budget, the fine-tune-all baseline
(measured by ``benchmarks/quality.py`` and read from its JSON, labelled so), params per task
and sharing. Re-running resumes from the store (``--fresh`` starts over).
"""

from __future__ import annotations

import json
import os
import shutil
import time

DEMO_TASKS = ("mu2net:digits", "mu2net:mnist5k", "mu2net:animal_mnist", "mu2net:lfw_faces")
QUALITY_JSON = os.path.join("benchmarks", "quality.json")


def _cached_finetune() -> dict[str, float]:
    """Fine-tune-all test accuracy per task from the last quality benchmark, if present."""
    for base in (os.getcwd(), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))):
        path = os.path.join(base, QUALITY_JSON)
        if os.path.exists(path):
            with open(path) as f:
                doc = json.load(f)
            return {t: v["mean"] for t, v in doc.get("finetune_all", {}).items()}
    return {}


def run_demo(store_url: str, fresh: bool = False, progress: bool = True) -> list[list[str]]:
    """Runs the default experiment into ``store_url`` and prints the results table."""
    import argparse

    from mu2net import gin_utils
    from mu2net.evolution.baselines import run_baseline
    from mu2net.evolution.config import EvolutionConfig
    from mu2net.evolution.live import add_tasks_to_store
    from mu2net.evolution.loop import Evolver
    from mu2net.evolution.main import open_or_create
    from mu2net.text_table import table

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
        f"{config.family} root into {store_url}"
    )
    store = open_or_create(store_url, config, system_name="demo")
    add_tasks_to_store(store, DEMO_TASKS)
    evolver = Evolver(
        store, config, logdir=os.path.join(store_url, "tensorboard"), progress=progress
    )
    evolver.run()
    t_evolve = time.time() - t0
    system = store.load()
    finetune = _cached_finetune()
    rows = []
    for task in DEMO_TASKS:
        path = system.best_path(task)
        probe = run_baseline(system, config, task, "linear_probe", seed=config.seed)
        comps = system.path_components(path)
        shared = sum(1 for c in comps.values() if len(c.locks) > 1)
        rows.append(
            [
                task,
                f"{path.metrics.get('test_quality', float('nan')):.4f}",
                f"{probe.test:.4f}",
                f"{finetune[task]:.4f} (cached)" if task in finetune else "- (run benchmarks)",
                f"{system.accounted_params(path):,.0f}",
                f"{shared}/{len(comps)}",
            ]
        )
    print()
    print(
        table(
            [
                "task",
                "evolved test acc",
                "linear probe",
                "fine-tune all",
                "params/task (accounted)",
                "components shared",
            ],
            rows,
        )
    )
    total = system.total_params()
    print(
        f"\nsystem: {len(DEMO_TASKS)} tasks, {total:,} params in use "
        f"({total / len(DEMO_TASKS):,.0f} per task); evolution {t_evolve:.0f}s, "
        f"total {time.time() - t0:.0f}s. Inspect with `mu2net status --store {store_url}` "
        f"and `mu2net report --store {store_url} --out report/`."
    )
    return rows
