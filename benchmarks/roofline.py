"""Roofline of the training step, per component of a root, and the levers it points to.

For every stage of the family's :meth:`~mu2net.models.base.Family.stages` (EfficientNet-Lite0:
``stem``, ``block_0`` .. ``block_15``, ``head_conv``, ``head``) on the activations it sees in
a real forward pass, three executables are compiled on their own:

* ``fwd``: the stage's forward;
* ``train``: forward + backward to its params and its input (a cloned, trainable component
  with a trainable component below it);
* ``frozen``: forward + backward to its input only (a frozen component above the lowest clone,
  which evolution differentiates under a mask).

Each gets XLA's cost analysis (FLOPs, bytes accessed), its best measured time, achieved
GFLOP/s and GB/s, and its arithmetic intensity (FLOP/byte) against the ridge point of this
machine: the float32 matmul peak (4096^3 matmul) over the memory-bandwidth peak (``y = 2x + y``
on 256 MiB arrays), both measured in the same run. A stage left of the ridge is memory-bound:
its roof is intensity x bandwidth; right of it, the matmul peak. ``% of roof`` says how far
each stage is from its own bound. The whole network (forward, and forward + backward to every
param) is measured the same way, to show what fusion across stages gains.

``--levers`` measures, in the same process (XLA flags in subprocesses, as they are read at
start-up), the full fine-tune step (forward + backward to every param, plus SGD momentum):
the depthwise formulation (strided slices vs grouped convolution), batch size, and XLA CPU
flags (XNNPACK, fast math, the concurrency scheduler). Writes ``benchmarks/roofline.json``
and ``benchmarks/roofline.png``.

Usage: ``python benchmarks/roofline.py [--quick] [--levers] [--batch 32]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

MODES = ("fwd", "train", "frozen")
XLA_FLAG_LEVERS = (
    "--xla_cpu_use_xnnpack=true",
    "--xla_cpu_enable_fast_math=true",
    "--xla_cpu_enable_concurrency_optimized_scheduler=true",
    "--xla_cpu_use_xnnpack=true --xla_cpu_enable_concurrency_optimized_scheduler=true",
)


def cost_of(compiled) -> tuple[float, float]:
    """(FLOPs, bytes accessed) of a compiled executable, from XLA's cost analysis."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    cost = cost or {}
    return float(cost.get("flops", float("nan"))), float(cost.get("bytes accessed", float("nan")))


def measure(fn: Callable, args: tuple, seconds: float) -> dict[str, float]:
    """Compiles ``fn`` on ``args``, times it (best call) and reads its cost."""
    compiled = jax.jit(fn).lower(*args).compile()
    flops, nbytes = cost_of(compiled)
    jax.block_until_ready(compiled(*args))
    best = common.best_seconds(lambda: jax.block_until_ready(compiled(*args)), seconds)
    return {"flops": flops, "bytes": nbytes, "seconds": best}


def stage_fns(family, hp: dict, index: int) -> dict[str, Callable]:
    """The three executables of one stage (see the module docstring)."""

    def fwd(p, x):
        return family.apply_stages(p, x, hp, index, index + 1)

    def train(p, x, ct):
        y, vjp = jax.vjp(fwd, p, x)
        return vjp(ct)

    def train_params_only(p, x, ct):  # the stem's input is the image: no gradient to it
        y, vjp = jax.vjp(lambda q: fwd(q, x), p)
        return vjp(ct)

    def frozen(p, x, ct):
        y, vjp = jax.vjp(lambda z: fwd(p, z), x)
        return vjp(ct)

    return {"fwd": fwd, "train": train if index else train_params_only, "frozen": frozen}


def inputs_for(family, hp: dict, batch: int) -> jax.Array:
    """A batch of the family's inputs: normal noise for images, token 1 for token ids."""
    dummy = np.asarray(family.dummy_inputs(hp, batch))
    if np.issubdtype(dummy.dtype, np.floating):
        return jnp.asarray(np.random.default_rng(0).normal(size=dummy.shape), dummy.dtype)
    return jnp.ones_like(jnp.asarray(dummy))


def per_stage(family, hp: dict, params: dict, batch: int, seconds: float) -> list[dict]:
    """One row per stage and mode, on the activations of a real forward pass."""
    x = inputs_for(family, hp, batch)
    rows = []
    for i, names in enumerate(family.stages(hp)):
        p = {n: params[n] for n in names}
        fns = stage_fns(family, hp, i)
        y = jax.jit(fns["fwd"])(p, x)
        ct = jnp.ones_like(y)
        for mode in MODES:
            if mode == "frozen" and i == 0:
                continue  # nothing below the stem to propagate to
            args = (p, x) if mode == "fwd" else (p, x, ct)
            rows.append(
                {"stage": "+".join(names), "mode": mode, **measure(fns[mode], args, seconds)}
            )
        x = y
    return rows


