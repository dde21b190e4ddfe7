"""Component cache: one copy of each published component per process, however many tasks use it.

Entries are keyed by ``(component id, sha256)``: ids are unique forever and params never change
after publish, and the checksum makes a re-written (repaired) file a different entry. Predictors
*pin* the entries they use; the byte bound evicts only unpinned entries, least recently used
first (an in-use entry cannot be freed anyway: its predictor holds it).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from mu2net.system.state import Component

Key = tuple[str, str]


def tree_nbytes(tree: Any) -> int:
    """Bytes of the arrays in a nested-dict pytree."""
    if isinstance(tree, dict):
        return sum(tree_nbytes(v) for v in tree.values())
    return int(getattr(tree, "nbytes", np.asarray(tree).nbytes))


def _tree_map(fn: Callable[[Any], Any], tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _tree_map(fn, v) for k, v in tree.items()}
    return fn(tree)


@dataclasses.dataclass
class _Entry:
    params: Any
    nbytes: int
    pins: int = 0


def cache_key(component: Component) -> Key | None:
    """The cache key of a committed component, or None (uncommitted params may still change)."""
    record = component.record or {}
    if not component.committed or not record.get("sha256"):
        return None
    return (component.id, str(record["sha256"]))


class ComponentCache:
    """Params of published components by ``(id, sha256)``, pinned by predictors, LRU-bounded.

    Args:
        max_bytes: bound on the bytes of unpinned entries kept (None: unbounded).
        to_device: applied to every array once, when it enters the cache (e.g.
            ``jax.device_put``, so predictions never copy params to the device again).
    """

    def __init__(self, max_bytes: int | None = None, to_device: Callable[[Any], Any] | None = None):
        self.max_bytes = max_bytes
        self._to_device = to_device
        self._entries: collections.OrderedDict[Key, _Entry] = collections.OrderedDict()
        self._lock = threading.RLock()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def acquire(self, component: Component) -> tuple[Any, Key | None]:
        """The params of ``component`` and the key to release (read from the store on a miss).

        Uncommitted components are not cached (their key is None, nothing to release).
        Raises whatever the store raises for a missing or corrupt file (naming the file).
        """
        key = cache_key(component)
        if key is None:
            return self._place(component.params), None
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                entry.pins += 1
                self.hits += 1
                return entry.params, key
        params = self._place(component.params)  # outside the lock: a read may be slow
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:  # another thread may have loaded it meanwhile: keep one copy
                entry = self._entries[key] = _Entry(params, tree_nbytes(params))
                self._bytes += entry.nbytes
                self.misses += 1
            else:
                self.hits += 1
            entry.pins += 1
            self._evict()
            return entry.params, key

    def release(self, keys: Iterable[Key | None]) -> None:
        """Unpins entries (a predictor was dropped); they stay cached until evicted."""
        with self._lock:
            for key in keys:
                entry = self._entries.get(key) if key is not None else None
                if entry is not None and entry.pins > 0:
                    entry.pins -= 1
            self._evict()

    def _place(self, params: Any) -> Any:
        return _tree_map(self._to_device, params) if self._to_device else params

    def _evict(self) -> None:
        if self.max_bytes is None:
            return
        for key in list(self._entries):
            if self._bytes <= self.max_bytes:
                return
            if self._entries[key].pins == 0:
                self._bytes -= self._entries.pop(key).nbytes

    @property
    def nbytes(self) -> int:
        """Bytes held by all entries (pinned or not)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def stats(self) -> dict[str, int]:
        """Entries, bytes, pinned entries, hits and misses."""
        with self._lock:
            return {
                "components": len(self._entries),
                "bytes": self._bytes,
                "pinned": sum(1 for e in self._entries.values() if e.pins),
                "hits": self.hits,
                "misses": self.misses,
            }
