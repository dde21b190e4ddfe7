"""Serving benchmark: ``mu2net serve`` (Ray Serve, real HTTP on 127.0.0.1) vs in-process predict.

For systems of 1, 10 and 50 tasks that share one root and own their heads (random-init params of
``--family``; EfficientNet-Lite0 at 64 px by default, the demo's root), on one local Ray + Serve:

* **served**: ``--clients`` threads of :class:`mu2net.serve.client.Client` send mixed-task traffic
  (each request a uniformly drawn task, ``--examples`` preprocessed examples as a raw ``.npy``
  body, or with ``--body json`` as base64 ``inputs_npy`` in JSON)
  after a warm-up request per task; bounded by ``--requests`` and ``--seconds``. Throughput
  (examples/s) and p50/p99 request latency;
* **in-process**: the same requests through one :class:`~mu2net.serve.PredictorPool` in this
  process, batched per task as the server batches them (``--max_batch_size`` requests), and
  one request at a time (latency);
* **cold load** of one task: ``TaskPredictor.load`` (task index + its components) and its first
  compiled call, in this process, at each system size; served: the first request of a task on
  a warm replica (load, no compile: every task has the same architecture).
* the replica's component cache against the sum of its paths' sizes (memory).

    python benchmarks/serving.py --out benchmarks/serving.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PORT = 18800


def build_store(url: str, n_tasks: int, family_name: str, hparams: dict, seed: int = 0):
    """A root of ``family_name`` and ``n_tasks`` tasks sharing all of it but their own heads."""
    import jax

    from mu2net.models.base import get_family
    from mu2net.system import Path, Store, System, agent_for_task

    family = get_family(family_name)
    hp = {**family.default_hparams(), **hparams}
    params = jax.tree_util.tree_map(np.asarray, family.init(jax.random.PRNGKey(seed), hp))
    store, system = Store.create(url, "bench"), System()
    root = system.add_root(f"root:{family_name}", family_name, params, hp, "root")
    store.commit(system, "root")
    rng = np.random.default_rng(seed)
    for i in range(n_tasks):
        task = f"bench:t{i}"
        agent = agent_for_task(task)
        system.add_task(task, agent)
        head = jax.tree_util.tree_map(
            lambda a: (0.05 * rng.normal(size=a.shape)).astype(a.dtype), params["head"]
        )
        comp = system.new_component("head", family_name, head, agent)
        system.publish(Path(system.new_id(agent, "p"), task, family_name,
                            dict(root.components, head=comp.id), dict(hp), agent,
                            metrics={"quality": 0.5}))  # fmt: skip
        store.commit(system, agent)
    return store


def requests(n_tasks: int, count: int, examples: int, shape, seed: int = 1):
    """``count`` (task, batch) requests with uniformly drawn tasks."""
    rng = np.random.default_rng(seed)
    tasks = rng.integers(0, n_tasks, count)
    return [
        (f"bench:t{t}", rng.uniform(0, 1, (examples, *shape)).astype(np.float32)) for t in tasks
    ]


def percentiles(latencies: list[float]) -> dict[str, float]:
    """p50 / p99 / mean in milliseconds."""
    a = 1000 * np.asarray(latencies)
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean())}  # fmt: skip


def encoded(reqs, body: str) -> list[tuple[str, bytes, str]]:
    """(task, body, content type) per request: raw ``.npy`` bytes or base64 ``.npy`` in JSON."""
    from mu2net.serve.inputs import NPY_CONTENT_TYPE, encode_npy, npy_bytes

    if body == "npy":
        return [(t, npy_bytes(x), NPY_CONTENT_TYPE) for t, x in reqs]
    return [(t, json.dumps({"inputs_npy": encode_npy(x)}).encode(), "application/json")
            for t, x in reqs]  # fmt: skip


def served(url: str, reqs, clients: int, seconds: float, body: str) -> dict:
    """Mixed-task traffic from ``clients`` threads; bounded by count and time."""
    from mu2net.serve.client import Client

    client = Client(url, timeout=120)
    bodies = encoded(reqs, body)
    latencies, errors, lock = [], [], threading.Lock()
    nxt = iter(range(len(bodies)))
    deadline = time.perf_counter() + seconds

    def work():
        while time.perf_counter() < deadline:
            with lock:
                i = next(nxt, None)
            if i is None:
                return
            task, data, content_type = bodies[i]
            t0 = time.perf_counter()
            try:
                client.predict_body(task, data, content_type)
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(repr(e)[:200])
                continue
            with lock:
                latencies.append(time.perf_counter() - t0)

    t0, cpu0 = time.perf_counter(), time.process_time()
    threads = [threading.Thread(target=work) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    client_cpu = time.process_time() - cpu0  # the clients' share of the same cores
    n = len(latencies)
    return {"requests": n, "errors": len(errors), "first_errors": errors[:3], "wall_s": wall,
            "req_per_s": n / wall, "examples_per_s": n * reqs[0][1].shape[0] / wall,
            "client_cpu_s": client_cpu, "client_cores": client_cpu / wall,
            **percentiles(latencies)}  # fmt: skip


def in_process(store_url: str, reqs, max_batch: int, chunk: int) -> dict:
    """The same requests through one pool here: batched per task, and one at a time."""
    from mu2net.serve import PredictorPool

    pool = PredictorPool(store_url, chunk_size=chunk)
    for task, x in {t: x for t, x in reqs}.items():  # load and compile, as the served warm-up
        pool.get(task).predict(task, x)
    by_task: dict[str, list[np.ndarray]] = {}
    for t, x in reqs:
        by_task.setdefault(t, []).append(x)
    t0 = time.perf_counter()
    for t, xs in by_task.items():
        for i in range(0, len(xs), max_batch):
            pool.get(t).predict(t, np.concatenate(xs[i : i + max_batch]))
    batched = time.perf_counter() - t0
    latencies = []
    for t, x in reqs[: min(len(reqs), 150)]:
        t1 = time.perf_counter()
        pool.get(t).predict(t, x)
        latencies.append(time.perf_counter() - t1)
    examples = sum(len(x) for _, x in reqs)
    return {"batched_examples_per_s": examples / batched,
            "one_by_one": percentiles(latencies)}  # fmt: skip


def cold_load(store_url: str, task: str, repeats: int = 3) -> dict:
    """Load (index + components) and first compiled call of one task, fresh each time."""
    from mu2net.serve import TaskPredictor
    from mu2net.serve.predictor import clear_compile_cache

    loads, compiles = [], []
    for _ in range(repeats):
        clear_compile_cache()
        t0 = time.perf_counter()
        pred = TaskPredictor.load(store_url, task)
        t1 = time.perf_counter()
        pred.warm_up()
        compiles.append(time.perf_counter() - t1)
        loads.append(t1 - t0)
        pred.close()
    return {"load_ms_median": 1000 * float(np.median(loads)),
            "load_ms_range": [1000 * min(loads), 1000 * max(loads)],
            "first_call_s_median": float(np.median(compiles))}  # fmt: skip


def first_requests(url: str, n_tasks: int, examples: int, shape) -> list[float]:
    """Latency of each task's first request on the replica (task 0's compiles)."""
    from mu2net.serve.client import Client

    client = Client(url, timeout=300)
    x = np.zeros((examples, *shape), np.float32)
    out = []
    for i in range(n_tasks):
        t0 = time.perf_counter()
        client.predict(f"bench:t{i}", inputs=x)
        out.append(time.perf_counter() - t0)
    return out


def one_system(n: int, args, tmp: str, shape) -> dict:
    """Builds, serves and measures the system of ``n`` tasks."""
    from ray import serve

    from mu2net.serve.app import ServeConfig, deploy

    url = os.path.join(tmp, f"store-{n}")
    t0 = time.perf_counter()
    build_store(url, n, args.family, json.loads(args.hparams))
    built = time.perf_counter() - t0
    config = ServeConfig(store=url, port=PORT, max_batch_size=args.max_batch_size,
                         batch_wait_s=args.batch_wait_ms / 1000, chunk_size=args.chunk,
                         refresh_s=args.refresh_s)  # fmt: skip
    t0 = time.perf_counter()
    app_url = deploy(config, name=f"bench{n}", route_prefix=f"/bench{n}")
    deployed = time.perf_counter() - t0
    try:
        firsts = first_requests(app_url, n, args.examples, shape)
        reqs = requests(n, args.requests, args.examples, shape)
        load_avg = os.getloadavg()[0]
        result = served(app_url, reqs, args.clients, args.seconds, args.body)
        from mu2net.serve.client import Client

        stats = Client(app_url).stats()
    finally:
        serve.delete(f"bench{n}")
    return {
        "tasks": n, "store_build_s": built, "deploy_s": deployed, "load_avg_1min": load_avg,
        "first_request_s": firsts[0],
        "first_request_other_tasks_ms_median": 1000 * float(np.median(firsts[1:] or [0.0])),
        "served": result,
        "in_process": in_process(url, reqs[: result["requests"] or 1], args.max_batch_size,
                                 args.chunk),
        "cold_load_in_process": cold_load(url, "bench:t0"),
        "cache_bytes": stats["bytes"], "path_bytes_sum": stats["path_bytes_sum"],
        "cache_components": stats["components"],
    }  # fmt: skip


def main() -> None:
    """Runs the benchmark, prints one table, optionally writes JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="1,10,50")
    p.add_argument("--family", default="efficientnet_lite0")
    p.add_argument("--hparams", default='{"ds_image_size": 64, "num_classes": 10}')
    p.add_argument("--requests", type=int, default=400, help="timed requests per system")
    p.add_argument("--seconds", type=float, default=45.0, help="bound per system's traffic")
    p.add_argument("--clients", type=int, default=8, help="concurrent client threads")
    p.add_argument("--examples", type=int, default=8, help="examples per request")
    p.add_argument(
        "--body",
        choices=["npy", "json"],
        default="npy",
        help="raw .npy bodies (what Client.predict sends) or base64 .npy in JSON",
    )
    p.add_argument("--chunk", type=int, default=8, help="examples per compiled call")
    p.add_argument("--max_batch_size", type=int, default=8)
    p.add_argument("--batch_wait_ms", type=float, default=2.0)
    p.add_argument("--refresh_s", type=float, default=2.0)
    p.add_argument("--out", default="")
    args = p.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from mu2net.models.base import get_family
    from mu2net.serve.app import ServeConfig, start, stop
    from mu2net.text_table import table

    family = get_family(args.family)
    hp = {**family.default_hparams(), **json.loads(args.hparams)}
    shape = family.dummy_inputs(hp, 1).shape[1:]
    tmp = tempfile.mkdtemp(prefix="mu2net-serve-bench-")
    build_store(os.path.join(tmp, "store-empty"), 1, args.family, json.loads(args.hparams))
    t0 = time.perf_counter()
    start(ServeConfig(store=os.path.join(tmp, "store-empty"), port=PORT))  # Ray + Serve up
    started = time.perf_counter() - t0
    try:
        systems = [one_system(int(n), args, tmp, shape) for n in args.tasks.split(",")]
    finally:
        stop()
        shutil.rmtree(tmp, ignore_errors=True)
    report = {"args": vars(args), "cpus": os.cpu_count(), "ray_and_serve_start_s": started,
              "systems": systems}  # fmt: skip
    base = systems[0]["served"]["p99_ms"]
    rows = [[
        str(s["tasks"]), f"{s['served']['examples_per_s']:.0f}",
        f"{s['in_process']['batched_examples_per_s']:.0f}",
        f"{s['served']['examples_per_s'] / s['in_process']['batched_examples_per_s']:.2f}",
        f"{s['served']['p50_ms']:.1f}", f"{s['served']['p99_ms']:.1f}",
        f"{s['served']['p99_ms'] / base:.2f}", str(s["served"]["errors"]),
        f"{s['cold_load_in_process']['load_ms_median']:.1f}",
        f"{s['first_request_other_tasks_ms_median']:.1f}",
        f"{s['cache_bytes'] / max(1, s['path_bytes_sum']):.3f}",
        f"{s['served']['client_cores']:.2f}", f"{s['load_avg_1min']:.1f}",
    ] for s in systems]  # fmt: skip
    print(table(["tasks", "served ex/s", "in-process ex/s", "ratio", "p50 ms", "p99 ms",
                 "p99 / 1 task", "errors", "cold load ms", "first request ms",
                 "cache / paths", "client cores", "load"], rows))  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
