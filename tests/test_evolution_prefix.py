"""Frozen-prefix caching: staged application is exact and suffix training matches full training."""

import jax
import numpy as np
import pytest

from mu2net.evolution.prefix import (
    ActivationMemo,
    PrefixCache,
    deterministic_inputs,
    suffix_plan,
)
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


def test_memo_computes_each_example_once_across_generations():
    family = get_family("vit")
    hp = {**family.default_hparams(), "num_classes": 3, "ds_image_size": 16}
    params = _params(family, hp, seed=3)
    prefix = {n: params[n] for n in ("embedding", "cls", "posembed_input", "encoderblock_0")}
    ids = tuple(f"x/c{i}" for i in range(len(prefix)))
    rng = np.random.default_rng(1)
    pool = rng.normal(size=(24, 16, 16, 3)).astype(np.float32)

    def batches(rows):
        return [{"inputs": pool[r], "targets": np.zeros(len(r), np.int32)} for r in rows]

    memo = ActivationMemo()
    first = PrefixCache(
        family, batches([[0, 1, 2, 3], [4, 5, 6, 7]]), batches([[8, 9, 10, 11]]), memo
    )
    train1, _ = first.features(hp, prefix, ids, 2)
    assert (first.rows_computed, first.rows_reused) == (12, 0)
    # The next generation draws 4 seen examples (two of them twice) and 2 new ones.
    second = PrefixCache(
        family, batches([[5, 0, 20, 0], [5, 21, 1, 2]]), batches([[8, 9, 10, 11]]), memo
    )
    train2, val2 = second.features(hp, prefix, ids, 2)
    assert (second.rows_computed, second.rows_reused) == (2, 10)
    assert 0 < second.flops < first.flops
    np.testing.assert_array_equal(train2[0]["inputs"][1], train1[0]["inputs"][0])
    np.testing.assert_array_equal(train2[0]["inputs"][0], train1[1]["inputs"][1])
    # Reused or not, the rows are the prefix applied to the examples.
    direct = np.asarray(family.apply_stages(params, pool[[5, 21, 1, 2]], hp, 0, 2))
    np.testing.assert_allclose(train2[1]["inputs"], direct, atol=1e-5)
    # Other prefix params (same ids) are other content: nothing is reused.
    moved = jax.tree_util.tree_map(lambda a: a + 1.0, prefix)
    third = PrefixCache(family, batches([[0, 1, 2, 3]]), batches([[8]]), memo)
    third.features(hp, moved, ids, 2)
    assert (third.rows_computed, third.rows_reused) == (5, 0)


def test_memo_drops_the_least_recently_used_prefix():
    memo = ActivationMemo(max_bytes=100)
    memo.table(b"a")[b"r"] = np.zeros(10, np.float32)
    memo.added(b"a", 40)
    memo.table(b"b")[b"r"] = np.zeros(20, np.float32)
    memo.added(b"b", 80)
    assert memo.table(b"a") == {} and memo.rows == 1  # "a" was dropped for "b"
