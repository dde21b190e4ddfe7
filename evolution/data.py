"""The data a task iteration needs, fetched through the seqio tasks and cached per process.

Evaluation splits depend only on the deterministic dataset hparams (image size / max length),
so they are loaded once per (task, split, size). A generation's training stream is shared by all
its candidates (reference §6.4: the same batch goes to every device), so it is materialised once
per generation when it fits in memory.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from mu2net.models.base import Family

_MAX_STREAM_BYTES = 768 * 2**20


def _eval_key(ds_hparams: Mapping[str, Any]) -> tuple:
    return tuple(
        sorted((k, ds_hparams[k]) for k in ("ds_image_size", "ds_max_length") if k in ds_hparams)
    )


@functools.lru_cache(maxsize=64)
def _load_split(task: str, split: str, key: tuple, mean: tuple, std: tuple, cap: int | None):
    from mu2net.tasks import data as task_data

    arrays = task_data.load_split(
        task, split, ds_hparams=dict(key), pixel_mean=mean, pixel_std=std, max_examples=cap
    )
    return {k: np.asarray(v) for k, v in arrays.items()}


def eval_arrays(
    task: str, split: str, family: Family, ds_hparams: Mapping[str, Any], cap: int | None = None
) -> dict[str, np.ndarray]:
    """A whole evaluation split (or its first ``cap`` examples), preprocessed deterministically."""
    return _load_split(
        task, split, _eval_key(ds_hparams), tuple(family.pixel_mean), tuple(family.pixel_std), cap
    )


class TrainStream:
    """The training batches of one generation, identical for every candidate."""

    def __init__(
        self,
        task: str,
        family: Family,
        ds_hparams: Mapping[str, Any],
        batch_size: int,
        num_steps: int,
        seed: int,
    ):
        self._args = dict(
            name=task,
            split="train",
            batch_size=batch_size,
            ds_hparams=dict(ds_hparams),
            pixel_mean=tuple(family.pixel_mean),
            pixel_std=tuple(family.pixel_std),
            train=True,
            seed=seed,
            repeat=True,
            drop_remainder=True,
        )
        self.num_steps = num_steps
        self._cache: list[dict] | None = None
        example = family.dummy_inputs(dict(ds_hparams), batch_size)
        if example.nbytes * num_steps <= _MAX_STREAM_BYTES:
            self._cache = list(itertools.islice(self._fresh(), num_steps))

    @property
    def materialized(self) -> bool:
        """Whether the batches are held in memory (required by frozen-prefix caching)."""
        return self._cache is not None

    def _fresh(self) -> Iterator[dict]:
        from mu2net.tasks import data as task_data

        return task_data.numpy_batches(**self._args)

    def __iter__(self) -> Iterator[dict]:
        if self._cache is not None:
            return iter(self._cache)
        return itertools.islice(self._fresh(), self.num_steps)


def steps_between_validations(num_train: int, cap: int, batch_size: int) -> int:
    """S = ceil(min(#train, cap) / batch) (reference §4.5)."""
    return max(1, -(-min(num_train, cap) // batch_size))