def whole_network(family, hp: dict, params: dict, batch: int, seconds: float) -> list[dict]:
    """The whole network's forward, and forward + backward to every param, as one executable."""
    x = inputs_for(family, hp, batch)
    y = jnp.zeros((batch,), jnp.int32)

    def fwd(p, images):
        return family.apply(p, images, hp)

    def loss(p, images, labels):
        logits = family.apply(p, images, hp)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return [
        {"stage": "whole network", "mode": "fwd", **measure(fwd, (params, x), seconds)},
        {
            "stage": "whole network",
            "mode": "train",
            **measure(jax.grad(loss), (params, x, y), seconds),
        },
    ]


def bandwidth_sweep(mibs: list[float], seconds: float) -> dict[float, float]:
    """Axpy bandwidth (bytes/s) per array size in MiB: small sizes stay in cache."""
    return {m: common.bandwidth_peak(m, seconds) for m in mibs}


def bandwidth_for(nbytes: float, sweep: dict[float, float]) -> float:
    """The sweep's bandwidth at the working set nearest ``nbytes`` (log scale; 3 arrays)."""
    sizes = sorted(sweep)
    target = np.log(max(nbytes, 1.0))
    nearest = min(sizes, key=lambda m: abs(np.log(3 * m * 2**20) - target))
    return sweep[nearest]


def annotate(rows: list[dict], peak_flops: float, sweep: dict[float, float], batch: int) -> None:
    """Adds achieved rates, intensity, the roof and the bound kind to each row.

    A row's memory roof uses the bandwidth measured at its own working-set size: a stage whose
    activations fit in cache is not held to the DRAM bandwidth.
    """
    for r in rows:
        bw = bandwidth_for(r["bytes"], sweep)
        r["gflops_per_s"] = r["flops"] / r["seconds"] / 1e9
        r["gbytes_per_s"] = r["bytes"] / r["seconds"] / 1e9
        r["intensity"] = r["flops"] / r["bytes"] if r["bytes"] else float("nan")
        roof = min(peak_flops, r["intensity"] * bw)
        r["bandwidth_roof_gb_per_s"] = bw / 1e9
        r["bound"] = "memory" if r["intensity"] < peak_flops / bw else "compute"
        r["roof_gflops_per_s"] = roof / 1e9
        r["fraction_of_roof"] = r["flops"] / r["seconds"] / roof
        r["us_per_example"] = r["seconds"] / batch * 1e6


