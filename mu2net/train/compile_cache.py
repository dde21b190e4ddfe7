"""Compiled step functions cached by architecture signature, plus JAX's persistent cache.

An evolutionary run trains many candidates that differ only in numeric hyperparameters; those
enter the steps as runtime values (:mod:`mu2net.train.optim`), so candidates that share
``family.architecture_key(hparams)``, the trainable component set and the batch shape reuse one
executable. Every compile is counted and timed: by default the first call of a new ``jax.jit``
function (trace + compile + one run; later silent recompiles are counted through the jit cache
size), or, with ``CompileCache(aot=True)``, an explicit ``lower().compile()`` whose executable
raises on a mismatched input instead of recompiling. Across processes, JAX's persistent
compilation cache (on by default, directory gin-configurable) turns a repeated compile into a
disk read.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

import jax
import numpy as np

from mu2net.train._gin import gin

DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "mu2net", "jax")
_persistent_lock = threading.Lock()
_persistent_dir: str | None = None


@gin.configurable
def enable_persistent_cache(
    cache_dir: str | None = None, min_compile_time_secs: float = 1.0
) -> str | None:
    """Turns on JAX's persistent compilation cache; returns the directory (None = disabled).

    Args:
      cache_dir: directory (local or any path JAX accepts); None uses ``$MU2NET_JAX_CACHE_DIR``
        or ``~/.cache/mu2net/jax``; ``""`` disables the persistent cache.
      min_compile_time_secs: only compiles slower than this are written (JAX's own knob).
    """
    global _persistent_dir
    if cache_dir is None:
        cache_dir = os.environ.get("MU2NET_JAX_CACHE_DIR", DEFAULT_CACHE_DIR)
    if not cache_dir:
        return None
    cache_dir = os.path.expanduser(cache_dir)
    with _persistent_lock:
        if _persistent_dir != cache_dir:
            if "://" not in cache_dir:
                os.makedirs(cache_dir, exist_ok=True)
            jax.config.update("jax_compilation_cache_dir", cache_dir)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_secs)
            _persistent_dir = cache_dir
    return cache_dir


def tree_signature(tree: Any) -> tuple:
    """Hashable (path, shape, dtype) signature of a pytree of arrays."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return tuple(
        (jax.tree_util.keystr(p), tuple(np.shape(x)), str(np.result_type(x))) for p, x in leaves
    )


@dataclasses.dataclass
class CacheStats:
    """Counters of one :class:`CompileCache` (totals since creation)."""

    compiles: int = 0
    compile_s: float = 0.0
    hits: int = 0
    compiles_by_kind: collections.Counter = dataclasses.field(default_factory=collections.Counter)


class CompileCache:
    """Maps a signature key to a compiled step function; counts and times the compiles.

    ``aot=True`` compiles ahead of time (``lower().compile()``, exact compile time; a shape
    mismatch raises); the default keeps ``jax.jit`` dispatch and times the first call.
    """

    def __init__(self, max_entries: int = 512, persistent: bool = True, aot: bool = False):
        self._entries: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.max_entries = max_entries
        self.persistent = persistent
        self.aot = aot
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drops every executable (counters are kept)."""
        with self._lock:
            self._entries.clear()

    def get(self, kind: str, key: Hashable, build: Callable[[], Any], *example_args) -> Any:
        """The executable for ``(kind, key)``, compiling ``build()`` on ``example_args`` if new.

        Args:
          kind: what the executable is (``"train"``, ``"eval"``, ...; counted separately).
          key: everything that changes the compiled graph (architecture, shapes, shardings).
          build: returns the ``jax.jit``-wrapped function to lower.
          *example_args: arguments (arrays or ``jax.ShapeDtypeStruct``) to lower on.
        """
        full_key = (kind, key)
        with self._lock:
            if full_key in self._entries:
                self._entries.move_to_end(full_key)
                self.stats.hits += 1
                return self._entries[full_key]
        if self.persistent:
            enable_persistent_cache()
        if not self.aot:
            entry = _FirstCallTimed(build(), self, kind)
            with self._lock:
                self._entries[full_key] = entry
                self._trim()
            return entry
        start = time.perf_counter()
        compiled = build().lower(*example_args).compile()
        self._record(kind, time.perf_counter() - start)
        with self._lock:
            self._entries[full_key] = compiled
            self._trim()
        return compiled

    def _record(self, kind: str, seconds: float) -> None:
        with self._lock:
            self.stats.compiles += 1
            self.stats.compile_s += seconds
            self.stats.compiles_by_kind[kind] += 1

    def _trim(self) -> None:
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


class _FirstCallTimed:
    """A jitted function whose first call (trace + compile + one run) is timed as the compile.

    Calling ``jax.jit`` functions keeps JAX's C++ dispatch fast path (an AOT ``Compiled`` object
    is dispatched from Python, which costs milliseconds per step on small models). Any later
    recompilation (a new input shape or sharding) is counted too, via the jit cache size.
    """

    def __init__(self, fn: Any, cache: CompileCache, kind: str):
        self.fn, self.cache, self.kind = fn, cache, kind
        self.size = 0
        self.flops: float | None = None

    def __call__(self, *args):
        if self.size == 0 or self.fn._cache_size() != self.size:  # noqa: SLF001
            start = time.perf_counter()
            if self.flops is None:
                # Lowered before the call: donated arguments are gone after it. Counted as
                # compile time, which it is (one more trace).
                self.flops = lowered_flops(self.fn.lower(*args))
            out = jax.block_until_ready(self.fn(*args))
            self.cache._record(self.kind, time.perf_counter() - start)  # noqa: SLF001
            self.size = self.fn._cache_size()  # noqa: SLF001
            return out
        out = self.fn(*args)
        if self.fn._cache_size() != self.size:  # a silent recompile happened: count it
            self.cache._record(self.kind, 0.0)  # noqa: SLF001
            self.size = self.fn._cache_size()  # noqa: SLF001
        return out


def lowered_flops(lowered_or_compiled: Any) -> float:
    """FLOPs of one call of an executable, from XLA's cost analysis (0 where unavailable)."""
    cost = lowered_or_compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older JAX: one dict per device program
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def executable_flops(entry: Any) -> float:
    """FLOPs per call of an entry returned by :meth:`CompileCache.get` (after its first call)."""
    flops = getattr(entry, "flops", None)
    return float(flops) if flops is not None else lowered_flops(entry)


def call_flops(entry: Any, *args) -> float:
    """FLOPs of one call of a :meth:`CompileCache.get` entry on ``args``, without running it."""
    if isinstance(entry, _FirstCallTimed):
        if entry.flops is None:
            entry.flops = lowered_flops(entry.fn.lower(*args))
        return float(entry.flops)
    return lowered_flops(entry)


_DEFAULT: CompileCache | None = None


def default_cache() -> CompileCache:
    """The process-wide cache the trainer uses unless one is passed."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = CompileCache()
    return _DEFAULT
