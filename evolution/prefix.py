"""Frozen-prefix caching: compute the activations of a frozen prefix once per example.

When a candidate's lowest trainable component sits in stage k of its family (see
:meth:`~mu2net.models.base.Family.stages`), stages 0..k-1 are frozen and shared. If the
generation's input pipeline is deterministic (no random crop, flip or colour jitter), their
output is a fixed function of each example, so it is computed once for the generation's stream
and validation batches, and every candidate with the same prefix trains only the suffix, on
those activations, with the same trainer. The maths is unchanged (the prefix gets no gradient
anyway); the forward and backward passes through the prefix are skipped.

An :class:`ActivationMemo` (one per runner) keeps the activations of each example across the
generations and task iterations of a run, keyed by content: the prefix's parameter bytes and
each example's input bytes. A later generation computes only the examples its prefix has not
seen, whichever path, generation or iteration asked first.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from mu2net.models.base import Family, PrefixPart, freeze_hparams
from mu2net.train.compile_cache import lowered_flops

_MAX_CACHE_BYTES = 1536 * 2**20


def deterministic_inputs(ds_hparams: Mapping[str, Any]) -> bool:
    """Whether the training pipeline has no random augmentation under these ds hparams."""
    crop = bool(ds_hparams.get("ds_crop", False)) and (
        float(ds_hparams.get("ds_area_range_min", 1.0)) < 1.0
        or float(ds_hparams.get("ds_aspect_ratio_range_min", 1.0)) < 1.0
    )
    jitter = any(
        float(ds_hparams.get(k, 0.0) or 0.0) > 0
        for k in (
            "ds_brightness_delta",
            "ds_contrast_delta",
            "ds_saturation_delta",
            "ds_hue_delta",
            "ds_quality_delta",
        )
    )
    return not (crop or jitter or bool(ds_hparams.get("ds_flip_left_right", False)))


class SuffixFamily(Family):
    """Stages ``start..`` of a base family, applied to the prefix's activations."""

    def __init__(self, base: Family, start: int):
        self.base = base
        self.start = start
        self.name = f"{base.name}@stage{start}"
        self.modality = base.modality
        self.supports_adapters = base.supports_adapters

    def _names(self, hparams: Mapping[str, Any]) -> list[str]:
        return [n for stage in self.base.stages(hparams)[self.start :] for n in stage]

    def default_hparams(self) -> dict[str, Any]:
        """The base family's defaults."""
        return self.base.default_hparams()

    def component_names(self, hparams: Mapping[str, Any]) -> list[str]:
        """Components of the suffix stages."""
        return self._names(hparams)

    def init(self, rng: jax.Array, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """The base init restricted to the suffix."""
        names = set(self._names(hparams))
        return {n: p for n, p in self.base.init(rng, hparams).items() if n in names}

    def apply(self, params, inputs, hparams):
        """Logits from the prefix's activations."""
        return self.base.apply_stages(params, inputs, hparams, self.start, None)

    def load_pretrained(self, hparams, path=None):
        """Suffixes are built from paths, never loaded."""
        raise NotImplementedError("a suffix family has no checkpoint")

    def architecture_key(self, hparams: Mapping[str, Any]) -> tuple:
        """The base key plus the stage the suffix starts at."""
        return (*self.base.architecture_key(hparams), ("suffix_start", self.start))


def first_trainable_stage(
    family: Family, hparams: Mapping[str, Any], trainable: Sequence[str]
) -> int:
    """Index of the first stage holding a trainable component (0 when not staged)."""
    stages = family.stages(hparams)
    if not stages:
        return 0
    for i, stage in enumerate(stages):
        if any(n in trainable for n in stage):
            return i
    return len(stages) - 1


@functools.lru_cache(maxsize=64)
def _prefix_fn(family: Family, arch_key: tuple, frozen_hp: tuple, stop: int):
    del arch_key
    hparams = dict(frozen_hp)
    return jax.jit(lambda params, x: family.apply_stages(params, x, hparams, 0, stop))


def _digest(*chunks: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for c in chunks:
        h.update(c)
    return h.digest()


def _row_digests(x: np.ndarray) -> list[bytes]:
    head = f"{x.dtype.str}{x.shape[1:]}".encode()
    return [_digest(head, np.ascontiguousarray(row).tobytes()) for row in x]


class ActivationMemo:
    """Prefix activations per example, kept across generations and task iterations.

    One table per prefix content (see :meth:`PrefixCache.features`), holding one row per
    distinct example input. Tables are dropped least recently used first once the rows held
    exceed ``max_bytes``.
    """

    def __init__(self, max_bytes: int = _MAX_CACHE_BYTES):
        self.max_bytes = max_bytes
        self._tables: collections.OrderedDict[bytes, dict[bytes, np.ndarray]] = (
            collections.OrderedDict()
        )
        self._bytes: dict[bytes, int] = {}

    def table(self, key: bytes) -> dict[bytes, np.ndarray]:
        """The rows of one prefix (created empty), marked as most recently used."""
        if key not in self._tables:
            self._tables[key] = {}
            self._bytes[key] = 0
        self._tables.move_to_end(key)
        return self._tables[key]

    def added(self, key: bytes, nbytes: int) -> None:
        """Records ``nbytes`` of new rows in ``key``'s table and evicts older tables."""
        self._bytes[key] += nbytes
        while sum(self._bytes.values()) > self.max_bytes and len(self._tables) > 1:
            old, _ = self._tables.popitem(last=False)
            del self._bytes[old]

    @property
    def rows(self) -> int:
        """Rows held over all tables."""
        return sum(len(t) for t in self._tables.values())


class PrefixCache:
    """Activations of frozen prefixes for one generation, keyed by the prefix's component ids.

    Args:
      family: the generation's model family.
      train_batches: the generation's (materialised) training stream.
      val_batches: its validation batches.
      memo: rows computed by earlier generations, reused when their prefix and inputs are
        byte-identical; None computes every row of this generation.
    """

    def __init__(
        self,
        family: Family,
        train_batches: Sequence[dict],
        val_batches: Sequence[dict],
        memo: ActivationMemo | None = None,
    ):
        self.family = family
        self.train_batches = list(train_batches)
        self.val_batches = list(val_batches)
        self.memo = memo
        self._entries: dict[tuple, tuple[list[dict], list[dict]]] = {}
        self.hits = 0
        self.misses = 0
        self.flops = 0.0  # XLA count of the prefix activations computed (once each)
        self.rows_computed = 0
        self.rows_reused = 0
        # What computing every row of the generation again would have cost (no memo).
        self.flops_without_memo = 0.0
        self.seconds = 0.0  # wall time spent computing activations

    def features(
        self, hparams: Mapping[str, Any], params: Mapping[str, Any], prefix_ids: tuple, stop: int
    ) -> tuple[list[dict], list[dict]] | None:
        """(train, validation) batches with ``inputs`` replaced by the prefix's activations.

        Returns None when the activations would not fit the memory budget.
        """
        key = (prefix_ids, stop)
        if key in self._entries:
            self.hits += 1
            return self._entries[key]
        frozen = freeze_hparams(hparams)
        arch = self.family.architecture_key(hparams)
        fn = _prefix_fn(self.family, arch, frozen, stop)
        x = self.train_batches[0]["inputs"]
        out = jax.eval_shape(fn, params, x)
        row_bytes = int(np.prod(out.shape[1:])) * np.dtype(out.dtype).itemsize
        examples = sum(len(b["inputs"]) for b in (*self.train_batches, *self.val_batches))
        if row_bytes * examples > _MAX_CACHE_BYTES:
            return None
        self.misses += 1
        t0 = time.perf_counter()
        whole = PrefixPart(repr((arch, stop)), dict, fn)
        parts = self.family.prefix_parts(hparams, stop) or [whole]
        batches = [*self.train_batches, *self.val_batches]
        outs = [self._part_rows(part, part.select(params), batches) for part in parts]
        feats = [
            {**b, "inputs": o[0] if len(o) == 1 else np.concatenate(o, axis=-1)}
            for b, o in zip(batches, zip(*outs))
        ]
        entry = (feats[: len(self.train_batches)], feats[len(self.train_batches) :])
        self.seconds += time.perf_counter() - t0
        self._entries[key] = entry
        return entry

    def _part_rows(self, part: PrefixPart, params: dict, batches: list[dict]) -> list[np.ndarray]:
        """The part's activations for every batch; new rows run, the memo's rows reused."""
        x = np.asarray(batches[0]["inputs"])
        per_example = lowered_flops(part.apply.lower(params, x)) / max(len(x), 1)
        memo_key, table = None, {}
        if self.memo is not None:
            memo_key = _digest(part.key.encode(), *_param_bytes(params))
            table = self.memo.table(memo_key)
        outs, new, executed = [], 0, 0
        for b in batches:
            rows, n, ran = _rows_through(part.apply, params, np.asarray(b["inputs"]), table, len(x))
            outs.append(rows)
            new, executed = new + n, executed + ran
        examples = sum(len(o) for o in outs)
        self.flops += per_example * executed
        self.flops_without_memo += per_example * examples
        self.rows_computed += new
        self.rows_reused += examples - new
        if memo_key is not None:
            self.memo.added(memo_key, outs[0][0].nbytes * new)
        return outs


def _param_bytes(params: Mapping[str, Any]) -> list[bytes]:
    """Names and bytes of every leaf, in a fixed order (the prefix's content)."""
    flat = jax.tree_util.tree_flatten_with_path(dict(params))[0]
    return [
        repr(path).encode() + np.ascontiguousarray(np.asarray(leaf)).tobytes()
        for path, leaf in flat
    ]


def _rows_through(fn, params, x: np.ndarray, table: dict, chunk: int):
    """``fn`` of every row of ``x``, rows already in ``table`` reused.

    New rows run in chunks of ``chunk`` (the training batch size), the last one padded, so
    one executable serves every call. Returns (activations, new rows, rows executed).
    """
    digests = _row_digests(x)
    missing = list(dict.fromkeys(d for d in digests if d not in table))
    where = {d: i for i, d in enumerate(digests)}
    rows = x[[where[d] for d in missing]]
    executed = 0
    for lo in range(0, len(rows), chunk):
        part = rows[lo : lo + chunk]
        padded = np.concatenate([part, np.repeat(part[-1:], chunk - len(part), 0)])
        executed += len(padded)
        for d, row in zip(missing[lo : lo + chunk], np.asarray(fn(params, padded))):
            table[d] = row
    return np.stack([table[d] for d in digests]), len(missing), executed


def suffix_plan(
    cache: PrefixCache | None,
    family: Family,
    hparams: Mapping[str, Any],
    components: Mapping[str, str],
    trainable: Mapping[str, Any],
    frozen: Mapping[str, Any],
    batches: Sequence[dict],
    val_batches: Sequence[dict],
) -> tuple[Family, Mapping[str, Any], Sequence[dict], Sequence[dict]]:
    """(family, frozen, train batches, validation batches) to train a candidate with.

    With a cache and a frozen prefix, the family is the suffix and the batches hold the
    prefix's activations; otherwise everything is returned unchanged.
    """
    stage = first_trainable_stage(family, hparams, list(trainable))
    if cache is None or stage == 0:
        return family, frozen, batches, val_batches
    names = [n for st in family.stages(hparams)[:stage] for n in st]
    feats = cache.features(
        hparams, {n: frozen[n] for n in names}, tuple(components[n] for n in names), stage
    )
    if feats is None:
        return family, frozen, batches, val_batches
    suffix_frozen = {n: p for n, p in frozen.items() if n not in names}
    return SuffixFamily(family, stage), suffix_frozen, feats[0], feats[1]