def plot(rows: list[dict], peak_flops: float, sweep: dict[float, float], path: str) -> None:
    """Log-log roofline: achieved GFLOP/s vs intensity per stage and mode, with the roofs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    xs = np.logspace(-1.5, 3, 200)
    dram, cache = sweep[max(sweep)], max(sweep.values())
    ax.plot(xs, np.minimum(peak_flops, xs * dram) / 1e9, "k-", lw=1.5, label="roof (DRAM)")
    ax.plot(xs, np.minimum(peak_flops, xs * cache) / 1e9, "k--", lw=1, label="roof (cache)")
    markers = {"fwd": "o", "train": "s", "frozen": "^"}
    for mode, marker in markers.items():
        sel = [r for r in rows if r["mode"] == mode and r["stage"] != "whole network"]
        ax.scatter(
            [r["intensity"] for r in sel],
            [r["gflops_per_s"] for r in sel],
            marker=marker,
            s=[max(8.0, 4e3 * r["seconds"]) for r in sel],
            alpha=0.6,
            label=f"stage {mode}",
        )
    for r in rows:
        if r["stage"] == "whole network":
            ax.scatter(r["intensity"], r["gflops_per_s"], marker="*", s=200, c="red")
            ax.annotate(f"whole {r['mode']}", (r["intensity"], r["gflops_per_s"]), fontsize=8)
        elif r["mode"] == "train":
            ax.annotate(
                r["stage"].replace("block_", "b"), (r["intensity"], r["gflops_per_s"]), fontsize=6
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte, XLA cost analysis)")
    ax.set_ylabel("achieved GFLOP/s")
    ax.set_title("Roofline per component (marker size = time)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def step_rate(apply: Callable, hp: dict, params: dict, x: jax.Array, seconds: float) -> dict:
    """Examples/s and GFLOP/s of a full fine-tune step (grads of every param + SGD momentum)."""
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.02, momentum=0.9))
    labels = jnp.zeros((x.shape[0],), jnp.int32)

    def step(p, opt):
        def loss(q):
            logits = apply(q, x, hp)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        g = jax.grad(loss)(p)
        upd, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, upd), opt

    p = jax.tree_util.tree_map(jnp.asarray, params)
    opt = tx.init(p)
    compiled = jax.jit(step).lower(p, opt).compile()
    flops, nbytes = cost_of(compiled)
    jax.block_until_ready(compiled(p, opt))
    best = common.best_seconds(lambda: jax.block_until_ready(compiled(p, opt)), seconds)
    return {
        "batch": int(x.shape[0]),
        "examples_per_s": x.shape[0] / best,
        "gflops_per_s": flops / best / 1e9,
        "flops_per_example": flops / x.shape[0],
        "bytes": nbytes,
    }


def setup(family_name: str, image_size: int) -> tuple[Any, dict, dict]:
    """Family, hparams (10 classes) and pretrained params of the root."""
    from mu2net.models.base import get_family

    family = get_family(family_name)
    hp = {**family.default_hparams(), "num_classes": 10}
    if family.modality == "image":
        hp["ds_image_size"] = image_size
    params = jax.tree_util.tree_map(jnp.asarray, family.load_pretrained(hp))
    return family, hp, params


def step_in_subprocess(args, flags: str) -> dict:
    """:func:`step_rate` in a fresh process under ``XLA_FLAGS=flags`` (read at start-up)."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--step_only",
        "--batch",
        str(args.batch),
        "--family",
        args.family,
        "--image_size",
        str(args.image_size),
        "--seconds",
        str(args.seconds),
    ]
    env = {**os.environ, "XLA_FLAGS": flags, "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def levers(args, family, hp: dict, params: dict) -> list[dict]:
    """Each lever's full fine-tune step rate, measured side by side with the baseline."""
    base = step_rate(family.apply, hp, params, inputs_for(family, hp, args.batch), args.seconds)
    rows = [{"lever": "baseline (as shipped)", **base}]
    if family.name == "efficientnet_lite0":
        from mu2net.models.efficientnet import forward

        x = inputs_for(family, hp, args.batch)
        for impl, label in (("autodiff", "JAX's backward"), ("grouped", "grouped conv")):

            def variant(p, images, h, impl=impl):
                return forward(p, images, h, depthwise=impl)

            rate = step_rate(variant, hp, params, x, args.seconds)
            rows.append({"lever": f"depthwise: {label}", **rate})
    for batch in args.lever_batches:
        if batch != args.batch:
            x = inputs_for(family, hp, batch)
            rows.append(
                {"lever": f"batch {batch}", **step_rate(family.apply, hp, params, x, args.seconds)}
            )
    rows.append({"lever": "subprocess, no XLA flags", **step_in_subprocess(args, "")})
    for flags in XLA_FLAG_LEVERS:
        rows.append({"lever": f"XLA_FLAGS={flags}", **step_in_subprocess(args, flags)})
    ref = base["examples_per_s"]
    for r in rows:
        if "examples_per_s" in r:
            r["speedup"] = r["examples_per_s"] / ref
    return rows


def print_stage_table(rows: list[dict]) -> None:
    """One line per stage: each mode's time, GFLOP/s, intensity, bound and % of roof."""
    by_stage: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_stage.setdefault(r["stage"], {})[r["mode"]] = r
    headers = ["stage", "GFLOP fwd", "MB fwd"]
    for mode in MODES:
        headers += [f"{mode} ms", f"{mode} GFLOP/s", f"{mode} FLOP/B", f"{mode} % roof"]
    headers.append("bound (train)")
    table = []
    for stage, modes in by_stage.items():
        f = modes["fwd"]
        line = [stage, f["flops"] / 1e9, f["bytes"] / 1e6]
        for mode in MODES:
            r = modes.get(mode)
            line += (
                [
                    r["seconds"] * 1e3,
                    r["gflops_per_s"],
                    r["intensity"],
                    f"{100 * r['fraction_of_roof']:.0f}%",
                ]
                if r
                else ["-"] * 4
            )
        line.append(modes["train"]["bound"])
        table.append(line)
    print(common.table(headers, table))


def print_levers(rows: list[dict], peak_flops: float) -> None:
    """The levers' step rates, MFU and speed-up over the shipped step."""
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["lever"], "-", "-", "-", r["error"][:60]])
            continue
        table.append(
            [
                r["lever"],
                r["batch"],
                r["examples_per_s"],
                f"{100 * r['gflops_per_s'] * 1e9 / peak_flops:.1f}%",
                f"{r['speedup']:.2f}x",
            ]
        )
    print(
        common.table(["lever (full fine-tune step)", "batch", "ex/s", "MFU f32", "speed-up"], table)
    )


