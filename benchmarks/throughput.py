"""Training throughput: mu2net's trainer vs a minimal flax+optax loop, and MFU.

For a root (``--model``: pretrained EfficientNet-Lite0 at 64 px on mu2net:mnist5k, the default;
ViT-Ti/16 at 64 px, freshly initialised as no checkpoint ships in a package; pretrained
MiniLM-L6 at 64 tokens on mu2net:rotten_tomatoes), batch 32:

* ``trainer``: :func:`mu2net.train.trainer.train_candidate`, called twice with the same
  architecture (the second call hits the compile cache); compile, data, step and validation
  times come from its ``timings``; examples/s = steps x batch / step time of the second call.
* ``hand``: a minimal ``jax.jit`` step (softmax cross-entropy, ``optax`` clip + SGD momentum,
  donated params, frozen params as plain arguments) on the same model, params and batches;
  compile time by ``lower().compile()``, steps timed with ``block_until_ready``.

Cases: full fine-tune (every component trainable) and top-4 blocks (the last four blocks and
everything above them trainable, e.g. EfficientNet's blocks 12-15, head conv and head; the
rest frozen). FLOPs per example from XLA's cost analysis of the hand step;
MFU = achieved FLOP/s / the float32 matmul peak measured in the same process (4096^3 matmul;
bfloat16 shown too). Prints one table; writes ``benchmarks/throughput.json`` (other models:
``throughput_<model>.json``).

Usage: ``python benchmarks/throughput.py [--model minilm] [--quick] [--steps 40] [--batch 32]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A fresh persistent compilation cache, so "compile s" is a real compile, not a cache read.
os.environ["MU2NET_JAX_CACHE_DIR"] = tempfile.mkdtemp(prefix="mu2net_tp_jaxcache_")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

TOP_K = 4
OPT = {
    "opt_lr": 0.02,
    "opt_lr_schedule": "cosine",
    "opt_lr_warmup_ratio": 0.05,
    "opt_momentum": 0.9,
    "opt_nesterov": False,
}
# name -> (family, task, root hparams, data hparams, pretrained root in a wheel).
MODELS = {
    "efficientnet_lite0": (
        "efficientnet_lite0",
        "mu2net:mnist5k",
        {"ds_image_size": 64, "num_classes": 10},
        {"ds_image_size": 64, "ds_crop": False, "ds_flip_left_right": False},
        True,
    ),
    "vit_ti": (
        "vit",
        "mu2net:mnist5k",
        {"vit_size": "Ti/16", "num_layers": 12, "ds_image_size": 64, "num_classes": 10},
        {"ds_image_size": 64, "ds_crop": False, "ds_flip_left_right": False},
        False,
    ),
    "minilm": (
        "bert",
        "mu2net:rotten_tomatoes",
        {"ds_max_length": 64, "num_classes": 2},
        {"ds_max_length": 64},
        True,
    ),
}


def setup(model: str, batch: int, steps: int):
    """Family, hparams, root params, ``steps`` cached training batches, validation, data time."""
    import jax

    from mu2net.evolution import data as evo_data
    from mu2net.models.base import get_family
    from mu2net.train.batching import validation_batches

    name, task, root_hp, ds, pretrained = MODELS[model]
    family = get_family(name)
    hp = {**family.default_hparams(), **root_hp, **OPT}
    if pretrained:
        params = family.load_pretrained(hp)
    else:  # no ViT-Ti checkpoint ships in a package: a fresh init costs the same per step
        params = jax.tree_util.tree_map(np.asarray, family.init(jax.random.PRNGKey(0), hp))
    t0 = time.perf_counter()
    batches = list(evo_data.TrainStream(task, family, ds, batch, steps, seed=0))
    first_s = time.perf_counter() - t0
    # Steady state: the pipeline is built and the raw arrays cached; a new seed reshuffles.
    t0 = time.perf_counter()
    list(evo_data.TrainStream(task, family, ds, batch, steps, seed=1))
    data_s = {"first_stream_s": first_s, "s_per_batch": (time.perf_counter() - t0) / steps}
    val = validation_batches(evo_data.eval_arrays(task, "validation", family, ds, batch), batch)
    return family, hp, params, batches, val, data_s, task


def split(family, hp: dict, params: dict, case: str) -> tuple[dict, dict]:
    """(trainable, frozen) of a case: everything, or the top blocks and what sits above them."""
    if case == "full":
        return dict(params), {}
    names = family.component_names(hp)
    blocks = [n for n in names if family.block_index(n) is not None]
    last = names.index(blocks[-1])
    top = set(blocks[-TOP_K:]) | set(names[last + 1 :])
    return (
        {k: v for k, v in params.items() if k in top},
        {k: v for k, v in params.items() if k not in top},
    )


def run_trainer(family, hp, trainable, frozen, batches, val, batch: int) -> dict[str, Any]:
    """Two calls of train_candidate (cold, then warm cache); timings of both."""
    from mu2net.train.trainer import TrainConfig, train_candidate

    cfg = TrainConfig(batch_size=batch, steps_between_validations=len(batches), num_validations=1)
    out = {}
    for label in ("cold", "warm", "warm2"):
        t0 = time.perf_counter()
        r = train_candidate(
            family=family,
            hparams=hp,
            trainable=trainable,
            frozen=frozen,
            train_batches=iter(batches),
            validation_batches=val,
            config=cfg,
            progress=False,
        )
        out[label] = {
            **r.timings,
            "wall_s": time.perf_counter() - t0,
            "steps": r.steps,
            "compiles": r.num_compiles,
        }
    w = min(out["warm"], out["warm2"], key=lambda t: t["train_s"])
    out["examples_per_s"] = w["steps"] * batch / w["train_s"]
    out["compile_s"] = out["cold"]["compile_s"]
    out["data_s_per_step"] = w["data_s"] / w["steps"]
    out["step_s"] = w["train_s"] / w["steps"]
    out["eval_s"] = w["eval_s"]
    out["overhead_s"] = w["total_s"] - w["train_s"] - w["data_s"] - w["eval_s"] - w["compile_s"]
    return out


def run_hand(family, hp, trainable, frozen, batches, batch: int) -> dict[str, Any]:
    """A minimal flax+optax loop on the same model and batches."""
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.02, momentum=0.9))

    def step(tr, opt, fr, x, y):
        def loss_fn(t):
            logits = family.apply({**fr, **t}, x, hp)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, g = jax.value_and_grad(loss_fn)(tr)
        upd, opt = tx.update(g, opt, tr)
        return optax.apply_updates(tr, upd), opt, loss

    tr = jax.device_put(jax.tree_util.tree_map(np.array, trainable))
    fr = jax.device_put(frozen)
    opt = tx.init(tr)
    xs = [jnp.asarray(b["inputs"]) for b in batches]
    ys = [jnp.asarray(np.asarray(b["targets"]).reshape(-1).astype(np.int32)) for b in batches]
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(tr, opt, fr, xs[0], ys[0]).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    tr, opt, loss = compiled(tr, opt, fr, xs[0], ys[0])  # warm-up
    loss.block_until_ready()
    step_s = float("inf")
    for _ in range(2):  # best of two passes: the CPU is shared
        t0 = time.perf_counter()
        for x, y in zip(xs, ys):
            tr, opt, loss = compiled(tr, opt, fr, x, y)
        loss.block_until_ready()
        step_s = min(step_s, (time.perf_counter() - t0) / len(xs))
    return {
        "compile_s": compile_s,
        "step_s": step_s,
        "examples_per_s": batch / step_s,
        "flops_per_example": flops / batch,
        "final_loss": float(loss),
    }


def main(argv=None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40, help="timed training steps per case")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--matmul", type=int, default=4096, help="matmul size for the peak")
    p.add_argument("--quick", action="store_true", help="8 steps, 1024 matmul (smoke test)")
    p.add_argument(
        "--model", default="efficientnet_lite0", choices=sorted(MODELS), help="root to train"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.matmul = 8, 1024
    import mu2net.tasks  # noqa: F401

    meta = common.machine()
    peak = {
        "float32": common.matmul_peak(args.matmul, jnp.float32, 3.0 if not args.quick else 0.5),
        "bfloat16": common.matmul_peak(args.matmul, jnp.bfloat16, 3.0 if not args.quick else 0.5),
    }
    family, hp, params, batches, val, data_s, task = setup(args.model, args.batch, args.steps)
    doc: dict[str, Any] = {
        "_meta": {
            **meta,
            "batch": args.batch,
            "steps": args.steps,
            "matmul_n": args.matmul,
            "task": task,
            "model": args.model,
            "data_stream": data_s,
        },
        "matmul_peak_flops": peak,
    }
    rows = []
    for case in ("full", f"top{TOP_K}"):
        trainable, frozen = split(family, hp, params, case)
        tr = run_trainer(family, hp, trainable, frozen, batches, val, args.batch)
        hand = run_hand(family, hp, trainable, frozen, batches, args.batch)
        fpe = hand["flops_per_example"]
        for r in (tr, hand):
            r["mfu_f32"] = r["examples_per_s"] * fpe / peak["float32"]
        doc[case] = {
            "trainer": tr,
            "hand": hand,
            "ratio_trainer_over_hand": tr["examples_per_s"] / hand["examples_per_s"],
        }
        for label, r in (("mu2net trainer", tr), ("hand flax+optax", hand)):
            rows.append(
                [
                    case,
                    label,
                    r["examples_per_s"],
                    r["step_s"] * 1e3,
                    r["compile_s"],
                    r.get("data_s_per_step", data_s["s_per_batch"]) * 1e3,
                    fpe / 1e9,
                    r["examples_per_s"] * fpe / 1e9,
                    r,
                ]
            )
    doc["_meta"]["load_average_end"] = common.load_average()
    # The peak measured again at the end (best of both): load spikes only lower a measurement.
    for dt, name in ((jnp.float32, "float32"), (jnp.bfloat16, "bfloat16")):
        peak[name] = max(
            peak[name], common.matmul_peak(args.matmul, dt, 0.5 if args.quick else 3.0)
        )
    for case in ("full", f"top{TOP_K}"):
        for r in (doc[case]["trainer"], doc[case]["hand"]):
            f = doc[case]["hand"]["flops_per_example"]
            r["mfu_f32"] = r["examples_per_s"] * f / peak["float32"]
    rows = [row[:-1] + [f"{100 * row[-1]['mfu_f32']:.1f}%"] for row in rows]
    name = "throughput" if args.model == "efficientnet_lite0" else f"throughput_{args.model}"
    path = common.write_json(name + ("_quick" if args.quick else ""), doc)
    print(
        common.table(
            [
                "case",
                "loop",
                "ex/s",
                "step ms",
                "compile s",
                "data ms/step",
                "GFLOP/ex",
                "GFLOP/s",
                "MFU(f32)",
            ],
            rows,
        )
    )
    ratios = ", ".join(
        f"{c}: {doc[c]['ratio_trainer_over_hand']:.2f}" for c in ("full", f"top{TOP_K}")
    )
    print(
        f"\ntrainer/hand examples/s ratio: {ratios}; matmul peak f32 "
        f"{peak['float32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bfloat16'] / 1e9:.0f} GFLOP/s "
        f"(n={args.matmul}, best of start/end); compile s = trainer's first call / hand "
        f"lower().compile(); data ms/step: trainer = batch prep + host->device in the loop, "
        f"hand = a fresh {task} stream (steady state; first stream "
        f"{data_s['first_stream_s']:.1f}s incl. pipeline build); "
        f"load avg {meta['load_average_start'][0]:.1f}->"
        f"{doc['_meta']['load_average_end'][0]:.1f}\nwrote {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
