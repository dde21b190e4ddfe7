"""The hyperparameter search space and its mutations (reference §2.1, §2.7, §3, §7.1).

A search space maps gin-style hparam keys to ordered value lists. Mutations are *incremental*:
the value's index moves by +1 or -1 with probability 1/2 each, clamped at the ends (reference
§2: no hparam is ever resampled uniformly). Keys are processed in sorted order so ``_mu_``, the
mutation probability, is mutated first and later draws use the updated value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

MU = "_mu_"
_LR = [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5]
_WARMUP = [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4]
_DELTAS = [0.0, 0.01, 0.02, 0.05, 0.1, 0.2]
_AREA = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
_ASPECT = [0.25, 0.5, 0.75, 1.0]

# µ2Net "autotune" v1 (Ti3 chars, B VDD; reference §3.3).
AUTOTUNE_V1: dict[str, list] = {
    "adapter_dim": [8, 16, 32, 64, 128],
    "opt_lr": _LR,
    "opt_lr_schedule": ["constant", "cosine", "restarts"],
    "opt_lr_warmup_ratio": _WARMUP,
    "opt_momentum": [None, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99],
    "opt_nesterov": [True, False],
    "ds_image_size": list(range(16, 385, 16)),
    "ds_area_range_min": _AREA,
    "ds_aspect_ratio_range_min": _ASPECT,
    "ds_flip_left_right": [True, False],
    "ds_brightness_delta": _DELTAS,
    "ds_contrast_delta": _DELTAS,
    "ds_saturation_delta": _DELTAS,
    "ds_hue_delta": _DELTAS,
}

# µ2Net "autotune" v2 (ViT-L 69-task runs and Ti0; reference §3.3).
AUTOTUNE_V2: dict[str, list] = {
    MU: [round(0.10 + 0.02 * i, 2) for i in range(11)],
    "opt_lr": _LR,
    "opt_lr_warmup_ratio": _WARMUP,
    "opt_momentum": [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99],
    "opt_nesterov": [True, False],
    "ds_area_range_min": _AREA,
    "ds_crop": [True, False],
    "ds_aspect_ratio_range_min": _ASPECT,
    "ds_flip_left_right": [True, False],
    "ds_brightness_delta": _DELTAS,
    "ds_contrast_delta": _DELTAS,
    "ds_saturation_delta": _DELTAS,
    "ds_hue_delta": _DELTAS,
}

# µ3Net autotune (reference §7.1), without the size-specific keys.
AUTOTUNE_MU3: dict[str, list] = {
    MU: [round(0.02 * i, 2) for i in range(1, 16)],
    "opt_lr": _LR,
    "opt_lr_warmup_ratio": [0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3],
    "opt_momentum": [0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99],
    "opt_nesterov": [True, False],
    "ds_area_range_min": [0.05, 0.5, 0.95, 1.0],
    "ds_aspect_ratio_range_min": [0.5, 0.75, 1.0],
    "ds_flip_left_right": [True, False],
    "ds_brightness_delta": _DELTAS,
    "ds_contrast_delta": _DELTAS,
    "ds_saturation_delta": _DELTAS,
    "ds_hue_delta": _DELTAS,
    "ds_quality_delta": _DELTAS,
}

SPACES: dict[str, dict[str, list]] = {
    "none": {},
    "v1": AUTOTUNE_V1,
    "v2": AUTOTUNE_V2,
    "mu3": AUTOTUNE_MU3,
}

# Defaults shared by every config (reference §3.2, Ti3 column); configs override.
BASE_DEFAULTS: dict[str, Any] = {
    MU: 0.1,
    "adapter_layers": "",
    "adapter_dim": 32,
    "opt_lr": 0.01,
    "opt_lr_schedule": "cosine",
    "opt_lr_warmup_ratio": 0.1,
    "opt_momentum": 0.9,
    "opt_nesterov": False,
    "ds_image_size": 32,
    "ds_crop": True,
    "ds_area_range_min": 0.05,
    "ds_aspect_ratio_range_min": 0.75,
    "ds_flip_left_right": True,
    "ds_brightness_delta": 0.0,
    "ds_contrast_delta": 0.0,
    "ds_saturation_delta": 0.0,
    "ds_hue_delta": 0.0,
    "ds_quality_delta": 0.0,
}


def is_dataset_key(key: str) -> bool:
    """Dataset hparams are shared by a whole generation (reference §4.4)."""
    return key.startswith("ds_")


def incremental_mutation(value: Any, values: Sequence[Any], rng: np.random.Generator) -> Any:
    """Moves ``value`` one step up or down ``values`` (clamped at the ends).

    A value missing from the list (e.g. set by hand) snaps to the nearest listed value.
    """
    idx = _index_of(value, values)
    idx = min(max(idx + (1 if rng.random() < 0.5 else -1), 0), len(values) - 1)
    return values[idx]


def _index_of(value: Any, values: Sequence[Any]) -> int:
    for i, v in enumerate(values):
        if v == value or (v is None and value is None):
            return i
    numeric = [
        (abs(float(v) - float(value)), i)
        for i, v in enumerate(values)
        if isinstance(v, int | float) and isinstance(value, int | float) and not isinstance(v, bool)
    ]
    if numeric:
        return min(numeric)[1]
    raise ValueError(f"value {value!r} not in the search list {list(values)!r}")


def bernoulli(p: float, rng: np.random.Generator) -> bool:
    """The reference's trial: fires iff ``p > U(0, 1)``."""
    return p > rng.random()


