"""Evaluation batches: the fixed validation set of reference §4.5, and whole test splits."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from mu2net.errors import Mu2netError


class EmptySplitError(Mu2netError, ValueError):
    """An evaluation split with no examples."""


def validation_batches(
    arrays: Mapping[str, np.ndarray], batch_size: int, cap: int | None = None
) -> list[dict]:
    """Equal-size validation batches as in reference §4.5: every evaluation sees the same ones.

    With ``n >= cap`` examples: ``floor(cap / batch_size)`` batches of ``batch_size``; else
    ``ceil(n / batch_size)`` batches of ``floor(n / #batches)`` (a few examples may be left out),
    so no batch shape is new.
    """
    n = len(arrays["targets"])
    if n == 0:
        raise EmptySplitError("the validation split is empty")
    if cap is not None and n >= cap:
        count, size = max(cap // batch_size, 1), min(batch_size, n)
    else:
        count = math.ceil(n / batch_size)
        size = n // count
    return [{k: v[i * size : (i + 1) * size] for k, v in arrays.items()} for i in range(count)]


def eval_batches(arrays: Mapping[str, np.ndarray], batch_size: int) -> list[dict]:
    """All examples in batches (the last one partial), for test evaluation (§4.8)."""
    n = len(arrays["targets"])
    return [{k: v[i : i + batch_size] for k, v in arrays.items()} for i in range(0, n, batch_size)]
