"""Frozen-prefix caching: compute the activations of a frozen prefix once per generation.

When a candidate's lowest trainable component sits in stage k of its family (see
:meth:`~mu2net.models.base.Family.stages`), stages 0..k-1 are frozen and shared. If the
generation's input pipeline is deterministic (no random crop, flip or colour jitter), their
output is a fixed function of each example, so it is computed once for the generation's stream
and validation batches, and every candidate with the same prefix trains only the suffix, on
those activations, with the same trainer. The maths is unchanged (the prefix gets no gradient
anyway); the forward and backward passes through the prefix are skipped.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from mu2net.models.base import Family, freeze_hparams
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


class PrefixCache:
    """Activations of frozen prefixes for one generation, keyed by the prefix's component ids."""

    def __init__(self, family: Family, train_batches: Sequence[dict], val_batches: Sequence[dict]):
        self.family = family
        self.train_batches = list(train_batches)
        self.val_batches = list(val_batches)
        self._entries: dict[tuple, tuple[list[dict], list[dict]]] = {}
        self.hits = 0
        self.misses = 0
        self.flops = 0.0  # XLA count of the prefix activations computed (once each)

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
        fn = _prefix_fn(self.family, self.family.architecture_key(hparams), frozen, stop)
        probe = np.asarray(fn(params, self.train_batches[0]["inputs"]))
        total = probe.nbytes * (len(self.train_batches) + len(self.val_batches))
        if total > _MAX_CACHE_BYTES:
            return None
        self.misses += 1
        x = self.train_batches[0]["inputs"]
        per_example = lowered_flops(fn.lower(params, x)) / max(len(x), 1)
        examples = sum(len(b["inputs"]) for b in (*self.train_batches, *self.val_batches))
        self.flops += per_example * examples

        def convert(batches):
            return [{**b, "inputs": np.asarray(fn(params, b["inputs"]))} for b in batches]

        entry = (convert(self.train_batches), convert(self.val_batches))
        self._entries[key] = entry
        return entry


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
