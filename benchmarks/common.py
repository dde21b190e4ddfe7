"""Shared helpers of the benchmarks: tables, JSON output, statistics, timers, process memory.

Not part of the library: the benchmark scripts import it as ``common`` (they run from any
directory because each script puts its own folder on ``sys.path``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_GIN = "experiments/default.gin"


def json_path(name: str) -> str:
    """``benchmarks/<name>.json`` next to the scripts."""
    return os.path.join(HERE, f"{name}.json")


def write_json(name: str, doc: Any) -> str:
    """Writes ``doc`` to ``benchmarks/<name>.json`` atomically; returns the path."""
    path = json_path(name)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=False, default=_default)
    os.replace(tmp, path)
    return path


def _default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with right-aligned numeric columns."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for k, r in enumerate(cells):
        lines.append(
            "  ".join(
                c.rjust(w) if k and _numeric(c) else c.ljust(w) for c, w in zip(r, widths)
            ).rstrip()
        )
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(c: Any) -> str:
    if isinstance(c, float):
        return f"{c:.4g}" if abs(c) < 1e4 else f"{c:,.0f}"
    if isinstance(c, int) and not isinstance(c, bool):
        return f"{c:,}"
    return str(c)


def _numeric(s: str) -> bool:
    return bool(s) and (s[0].isdigit() or s[0] in "-+.") and s not in ("-",)


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "std", "runs"}`` (population std; 0 for one run; NaN-free values only)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return {"mean": None, "std": None, "runs": []}
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "runs": vals}


def pm(stat: dict[str, Any], digits: int = 3) -> str:
    """``mean ± std`` of a :func:`mean_std` dict."""
    if stat.get("mean") is None:
        return "-"
    if len(stat["runs"]) < 2:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}±{stat['std']:.{digits}f}"


def load_average() -> tuple[float, float, float]:
    """1/5/15-minute load averages (the CPU is shared: high load slows every timing)."""
    return os.getloadavg()


def machine() -> dict[str, Any]:
    """Where and under which load the numbers were measured."""
    import jax

    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "load_average_start": load_average(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def rss_mb() -> float:
    """Current resident set size of this process in MiB (Linux /proc; else the peak)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextlib.contextmanager
def timer(out: dict[str, float], key: str) -> Iterator[None]:
    """Adds the wall time of the block to ``out[key]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        out[key] = out.get(key, 0.0) + time.perf_counter() - t0


def parse_gin(files: Sequence[str], bindings: Sequence[str] = ()) -> None:
    """Parses gin files/bindings the way the binaries do (not finalized: scripts re-parse)."""
    from mu2net import gin_utils
    from mu2net.train._gin import gin

    gin.clear_config()
    args = argparse.Namespace(
        gin_file=list(files), gin_bindings=list(bindings), gin_search_paths=""
    )
    gin_utils.parse_gin(args, finalize=False)


def matmul_peak(n: int, dtype, seconds: float) -> float:
    """FLOP/s of an ``n x n @ n x n`` matmul under jit (best of repetitions for ``seconds``)."""
    import jax
    import jax.numpy as jnp

    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    return 2.0 * n**3 / best_seconds(lambda: f(a, a).block_until_ready(), seconds)


def bandwidth_peak(mib: float, seconds: float) -> float:
    """Bytes/s of ``y = 2 x + y`` (axpy: two reads and one write) over ``mib`` MiB per array."""
    import jax
    import jax.numpy as jnp

    n = int(mib * 2**20) // 4
    x = jnp.ones((n,), jnp.float32)
    y = jnp.zeros((n,), jnp.float32)
    f = jax.jit(lambda a, b: 2.0 * a + b)
    f(x, y).block_until_ready()
    return 3 * 4 * n / best_seconds(lambda: f(x, y).block_until_ready(), seconds)


def best_seconds(fn, seconds: float, min_reps: int = 3) -> float:
    """Fastest of repeated calls of ``fn`` for about ``seconds`` (at least ``min_reps``).

    The best, not the mean: on a shared CPU, load only ever makes a call slower.
    """
    best, reps, t_end = float("inf"), 0, time.perf_counter() + seconds
    while reps < min_reps or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return best
