"""Launch benchmark: N agents as Ray tasks on a local cluster vs the same agents in one process.

Measures, on this machine (tiny MLP agents of ``tests/data/launch_mlp.gin``, one task each,
every agent in its own agent class so all runs do the same work):

* ``ray_cold_s``: wall time of ``mu2net launch``'s library call with N agents on a fresh
  local Ray (workers start and import mu2net: the launcher's cost per agent start);
* ``ray_warm_s``: the same N agents again on a fresh store (Ray reuses the workers);
* ``one_process_s``: the same N agents one after another in this process (after a warm-up
  run of each, so compile caches are as warm as the reused workers');
* ``start_latency_s``: per agent, submission to the worker's first report (cold and warm);
* ``overhead_per_iteration_s``: (agent's wall in the launcher - its ``run_agent`` time in the
  worker) / iterations, warm: what Ray and the launcher add around the work;
* ``actor_call_ms``: one log relay (a Ray actor call), the only per-iteration cost inside.

    python benchmarks/launch.py --agents 2 --cycles 2 --out benchmarks/launch.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
GIN = os.path.join(REPO, "tests", "data", "launch_mlp.gin")
TASKS = ["mu2net:digits_pair_01", "mu2net:digits_pair_23", "mu2net:digits_pair_45",
         "mu2net:digits_pair_67"]  # fmt: skip


def specs(n: int):
    """N agents, one task each, each its own agent class (hidden width)."""
    from mu2net.evolution.launch import AgentSpec

    return [
        AgentSpec(f"b{i}", (TASKS[i],), gin_bindings=(
            f"EvolutionConfig.root_hparams = {{'ds_image_size': 8, 'hidden_dim': {8 + 4 * i}}}",
        ))
        for i in range(n)
    ]  # fmt: skip


def options(url: str, cycles: int, run_dir: str):
    """Launch options of the benchmark (no TensorBoard, short lease)."""
    from mu2net.evolution.launch import LaunchOptions

    return LaunchOptions(store=url, gin_files=(GIN,), modules=("launch_toy",), cycles=cycles,
                         lease_ttl_s=5.0, table_seconds=30.0, run_dir=run_dir, logdir="",
                         validate_tasks=False)  # fmt: skip


def ray_run(n: int, cycles: int, tmp: str, tag: str) -> dict:
    """One launch of N agents; wall time, start latencies and per-iteration overhead."""
    from mu2net.evolution.launch import Launcher

    url = os.path.join(tmp, f"store-{tag}")
    t0 = time.time()
    launcher = Launcher(options(url, cycles, os.path.join(tmp, f"run-{tag}")), specs(n),
                        out=lambda s: None)  # fmt: skip
    launcher.start()
    runs = launcher.run()
    wall = time.time() - t0
    bad = {k: r.error for k, r in runs.items() if r.state != "done"}
    if bad:
        raise SystemExit(f"agents failed: {bad}")
    starts = [r.started - r.submitted for r in runs.values()]
    over = [
        (r.finished - r.started - r.result["seconds"]) / max(1, r.result["iterations"])
        for r in runs.values()
    ]
    return {"wall_s": wall, "start_latency_s": starts, "overhead_per_iteration_s": over,
            "iterations": sum(r.result["iterations"] for r in runs.values())}  # fmt: skip


def one_process(n: int, cycles: int, tmp: str) -> float:
    """The same N agents one after another in this process (after warming every one up)."""
    from mu2net.evolution.agents import run_agent
    from mu2net.evolution.launch import import_modules, plan

    import_modules(["launch_toy"])
    quiet = dict(log=lambda s: None, validate_tasks=False)
    warm_url = os.path.join(tmp, "store-warm")
    for p in plan(specs(n), options(warm_url, 1, tmp)):  # compile caches as warm as the workers'
        run_agent(warm_url, p.agent, 1, **quiet)
    url = os.path.join(tmp, "store-seq")
    planned = plan(specs(n), options(url, cycles, tmp))
    t0 = time.time()
    for p in planned:
        run_agent(url, p.agent, p.cycles, **quiet)
    return time.time() - t0


def actor_call_ms(calls: int = 200) -> float:
    """Mean time of one log relay to the launcher's actor."""
    import ray

    from mu2net.evolution.launch import Board

    board = ray.remote(num_cpus=0)(Board).remote()
    ray.get(board.log.remote("x", "warm-up"))
    t0 = time.time()
    ray.get([board.log.remote("x", "line") for _ in range(calls)])
    return 1000 * (time.time() - t0) / calls


def main() -> None:
    """Runs the benchmark and prints one table (and optionally writes JSON)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--agents", type=int, default=2)
    p.add_argument("--cycles", type=int, default=2)
    p.add_argument("--out", default="")
    args = p.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import launch_toy  # noqa: F401  (the benchmark family, also shipped to the workers)
    import ray

    from mu2net.evolution.launch import runtime_env
    from mu2net.text_table import table

    tmp = tempfile.mkdtemp(prefix="mu2net-launch-bench-")
    t0 = time.time()
    for attempt in range(3):  # a loaded machine can miss Ray's 30 s raylet start-up wait
        try:
            ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
                     num_cpus=args.agents, log_to_driver=False,
                     runtime_env=runtime_env(["launch_toy"]))  # fmt: skip
            break
        except Exception:  # noqa: BLE001
            ray.shutdown()
            if attempt == 2:
                raise
    ray_start = time.time() - t0
    cold = ray_run(args.agents, args.cycles, tmp, "cold")
    warm = ray_run(args.agents, args.cycles, tmp, "warm")
    relay = actor_call_ms()
    ray.shutdown()
    seq = one_process(args.agents, args.cycles, tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "agents": args.agents, "cycles": args.cycles, "cpus": os.cpu_count(),
        "ray_start_s": ray_start, "ray_cold_s": cold["wall_s"], "ray_warm_s": warm["wall_s"],
        "one_process_s": seq, "speedup_warm": seq / warm["wall_s"],
        "start_latency_cold_s": cold["start_latency_s"],
        "start_latency_warm_s": warm["start_latency_s"],
        "overhead_per_iteration_warm_s": warm["overhead_per_iteration_s"],
        "actor_call_ms": relay,
    }  # fmt: skip
    rows = [[k, json.dumps(v if not isinstance(v, float) else round(v, 3), default=str)]
            for k, v in result.items()]  # fmt: skip
    print(table(["measure", "value"], rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