def parse_args(argv) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="efficientnet_lite0")
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seconds", type=float, default=2.0, help="timing per executable")
    p.add_argument("--matmul", type=int, default=4096, help="matmul size for the peak")
    p.add_argument(
        "--copy_mib",
        type=lambda v: [float(m) for m in v.split(",")],
        default=[0.25, 1.0, 4.0, 16.0, 64.0, 256.0],
        help="array sizes (MiB) of the bandwidth sweep; the largest is DRAM",
    )
    p.add_argument("--levers", action="store_true", help="also measure the levers")
    p.add_argument(
        "--lever_batches", type=lambda s: [int(v) for v in s.split(",")], default=[16, 64, 128]
    )
    p.add_argument("--quick", action="store_true", help="short timings, small peaks (smoke)")
    p.add_argument("--step_only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="roofline")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.matmul, args.copy_mib, args.lever_batches = 0.2, 1024, [1, 32], [16]
    return args


def main(argv=None) -> int:
    """Entry point."""
    args = parse_args(argv)
    family, hp, params = setup(args.family, args.image_size)
    if args.step_only:
        x = inputs_for(family, hp, args.batch)
        print(json.dumps(step_rate(family.apply, hp, params, x, args.seconds)))
        return 0
    meta = {
        **common.machine(),
        "family": args.family,
        "batch": args.batch,
        "image_size": args.image_size,
    }
    peak_flops = common.matmul_peak(args.matmul, jnp.float32, 5 * args.seconds)
    sweep = bandwidth_sweep(args.copy_mib, 2 * args.seconds)
    rows = per_stage(family, hp, params, args.batch, args.seconds)
    rows += whole_network(family, hp, params, args.batch, args.seconds)
    lever_rows = levers(args, family, hp, params) if args.levers else []
    # Peaks again at the end, best of both: load only ever lowers a measurement.
    peak_flops = max(peak_flops, common.matmul_peak(args.matmul, jnp.float32, 5 * args.seconds))
    again = bandwidth_sweep(args.copy_mib, 2 * args.seconds)
    sweep = {m: max(v, again[m]) for m, v in sweep.items()}
    annotate(rows, peak_flops, sweep, args.batch)
    dram = sweep[max(sweep)]
    meta["load_average_end"] = common.load_average()
    doc = {
        "_meta": meta,
        "peak_flops_f32": peak_flops,
        "bandwidth_bytes_per_s_by_mib": sweep,
        "ridge_flop_per_byte_dram": peak_flops / dram,
        "rows": rows,
        "levers": lever_rows,
    }
    path = common.write_json(args.out + ("_quick" if args.quick else ""), doc)
    png = os.path.join(common.HERE, args.out + ("_quick" if args.quick else "") + ".png")
    plot(rows, peak_flops, sweep, png)
    print_stage_table(rows)
    stages = [r for r in rows if r["stage"] != "whole network"]
    for mode in ("fwd", "train"):
        whole = next(r for r in rows if r["stage"] == "whole network" and r["mode"] == mode)
        total = sum(r["seconds"] for r in stages if r["mode"] == mode)
        print(
            f"whole network {mode}: {whole['seconds'] * 1e3:.1f} ms "
            f"({whole['gflops_per_s']:.1f} GFLOP/s, {100 * whole['fraction_of_roof']:.0f}% of "
            f"its roof) vs the stages one by one {total * 1e3:.1f} ms"
        )
    if lever_rows:
        print()
        print_levers(lever_rows, peak_flops)
    print(
        f"\nmatmul peak f32 {peak_flops / 1e9:.0f} GFLOP/s (n={args.matmul}); axpy bandwidth "
        + ", ".join(f"{m:g} MiB {v / 1e9:.1f} GB/s" for m, v in sorted(sweep.items()))
        + f" (DRAM ridge {peak_flops / dram:.1f} FLOP/B; a row's roof uses the bandwidth at its "
        f"own working set); load avg {meta['load_average_start'][0]:.1f}->"
        f"{meta['load_average_end'][0]:.1f}\nwrote {path} and {png}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
