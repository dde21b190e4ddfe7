"""Inference with one task's path: reads only that path's components (sparse activation)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np

from mu2net.system.state import StateError, System


@functools.lru_cache(maxsize=32)
def _logits_fn(family_name: str, arch_key: tuple, frozen_hparams: tuple):
    import jax

    from mu2net.models.base import get_family

    del arch_key  # part of the cache key only
    family = get_family(family_name)
    hparams = dict(frozen_hparams)
    return jax.jit(lambda params, x: family.apply(params, x, hparams))


def _freeze(hparams: Mapping[str, Any]) -> tuple:
    return tuple(sorted((k, v) for k, v in hparams.items() if not isinstance(v, dict | list)))


def predict_logits(system: System, task: str, inputs: np.ndarray) -> np.ndarray:
    """Logits of ``task``'s published path on a preprocessed batch ``inputs``."""
    from mu2net.models.base import get_family

    path = system.best_path(task)
    if path is None:
        known = sorted(p.task for p in system.task_paths())
        raise StateError(f"task {task!r} has no published path; tasks with paths: {known}")
    family = get_family(path.family)
    expected = family.dummy_inputs(path.hparams, 1)
    inputs = np.asarray(inputs)
    if inputs.ndim == expected.ndim - 1:
        inputs = inputs[None]
    if inputs.shape[1:] != expected.shape[1:]:
        raise ValueError(
            f"task {task!r}: inputs of shape {inputs.shape[1:]} per example, the "
            f"path expects {expected.shape[1:]} (dtype {expected.dtype})"
        )
    if inputs.dtype.kind != expected.dtype.kind:
        raise ValueError(f"task {task!r}: inputs dtype {inputs.dtype}, expected {expected.dtype}")
    if inputs.dtype.kind == "f" and not np.all(np.isfinite(inputs)):
        raise ValueError(f"task {task!r}: inputs contain NaN or inf")
    fn = _logits_fn(family.name, family.architecture_key(path.hparams), _freeze(path.hparams))
    return np.asarray(fn(system.params_of(path), inputs.astype(expected.dtype)))


def predict(system: System, task: str, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) of ``task``'s path on a preprocessed batch."""
    logits = predict_logits(system, task, inputs)
    z = logits - logits.max(-1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    return probs.argmax(-1), probs
