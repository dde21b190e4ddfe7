"""Frozen-prefix caching: staged application is exact and suffix training matches full training."""

import jax
import numpy as np
import pytest

from mu2net.evolution.prefix import PrefixCache, deterministic_inputs, suffix_plan
from mu2net.models import get_family
from mu2net.train.trainer import TrainConfig, train_candidate

FAMILIES = {
    "vit": {"num_classes": 5, "adapter_layers": "1", "ds_image_size": 16},
    "efficientnet_lite0": {"num_classes": 5, "adapter_layers": "3", "ds_image_size": 32},
}


def _params(family, hp, seed=0):
    p = jax.device_get(family.init(jax.random.PRNGKey(seed), hp))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda a: a + (0.05 * rng.normal(size=a.shape)).astype(a.dtype), p
    )


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_split_point_reproduces_the_full_model(name):
    family = get_family(name)
    hp = {**family.default_hparams(), **FAMILIES[name]}
    params = _params(family, hp)
    x = np.random.default_rng(1).normal(size=(2, *family.dummy_inputs(hp).shape[1:]))
    x = x.astype(np.float32)
    full = np.asarray(family.apply(params, x, hp))
    stages = family.stages(hp)
    assert [n for st in stages for n in st] == family.component_names(hp)
    for k in range(len(stages) + 1):
        mid = family.apply_stages(params, x, hp, 0, k)
        out = np.asarray(family.apply_stages(params, mid, hp, k, None))
        np.testing.assert_allclose(out, full, atol=1e-4, rtol=1e-4)


def test_deterministic_inputs():
    assert deterministic_inputs({"ds_crop": False, "ds_flip_left_right": False})
    assert deterministic_inputs(
        {"ds_crop": True, "ds_area_range_min": 1.0, "ds_aspect_ratio_range_min": 1.0}
    )
    assert not deterministic_inputs({"ds_crop": True, "ds_area_range_min": 0.5})
    assert not deterministic_inputs({"ds_flip_left_right": True})
    assert not deterministic_inputs({"ds_hue_delta": 0.1})


def test_suffix_training_matches_full_training():
    family = get_family("vit")
    hp = {
        **family.default_hparams(),
        "num_classes": 3,
        "ds_image_size": 16,
        "opt_lr": 0.1,
        "opt_lr_schedule": "constant",
        "opt_momentum": 0.9,
        "opt_nesterov": False,
        "opt_lr_warmup_ratio": 0.1,
    }
    params = _params(family, hp, seed=2)
    rng = np.random.default_rng(0)
    batches = [
        {
            "inputs": rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
            "targets": rng.integers(0, 3, size=(8,)).astype(np.int32),
        }
        for _ in range(6)
    ]
    trainable_names = ["encoderblock_1", "encoder_norm", "head"]
    trainable = {n: params[n] for n in trainable_names}
    frozen = {n: p for n, p in params.items() if n not in trainable_names}
    components = {n: f"x/c{i}" for i, n in enumerate(family.component_names(hp))}
    cfg = TrainConfig(
        batch_size=8, steps_between_validations=3, num_validations=2, momentum_dtype=None
    )
    full = train_candidate(
        family=family,
        hparams=hp,
        trainable=trainable,
        frozen=frozen,
        train_batches=iter(batches),
        validation_batches=batches[:2],
        config=cfg,
        progress=False,
    )
    cache = PrefixCache(family, batches, batches[:2])
    fam2, frozen2, b2, v2 = suffix_plan(
        cache, family, hp, components, trainable, frozen, batches, batches[:2]
    )
    assert fam2 is not family and set(frozen2) == set()
    assert b2[0]["inputs"].shape == (8, 1 + 16, 32)  # tokens after block 0
    suffix = train_candidate(
        family=fam2,
        hparams=hp,
        trainable=trainable,
        frozen=frozen2,
        train_batches=iter(b2),
        validation_batches=v2,
        config=cfg,
        progress=False,
    )
    assert suffix.quality == pytest.approx(full.quality)
    for n in trainable_names:
        for a, b in zip(
            jax.tree_util.tree_leaves(full.best_trainable[n]),
            jax.tree_util.tree_leaves(suffix.best_trainable[n]),
        ):
            np.testing.assert_allclose(a, b, atol=1e-4)
    # A second candidate with the same frozen prefix reuses the activations.
    suffix_plan(cache, family, hp, components, trainable, frozen, batches, batches[:2])
    assert (cache.misses, cache.hits) == (1, 1)
