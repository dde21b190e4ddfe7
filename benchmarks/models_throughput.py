"""Throughput of the root model families on this machine: forward and forward+backward.

Prints one table and writes ``benchmarks/models_throughput.json``. For each model, input size and
batch size it reports the compile time (``lower().compile()``, measured separately) and the
steady-state examples/s of

* ``fwd``: ``family.apply`` under ``jax.jit``;
* ``f+b`` (forward+backward): one full fine-tuning step (softmax cross-entropy, gradients
  w.r.t. every component, plain SGD update), i.e. what the trainer does when nothing is frozen.

Models: ViT Ti/16 at 32 px (random init; skipped with a note if ``mu2net.models.vit`` is absent),
EfficientNet-Lite0 at 64 and 96 px and MiniLM-L6 (``bert``) at 64 tokens (pretrained weights).
The load average is printed because other processes sharing the CPU slow every number down.

Usage: ``python benchmarks/models_throughput.py [--batches 32 64] [--min_seconds 3]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mu2net.models import bert as _bert  # noqa: E402,F401  (registers the family)
from mu2net.models import efficientnet as _eff  # noqa: E402,F401
from mu2net.models import get_family  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models_throughput.json")


def _configs() -> list[tuple[str, str, dict, str]]:
    """(label, family, hparams, size label) of every benchmarked model."""
    cfgs = []
    if importlib.util.find_spec("mu2net.models.vit") is not None:
        vit_hp = {"vit_size": "Ti/16", "num_layers": 12, "ds_image_size": 32, "num_classes": 10}
        cfgs.append(("ViT Ti/16", "vit", vit_hp, "32px"))
    for size in (64, 96):
        hp = {"num_classes": 10, "ds_image_size": size}
        cfgs.append(("EfficientNet-Lite0", "efficientnet_lite0", hp, f"{size}px"))
    cfgs.append(("MiniLM-L6", "bert", {"num_classes": 2, "ds_max_length": 64}, "64tok"))
    return cfgs


def _inputs(family, hparams: dict, batch: int, rng: np.random.Generator) -> np.ndarray:
    x = family.dummy_inputs(hparams, batch)
    if family.modality == "text":
        return rng.integers(1000, 30000, size=x.shape).astype(np.int32)  # no padding
    return rng.normal(size=x.shape).astype(np.float32)


def _params(family, hparams: dict):
    try:
        params = family.load_pretrained(hparams)
    except Exception:  # noqa: BLE001  (a family without bundled weights: speed is the same)
        params = family.init(jax.random.PRNGKey(0), hparams)
    return jax.device_put(jax.tree_util.tree_map(jnp.asarray, params))


def _time(fn, *args, min_seconds: float, carry: bool = False) -> tuple[float, float]:
    """(wall, process CPU) seconds per call after a warm-up call (>= 3 calls, >= min_seconds).

    CPU seconds (all threads) are much less sensitive than wall time to other processes
    sharing the cores, so both are reported.
    """
    out = jax.block_until_ready(fn(*args))
    n, start, cpu0 = 0, time.perf_counter(), time.process_time()
    while n < 3 or time.perf_counter() - start < min_seconds:
        if carry:  # a train step: feed the new params back in
            args = (out[0],) + args[1:]
        out = jax.block_until_ready(fn(*args))
        n += 1
    return (time.perf_counter() - start) / n, (time.process_time() - cpu0) / n


def bench(label, family_name, hparams, size, batch, min_seconds) -> dict:
    """Compile time and examples/s of forward and of a full fine-tuning step."""
    family = get_family(family_name)
    hp = {**family.default_hparams(), **hparams}
    rng = np.random.default_rng(0)
    params = _params(family, hp)
    x = jnp.asarray(_inputs(family, hp, batch, rng))
    y = jnp.asarray(rng.integers(0, hp["num_classes"], size=batch).astype(np.int32))

    def forward(p, x):
        return family.apply(p, x, hp)

    def step(p, x, y):
        def loss_fn(p):
            logits = family.apply(p, x, hp)
            logp = jax.nn.log_softmax(logits)
            return -jnp.take_along_axis(logp, y[:, None], axis=1).mean()

        loss, grads = jax.value_and_grad(loss_fn)(p)
        return jax.tree_util.tree_map(lambda a, g: a - 0.01 * g, p, grads), loss

    row = {"model": label, "size": size, "batch": batch}
    t = time.perf_counter()
    fwd = jax.jit(forward).lower(params, x).compile()
    row["compile_fwd_s"] = time.perf_counter() - t
    wall, cpu = _time(fwd, params, x, min_seconds=min_seconds)
    row["fwd_ex_s"], row["fwd_ex_per_cpu_s"] = batch / wall, batch / cpu
    t = time.perf_counter()
    train = jax.jit(step).lower(params, x, y).compile()
    row["compile_train_s"] = time.perf_counter() - t
    wall, cpu = _time(train, params, x, y, min_seconds=min_seconds, carry=True)
    row["train_ex_s"], row["train_ex_per_cpu_s"] = batch / wall, batch / cpu
    cost = train.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) and cost else cost
    flops = float((cost or {}).get("flops", 0.0))
    row["train_gflop_per_ex"] = flops / batch / 1e9
    return row


def main() -> None:
    """Runs every benchmark, prints the table, writes the JSON file."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--min_seconds", type=float, default=3.0)
    args = ap.parse_args()
    notes = []
    if importlib.util.find_spec("mu2net.models.vit") is None:
        notes.append("ViT skipped: mu2net.models.vit is not available")
    load0 = os.getloadavg()
    rows = []
    for cfg in _configs():
        for batch in args.batches:
            rows.append(bench(*cfg, batch, args.min_seconds))
            r = rows[-1]
            print(f"  done {r['model']} {r['size']} b{batch}", flush=True)
    load1 = os.getloadavg()
    header = (
        f"{'model':<20}{'input':>7}{'batch':>6}{'compile fwd':>13}{'fwd ex/s':>10}"
        f"{'(/CPU-s)':>9}{'compile f+b':>13}{'f+b ex/s':>10}{'(/CPU-s)':>9}{'GFLOP/ex f+b':>14}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['model']:<20}{r['size']:>7}{r['batch']:>6}{r['compile_fwd_s']:>12.1f}s"
            f"{r['fwd_ex_s']:>10.0f}{r['fwd_ex_per_cpu_s']:>9.0f}"
            f"{r['compile_train_s']:>12.1f}s{r['train_ex_s']:>10.1f}{r['train_ex_per_cpu_s']:>9.1f}"
            f"{r['train_gflop_per_ex']:>14.3f}"
        )
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"\n{machine}; jax {jax.__version__}; load average {load0[0]:.1f} -> {load1[0]:.1f}")
    print("fwd+bwd = one full fine-tuning SGD step (all components trainable).")
    print("/CPU-s = examples per CPU-second of this process (all threads): less load-sensitive.")
    for n in notes:
        print("note:", n)
    with open(OUT, "w") as f:
        json.dump(
            {
                "machine": machine,
                "jax": jax.__version__,
                "load_average": [load0[0], load1[0]],
                "notes": notes,
                "rows": rows,
            },
            f,
            indent=1,
        )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
