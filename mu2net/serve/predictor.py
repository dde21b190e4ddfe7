"""One task's predictor, and a pool of them that shares components and follows new paths.

A :class:`TaskPredictor` is an immutable snapshot of one published path: its params (from the
:class:`~mu2net.serve.cache.ComponentCache`), its family's compiled forward pass and its input
spec. Every batch runs in fixed-size chunks (zero-padded), so a row's result never depends on
how requests were batched together: the server and in-process :meth:`TaskPredictor.predict`
answer bit-identically.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mu2net.models.base import FamilyError, get_family
from mu2net.serve.cache import ComponentCache, Key
from mu2net.serve.errors import InputError, PayloadTooLarge, UnknownTaskError
from mu2net.system.state import Path, System
from mu2net.system.store import Store, StoreError

DEFAULT_CHUNK = 16


@functools.lru_cache(maxsize=64)
def _logits_fn(family_name: str, arch_key: tuple, frozen_hparams: tuple):
    import jax

    del arch_key  # part of the cache key only: one compiled program per architecture
    family = get_family(family_name)
    hparams = dict(frozen_hparams)
    return jax.jit(lambda params, x: family.apply(params, x, hparams))


def clear_compile_cache() -> None:
    """Forgets the compiled forward passes (benchmarks time a fresh process's first call)."""
    _logits_fn.cache_clear()


def _freeze(hparams: Mapping[str, Any]) -> tuple:
    return tuple(sorted((k, v) for k, v in hparams.items() if not isinstance(v, dict | list)))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32 (numpy, so every caller gets the same bits)."""
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


class TaskPredictor:
    """The published path of one task, ready to predict; reads only that path's components.

    Build it with :meth:`load` (from a store) or :meth:`from_system`. ``close()`` unpins its
    components in the cache.
    """

    def __init__(
        self,
        path: Path,
        params: dict[str, Any],
        cache: ComponentCache | None = None,
        keys: Sequence[Key | None] = (),
        chunk_size: int = DEFAULT_CHUNK,
    ):
        self.path = path
        self.family = get_family(path.family)
        self.params = params
        self.chunk_size = int(chunk_size)
        self.max_examples = 1 << 20
        self._cache, self._keys = cache, list(keys)
        self._expected = self.family.dummy_inputs(path.hparams, 1)
        self._fn = _logits_fn(
            self.family.name, self.family.architecture_key(path.hparams), _freeze(path.hparams)
        )

    # ------------------------------------------------------------------------------ building
    @classmethod
    def load(
        cls,
        url: str | Store,
        task: str,
        *,
        cache: ComponentCache | None = None,
        chunk_size: int = DEFAULT_CHUNK,
    ) -> TaskPredictor:
        """``task``'s published path in the store at ``url`` (its task index, its components).

        Raises:
            UnknownTaskError: the task has no published path (the message lists those that do).
            StoreError: a missing or corrupt file (named).
        """
        store = Store.open(url) if isinstance(url, str) else url
        try:
            system = store.load_task(task)
        except StoreError as e:
            if "has no published path" in str(e):
                raise UnknownTaskError(str(e)) from None
            raise
        return cls.from_system(system, task, cache=cache, chunk_size=chunk_size)

    @classmethod
    def from_system(
        cls,
        system: System,
        task: str,
        *,
        cache: ComponentCache | None = None,
        chunk_size: int = DEFAULT_CHUNK,
    ) -> TaskPredictor:
        """The predictor of ``task``'s best path in ``system`` (params through ``cache``)."""
        path = system.best_path(task)
        if path is None:
            known = sorted(p.task for p in system.task_paths())
            raise UnknownTaskError(
                f"task {task!r} has no published path; tasks with paths: {known}"
            )
        cache = cache if cache is not None else ComponentCache()
        params, keys = {}, []
        try:
            for name, component in system.path_components(path).items():
                params[name], key = cache.acquire(component)
                keys.append(key)
        except BaseException:
            cache.release(keys)
            raise
        return cls(path, params, cache, keys, chunk_size)

    def close(self) -> None:
        """Unpins this predictor's components (idempotent)."""
        if self._cache is not None:
            self._cache.release(self._keys)
            self._cache, self._keys = None, []

    # ------------------------------------------------------------------------------ facts
    @property
    def task(self) -> str:
        """The task this path answers."""
        return self.path.task

    @property
    def path_id(self) -> str:
        """Id of the published path (responses name it)."""
        return self.path.id

    @property
    def class_names(self) -> list[str]:
        """Class names recorded with the path (may be empty)."""
        return list(self.path.metrics.get("class_names") or [])

    @property
    def modality(self) -> str:
        """``"image"`` or ``"text"``."""
        return self.family.modality

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one preprocessed example."""
        return tuple(self._expected.shape[1:])

    @property
    def nbytes(self) -> int:
        """Bytes of this path's params (shared components counted in full)."""
        from mu2net.serve.cache import tree_nbytes

        return tree_nbytes(self.params)

    # ------------------------------------------------------------------------------ inputs
    def prepare(self, raw: Sequence[Any]) -> np.ndarray:
        """The batch of raw examples (decoded images or strings), as the eval pipeline makes it."""
        if self.modality == "image" and any(isinstance(r, str) for r in raw):
            raise InputError(f"task {self.task!r} takes images, got text")
        if self.modality == "text" and not all(isinstance(r, str) for r in raw):
            raise InputError(f"task {self.task!r} takes text, got images")
        try:
            return self.family.prepare_inputs(raw, self.path.hparams)
        except FamilyError as e:
            raise InputError(f"task {self.task!r}: {e}") from None

    def prepare_files(self, files: Sequence[str]) -> np.ndarray:
        """The batch of image files (PNG/JPEG) or text files (one example per line)."""
        from mu2net.serve.inputs import read_image_files, read_text_files

        raw = read_text_files(files) if self.modality == "text" else read_image_files(files)
        return self.prepare(raw)

    def check(self, inputs: Any) -> np.ndarray:
        """A preprocessed batch (or one example) checked against the path's input spec."""
        x = np.asarray(inputs)
        expected = self._expected
        if x.ndim == expected.ndim - 1:
            x = x[None]
        if x.shape[1:] != expected.shape[1:] or x.shape[0] == 0:
            raise InputError(
                f"task {self.task!r}: inputs of shape {x.shape[1:]} per example (batch "
                f"{x.shape[0] if x.ndim else 0}), the path expects {expected.shape[1:]} "
                f"(dtype {expected.dtype}, {self.modality})"
            )
        if x.dtype.kind != expected.dtype.kind:
            raise InputError(
                f"task {self.task!r}: inputs dtype {x.dtype}, expected {expected.dtype}"
            )
        if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
            raise InputError(f"task {self.task!r}: inputs contain NaN or inf")
        if len(x) > self.max_examples:
            raise PayloadTooLarge(
                f"task {self.task!r}: {len(x)} examples, limit {self.max_examples}"
            )
        return x.astype(expected.dtype, copy=False)

    # ------------------------------------------------------------------------------ predicting
    def predict_logits(self, inputs: Any) -> np.ndarray:
        """Logits ``float32 [N, num_classes]`` of a preprocessed batch (fixed-size chunks)."""
        x = self.check(inputs)
        n, b = len(x), self.chunk_size
        padded = np.zeros((-(-n // b) * b, *x.shape[1:]), x.dtype)
        padded[:n] = x
        out = [np.asarray(self._fn(self.params, padded[i : i + b])) for i in range(0, n, b)]
        return np.concatenate(out)[:n]

    def predict(self, task: str, inputs: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(labels int [N], probabilities float32 [N, C])`` of ``task`` on a preprocessed batch.

        Raises:
            UnknownTaskError: ``task`` is not this predictor's task.
            InputError: wrong shape, dtype or modality, NaN/inf.
        """
        if task != self.task:
            raise UnknownTaskError(f"this predictor answers task {self.task!r}, not {task!r}")
        probs = softmax(self.predict_logits(inputs))
        return probs.argmax(-1), probs

    def warm_up(self) -> None:
        """Compiles the forward pass (so the first request does not pay for it)."""
        self.predict_logits(np.zeros((1, *self.input_shape), self._expected.dtype))


def load(url: str | Store, task: str, **kwargs: Any) -> TaskPredictor:
    """``TaskPredictor.load(url, task, ...)``: one task's path, ready to predict."""
    return TaskPredictor.load(url, task, **kwargs)


class PredictorPool:
    """The predictors of many tasks of one store, sharing one component cache (per process).

    A task is loaded on first use (its task index and components only) and kept in an LRU of
    ``max_paths`` paths; once the cache holds more than ``max_bytes`` the least recently used
    paths are dropped too. :meth:`refresh` swaps in a task's newly published path (loaded and
    compiled before the swap): a caller holding a predictor keeps a consistent snapshot.
    """

    def __init__(
        self,
        url: str,
        *,
        max_paths: int = 64,
        max_bytes: int | None = None,
        chunk_size: int = DEFAULT_CHUNK,
        to_device: Any = None,
    ):
        self.store = Store.open(url)
        self.max_paths = int(max_paths)
        self.max_bytes = max_bytes
        self.chunk_size = chunk_size
        self.cache = ComponentCache(max_bytes, to_device)
        self._predictors: dict[str, TaskPredictor] = {}  # insertion order = LRU order
        self._lock = threading.RLock()
        self._loading: dict[str, threading.Lock] = {}

    def get(self, task: str) -> TaskPredictor:
        """The current predictor of ``task`` (loading it on first use)."""
        with self._lock:
            pred = self._predictors.pop(task, None)
            if pred is not None:
                self._predictors[task] = pred  # most recently used
                return pred
            gate = self._loading.setdefault(task, threading.Lock())
        with gate:  # one load per task at a time; other tasks keep being served
            with self._lock:
                if task in self._predictors:
                    return self._predictors[task]
            pred = self._load(task)
            with self._lock:
                self._predictors[task] = pred
                self._bound(keep=task)
            return pred

    def _load(self, task: str) -> TaskPredictor:
        pred = TaskPredictor.load(self.store, task, cache=self.cache, chunk_size=self.chunk_size)
        try:
            pred.warm_up()
        except BaseException:
            pred.close()
            raise
        return pred

    def _bound(self, keep: str) -> None:
        while len(self._predictors) > self.max_paths or (
            self.max_bytes is not None and self.cache.nbytes > self.max_bytes
        ):
            victim = next((t for t in self._predictors if t != keep), None)
            if victim is None:
                return
            self._predictors.pop(victim).close()

    def drop(self, task: str) -> None:
        """Forgets ``task``'s predictor (its components stay cached until evicted)."""
        with self._lock:
            pred = self._predictors.pop(task, None)
        if pred is not None:
            pred.close()

    def loaded(self) -> list[str]:
        """Tasks with a predictor in memory, least recently used first."""
        with self._lock:
            return list(self._predictors)

    def refresh(self) -> list[str]:
        """Swaps in newly published paths of the loaded tasks; returns the tasks that changed.

        Reads each loaded task's index (small metadata files). A task whose new path fails to
        load keeps its current one (the error is raised after the other tasks were refreshed).
        """
        changed, errors = [], []
        for task in self.loaded():
            try:
                current = self.store.load_task(task).best_path(task)
                with self._lock:
                    old = self._predictors.get(task)
                if old is None or current is None or current.id == old.path_id:
                    continue
                new = self._load(task)
            except Exception as e:  # noqa: BLE001 - reported below, other tasks go on
                errors.append(e)
                continue
            with self._lock:
                stale = self._predictors.get(task)
                self._predictors[task] = new
            if stale is not None:
                stale.close()
            changed.append(task)
        if errors:
            raise errors[0]
        return changed

    def stats(self) -> dict[str, Any]:
        """Cache statistics plus the loaded paths and the sum of their sizes."""
        with self._lock:
            preds = list(self._predictors.values())
        return {
            **self.cache.stats(),
            "paths": {p.task: p.path_id for p in preds},
            "path_bytes_sum": sum(p.nbytes for p in preds),
        }
