"""Compile share of real evolution: one executable per clone set vs one per lowest component.

    python benchmarks/generation.py [--tasks mu2net:digits,mu2net:mnist5k] [--samples 8]

Runs the embedded default (``gin/experiments/default.gin``: EfficientNet-Lite0 at 64 px) with
:class:`mu2net.evolution.loop.Evolver` once per mode, each in a fresh process with JAX's persistent
compile cache off (so every new executable really compiles), same seed and tasks:

* ``per clone set``: ``EvolutionConfig.suffix_executables = False``: the train step is keyed
  by the exact trainable component set, so nearly every candidate compiles its own step.
* ``per lowest component``: ``True`` (the default): frozen components above the lowest
  trainable one are differentiated with a zero runtime mask, so every candidate whose lowest
  clone is in the same place (after frozen-prefix caching: the same suffix) reuses one step.
* ``per lowest component without prefix cache`` (only with ``--modes``): also
  ``EvolutionConfig.prefix_cache = False``, so every step of every candidate recomputes the
  frozen prefix: the before/after of frozen-prefix caching.

Columns, summed over every candidate of the run (from the store's history): candidates, train
+ eval compiles, compile seconds, training seconds (steps only), the compile share of the
candidates' time, wall time of the evolution, and the average test accuracy of the tasks (the
maths is the same, so accuracies should agree up to float rounding and the search decisions it
may flip). Prints one table and writes ``benchmarks/generation.json`` (``--out`` to rename).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

# mode -> (suffix_executables, prefix_cache)
MODES = {
    "per clone set": (False, True),
    "per lowest component": (True, True),
    "per lowest component without prefix cache": (True, False),
}


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One evolution run in this process; returns its compile/train accounting."""
    os.environ["MU2NET_JAX_CACHE_DIR"] = ""
    from mu2net.evolution.config import EvolutionConfig
    from mu2net.evolution.evaluation import evaluate_path
    from mu2net.evolution.live import add_tasks_to_store
    from mu2net.evolution.loop import Evolver
    from mu2net.evolution.main import open_or_create

    bindings = [
        f"EvolutionConfig.suffix_executables = {args.suffix}",
        f"EvolutionConfig.prefix_cache = {args.prefix}",
        f"EvolutionConfig.samples_per_task_iteration = {args.samples}",
        f"EvolutionConfig.candidates_per_generation = {args.per_generation}",
    ]
    common.parse_gin([common.DEFAULT_GIN], bindings)
    cfg = EvolutionConfig()
    tasks = args.tasks.split(",")
    with tempfile.TemporaryDirectory(prefix="mu2net_generation_") as tmp:
        store = open_or_create(os.path.join(tmp, "store"), cfg)
        add_tasks_to_store(store, tasks)
        t0 = time.perf_counter()
        Evolver(store, cfg, progress=False, log=lambda m: None).run()
        wall = time.perf_counter() - t0
        system = store.load()
        history = [h for h in store.history() if "path" in h and "timings" in h]
        accs = {t: float(evaluate_path(system, t)[0]) for t in tasks}
    timings = [h["timings"] for h in history]
    total = sum(t.get("total_s", 0.0) for t in timings)
    compile_s = sum(t.get("compile_s", 0.0) for t in timings)
    return {
        "candidates": len(history),
        "compiles": sum(int(h.get("num_compiles", 0)) for h in history),
        "compile_s": compile_s,
        "train_s": sum(t.get("train_s", 0.0) for t in timings),
        "candidate_s": total,
        "compile_share": compile_s / max(total, 1e-9),
        "wall_s": wall,
        "test": accs,
        "average_test": sum(accs.values()) / len(accs),
    }


def main(argv=None) -> int:
    """Entry point: runs both modes in subprocesses and prints the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="mu2net:digits,mu2net:mnist5k")
    p.add_argument("--samples", type=int, default=8, help="candidates per task iteration")
    p.add_argument("--per_generation", type=int, default=4, help="candidates per generation")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--suffix", default="True", help=argparse.SUPPRESS)
    p.add_argument("--prefix", default="True", help=argparse.SUPPRESS)
    p.add_argument(
        "--modes",
        default="per clone set,per lowest component",
        help=f"comma-separated subset of: {', '.join(MODES)}",
    )
    p.add_argument("--out", default="generation", help="JSON name")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    doc: dict[str, Any] = {"_meta": common.machine()}
    doc["_meta"].update(tasks=args.tasks.split(","), samples=args.samples)
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"unknown modes {unknown}; choose from {list(MODES)}")
    for mode in modes:
        suffix, prefix = MODES[mode]
        print(f"running: {mode}", file=sys.stderr, flush=True)
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            "--suffix",
            str(suffix),
            "--prefix",
            str(prefix),
        ]
        cmd += ["--tasks", args.tasks, "--samples", str(args.samples)]
        cmd += ["--per_generation", str(args.per_generation)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        doc[mode] = json.loads(out.strip().splitlines()[-1])
    doc["_meta"]["load_average_end"] = common.load_average()
    rows = [
        [
            mode,
            r["candidates"],
            r["compiles"],
            f"{r['compile_s']:.0f}",
            f"{r['train_s']:.0f}",
            f"{100 * r['compile_share']:.0f}%",
            f"{r['wall_s']:.0f}",
            f"{r['average_test']:.4f}",
        ]
        for mode, r in doc.items()
        if not mode.startswith("_")
    ]
    headers = ["train step compiled", "cands", "compiles", "compile s", "train s", "compile share"]
    print(common.table([*headers, "wall s", "avg test"], rows))
    a, b = doc[modes[0]], doc[modes[-1]]
    print(
        f"\nwall ratio first/last mode {a['wall_s'] / b['wall_s']:.2f}x; load avg "
        f"{doc['_meta']['load_average_start'][0]:.1f}->{doc['_meta']['load_average_end'][0]:.1f}"
    )
    common.write_json(args.out, doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