def mutation_probability(
    hparams: dict[str, Any], name: str, space: Mapping[str, Sequence], rng, per_type: bool
) -> float:
    """Probability of mutation ``name`` (``hp:opt_lr``, ``clone:block_3``, ...).

    With ``per_type`` (µ3Net), each mutation type has its own self-tuned probability stored as
    hparam ``_mu_|<name>`` (default: the path's ``_mu_``); it first moves one step in the ``_mu_``
    list with probability ``_mu_`` and is written back so children inherit it.
    """
    mu = float(hparams.get(MU, BASE_DEFAULTS[MU]))
    if not per_type:
        return mu
    key = f"{MU}|{name}"
    p = float(hparams.get(key, mu))
    if MU in space and bernoulli(mu, rng):
        p = incremental_mutation(p, space[MU], rng)
    hparams[key] = p
    return p


def mutate_model_hparams(
    hparams: dict[str, Any],
    space: Mapping[str, Sequence],
    rng: np.random.Generator,
    per_type: bool = False,
) -> dict[str, tuple[Any, Any]]:
    """Mutates non-dataset hparams in place, in sorted key order; returns {key: (old, new)}.

    Mutable keys (reference §2.1): ``_mu_``, ``num_layers``, ``adapter_dim`` and ``opt_*``.
    """
    changes = {}
    for key in sorted(space):
        if is_dataset_key(key):
            continue
        if not (key in (MU, "num_layers", "adapter_dim") or key.startswith("opt_")):
            continue
        if key not in hparams:
            continue
        if bernoulli(mutation_probability(hparams, f"hp:{key}", space, rng, per_type), rng):
            old = hparams[key]
            hparams[key] = incremental_mutation(old, space[key], rng)
            if hparams[key] != old:
                changes[key] = (old, hparams[key])
    return changes


def sample_dataset_hparams(
    defaults: Mapping[str, Any],
    best: Mapping[str, Any] | None,
    space: Mapping[str, Sequence],
    mu: float,
    rng: np.random.Generator,
) -> tuple[dict[str, Any], dict[str, tuple[Any, Any]]]:
    """Dataset hparams of one generation (reference §4.4).

    Starts from the defaults, overwritten by the task's best path; each ``ds_*`` key with a
    range mutates with probability ``mu`` (the config default, not the path's).
    """
    ds = {k: v for k, v in defaults.items() if is_dataset_key(k)}
    if best:
        ds.update({k: v for k, v in best.items() if is_dataset_key(k)})
    changes = {}
    for key in sorted(space):
        if is_dataset_key(key) and key in ds and bernoulli(mu, rng):
            old = ds[key]
            ds[key] = incremental_mutation(old, space[key], rng)
            if ds[key] != old:
                changes[key] = (old, ds[key])
    return ds, changes
