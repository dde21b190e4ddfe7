"""ViT family: components, adapters, layers, posembed, .npz import, errors, FLOPs, gradients."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mu2net.models import base, vit
from mu2net.models.base import FamilyError, apply_split, num_params

F = vit.FAMILY
TINY = {
    "vit_size": "test",
    "vit_hidden": 16,
    "vit_mlp_dim": 32,
    "vit_heads": 2,
    "vit_patch": 4,
    "num_layers": 2,
    "num_classes": 3,
    "adapter_layers": "",
    "adapter_dim": 4,
    "ds_image_size": 8,
}
PRE_LINEN = {
    "LayerNorm_0": "LayerNorm_0",
    "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
    "LayerNorm_1": "LayerNorm_2",
    "MlpBlock_0": "MlpBlock_3",
}


def hp(**kw):
    return {**TINY, **kw}


def randomize(params, seed=0):
    """Non-zero random params everywhere (heads too), so every component matters."""
    gen = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(0.5 * gen.standard_normal(x.shape), x.dtype), params
    )


def images(size=8, batch=3, seed=1):
    return np.random.RandomState(seed).randn(batch, size, size, 3).astype(np.float32)


def flat(tree, prefix=""):
    if not isinstance(tree, dict):
        return {prefix.rstrip("/"): np.asarray(tree)}
    out = {}
    for k, v in tree.items():
        out.update(flat(v, f"{prefix}{k}/"))
    return out


def to_vit_jax_npz(params, path, extra=None):
    """Writes params in the AugReg .npz layout (pre-linen block names), independently of the lib."""
    arrays = {}
    for name, p in params.items():
        for key, value in flat(p, name + "/").items():
            if name.startswith("encoderblock_"):
                parts = key.split("/")
                parts[1] = PRE_LINEN[parts[1]]
                key = "Transformer/" + "/".join(parts)
            elif name in ("posembed_input", "encoder_norm"):
                key = "Transformer/" + key
            arrays[key] = value
    arrays.update(extra or {})
    np.savez(path, **arrays)
    return arrays


def test_component_names_and_order():
    assert F.component_names(hp()) == [
        "embedding",
        "cls",
        "posembed_input",
        "encoderblock_0",
        "encoderblock_1",
        "encoder_norm",
        "head",
    ]
    names = F.component_names(hp(adapter_layers="0_1"))
    assert names[3:7] == [
        "residual_adapter_0",
        "encoderblock_0",
        "residual_adapter_1",
        "encoderblock_1",
    ]
    assert F.component_names(hp(num_layers=0, num_classes=0)) == [
        "embedding",
        "cls",
        "posembed_input",
        "encoder_norm",
    ]
    params = F.init(jax.random.PRNGKey(0), hp(adapter_layers="1"))
    assert sorted(params) == sorted(F.component_names(hp(adapter_layers="1")))
    assert params["cls"].shape == (1, 1, 16)
    assert params["posembed_input"]["pos_embedding"].shape == (1, 5, 16)
    assert params["embedding"]["kernel"].shape == (4, 4, 3, 16)
    # Zero-init head and adapter outputs: a new head outputs zeros.
    assert not np.any(params["head"]["kernel"]) and not np.any(params["head"]["bias"])
    assert not np.any(params["residual_adapter_1"]["Dense_1"]["kernel"])
    np.testing.assert_array_equal(F.apply(params, images(), hp(adapter_layers="1")), 0.0)


def test_zero_layers_and_headless_model():
    params = randomize(F.init(jax.random.PRNGKey(0), hp(num_layers=0)))
    assert F.apply(params, images(), hp(num_layers=0)).shape == (3, 3)
    del params["head"]
    rep = F.apply(params, images(), hp(num_layers=0, num_classes=0))
    assert rep.shape == (3, 16)


@pytest.mark.parametrize(
    "size,layers,image,expected",
    # The reference's scorer bases (method.md §1.1) for 2 classes.
    [("Ti/16", 3, 32, 1_484_162), ("B/16", 12, 32, 85_652_738), ("L/16", 24, 224, 303_303_682)],
)
def test_param_counts_match_reference(size, layers, image, expected):
    shapes = F.expected_shapes(
        {"vit_size": size, "num_layers": layers, "num_classes": 2, "ds_image_size": image}
    )
    assert num_params(shapes) == expected


def test_adapter_insertion_is_bit_identical():
    params = randomize(F.init(jax.random.PRNGKey(0), hp()))
    before = F.apply(params, images(), hp())
    new_hp = hp(adapter_layers="0_1")
    fresh = F.init(jax.random.PRNGKey(5), new_hp)
    with_adapters = {**params, **{k: v for k, v in fresh.items() if k.startswith("residual_")}}
    after = F.apply(with_adapters, images(), new_hp)
    np.testing.assert_array_equal(np.asarray(before), np.asarray(after))
    # Once trained (non-zero adapter output) the function does change: the adapter is live.
    trained = dict(with_adapters)
    trained["residual_adapter_1"] = randomize(with_adapters["residual_adapter_1"])
    assert not np.allclose(F.apply(trained, images(), new_hp), before)


def test_drop_and_readd_top_blocks():
    params = randomize(F.init(jax.random.PRNGKey(0), hp(num_layers=2)))
    one = hp(num_layers=1)
    assert "encoderblock_1" not in F.component_names(one)
    sub = {n: params[n] for n in F.component_names(one)}
    out1 = F.apply(sub, images(), one)
    assert not np.allclose(out1, F.apply(params, images(), hp()))
    # Re-adding the top block: allowed fresh only within num_layers; adapters must stay below.
    assert F.fresh_allowed("encoderblock_1", hp(num_layers=2))
    assert not F.fresh_allowed("encoderblock_1", one)
    assert F.fresh_allowed("head", one) and F.fresh_allowed("residual_adapter_0", one)
    assert not F.fresh_allowed("embedding", one) and not F.fresh_allowed("encoder_norm", one)
    assert F.force_clone == ("encoder_norm",)
    with pytest.raises(FamilyError, match="index 1 out of range for num_layers=1"):
        F.component_names(hp(num_layers=1, adapter_layers="1"))
    with pytest.raises(FamilyError, match="missing components \\['encoderblock_1'\\]"):
        F.apply(sub, images(), hp())


def test_posembed_interpolation():
    params = randomize(F.init(jax.random.PRNGKey(0), hp()))
    pos = params["posembed_input"]
    same = F.adapt_component("posembed_input", pos, hp(), hp())
    np.testing.assert_array_equal(same["pos_embedding"], pos["pos_embedding"])
    big = F.adapt_component("posembed_input", pos, hp(), hp(ds_image_size=20))
    old = np.asarray(pos["pos_embedding"])
    new = np.asarray(big["pos_embedding"])
    assert new.shape == (1, 1 + 25, 16)
    np.testing.assert_array_equal(new[:, 0], old[:, 0])  # class-token row kept
    # Same maths as vit_jax (scipy.ndimage.zoom, order=1), and corners are exact.
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    ref = scipy_ndimage.zoom(old[0, 1:].reshape(2, 2, 16), (5 / 2, 5 / 2, 1), order=1)
    np.testing.assert_allclose(new[0, 1:].reshape(5, 5, 16), ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(new[0, 1], old[0, 1])
    # Down to one patch and back: shapes follow the grid; the model runs at the new size.
    small = F.adapt_component("posembed_input", pos, hp(), hp(ds_image_size=4))
    assert small["pos_embedding"].shape == (1, 2, 16)
    resized = {**params, "posembed_input": big}
    assert F.apply(resized, images(20), hp(ds_image_size=20)).shape == (3, 3)
    # Other components: same shape -> returned as is; mismatch -> None.
    block = params["encoderblock_0"]
    assert F.adapt_component("encoderblock_0", block, hp(), hp(ds_image_size=20)) is block
    assert F.adapt_component("head", params["head"], hp(), hp(num_classes=7)) is None
    assert F.adapt_component("posembed_input", pos, hp(), hp(vit_hidden=32)) is None
    assert F.adapt_component("encoderblock_5", block, hp(), hp()) is None


def test_npz_round_trip_vit_jax_layout(tmp_path):
    params = randomize(F.init(jax.random.PRNGKey(0), hp()))
    head = params["head"]
    path = str(tmp_path / "augreg.npz")
    written = to_vit_jax_npz(params, path, extra={"pre_logits/kernel": np.ones((2, 2))})
    assert "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel" in written
    loaded = F.load_pretrained(hp(), path)
    assert list(loaded) == F.component_names(hp())
    # The head is never taken from the checkpoint: a zero head.
    assert not np.any(loaded["head"]["kernel"]) and not np.any(loaded["head"]["bias"])
    for name in F.component_names(hp()):
        if name != "head":
            jax.tree_util.tree_map(np.testing.assert_array_equal, loaded[name], params[name])
    x = images()
    np.testing.assert_array_equal(
        F.apply({**loaded, "head": head}, x, hp()), F.apply(params, x, hp())
    )
    # Any fsspec URL works the same (gs:// in production).
    via_url = F.load_pretrained(hp(), "file://" + path)
    jax.tree_util.tree_map(np.testing.assert_array_equal, via_url, loaded)
    # Fewer layers: the first blocks; another image size: interpolated posembed; adapters: fresh.
    loaded1 = F.load_pretrained(hp(num_layers=1, adapter_layers="0", ds_image_size=12), path)
    assert "encoderblock_1" not in loaded1
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, loaded1["encoderblock_0"], params["encoderblock_0"]
    )
    np.testing.assert_allclose(
        loaded1["posembed_input"]["pos_embedding"],
        vit.interpolate_posembed(np.asarray(params["posembed_input"]["pos_embedding"]), 10),
    )
    assert not np.any(loaded1["residual_adapter_0"]["Dense_1"]["kernel"])


@pytest.mark.parametrize("scan", [False, True])
def test_npz_big_vision_layout(tmp_path, scan):
    params = randomize(F.init(jax.random.PRNGKey(0), hp()))
    # big_vision's posembed has no class-token row: equivalent to a zero row in vit_jax's.
    pos = np.asarray(params["posembed_input"]["pos_embedding"]).copy()
    pos[:, 0] = 0.0
    params["posembed_input"] = {"pos_embedding": jnp.asarray(pos)}
    arrays = {"params/pos_embedding": pos[:, 1:], "params/head/kernel": np.zeros((16, 9))}
    for name in ("embedding", "cls", "encoder_norm"):
        sub = "Transformer/" if name == "encoder_norm" else ""
        arrays.update({f"params/{sub}{k}": v for k, v in flat(params[name], name + "/").items()})
    blocks = [flat(params[f"encoderblock_{i}"]) for i in range(2)]
    for key in blocks[0]:
        if scan:
            arrays[f"params/Transformer/encoderblock/{key}"] = np.stack([b[key] for b in blocks])
        else:
            for i, b in enumerate(blocks):
                arrays[f"params/Transformer/encoderblock_{i}/{key}"] = b[key]
    path = str(tmp_path / "bv.npz")
    np.savez(path, **arrays)
    loaded = F.load_pretrained(hp(), path)
    x = images()
    np.testing.assert_array_equal(
        F.apply({**loaded, "head": params["head"]}, x, hp()), F.apply(params, x, hp())
    )


def test_npz_errors_name_the_key(tmp_path):
    params = randomize(F.init(jax.random.PRNGKey(0), hp()))
    path = str(tmp_path / "ok.npz")
    arrays = to_vit_jax_npz(params, path)
    key = "Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"
    missing = {k: v for k, v in arrays.items() if k != key}
    np.savez(tmp_path / "missing.npz", **missing)
    with pytest.raises(FamilyError, match=re.escape(f"no key {key!r}")):
        F.load_pretrained(hp(), str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "shape.npz", **{**arrays, key: np.zeros((16, 31), np.float32)})
    with pytest.raises(FamilyError, match=re.escape(f"{key!r} has shape (16, 31)")):
        F.load_pretrained(hp(), str(tmp_path / "shape.npz"))
    # Asking for more blocks than the checkpoint has names the first missing one.
    with pytest.raises(FamilyError, match="encoderblock_2/LayerNorm_0/"):
        F.load_pretrained(hp(num_layers=3), path)
    # A checkpoint of another width names the first mismatching key.
    with pytest.raises(FamilyError, match="key 'embedding/bias' has shape \\(16,\\)"):
        F.load_pretrained(hp(vit_hidden=8, vit_heads=2), path)
    with pytest.raises(FamilyError, match="pass path="):
        F.load_pretrained(hp())
    with pytest.raises(FamilyError, match="not found"):
        F.load_pretrained(hp(), str(tmp_path / "nope.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(FamilyError, match="junk.npz"):
        F.load_pretrained(hp(), str(tmp_path / "junk.npz"))
    np.savez(tmp_path / "other.npz", w=np.zeros(3))
    with pytest.raises(FamilyError, match="not a ViT checkpoint"):
        F.load_pretrained(hp(), str(tmp_path / "other.npz"))
    with pytest.raises(FamilyError, match="vit_norm='rmsnorm' cannot load"):
        F.load_pretrained(hp(vit_norm="rmsnorm"), path)


def test_bad_hparams():
    with pytest.raises(FamilyError, match="unknown vit_size 'H/14'"):
        F.component_names(hp(vit_size="H/14"))
    with pytest.raises(FamilyError, match="ds_image_size=10 is not a positive multiple"):
        F.init(jax.random.PRNGKey(0), hp(ds_image_size=10))
    with pytest.raises(FamilyError, match="index 2 out of range for num_layers=2"):
        F.validate_hparams(hp(adapter_layers="0_2"))
    with pytest.raises(FamilyError, match="vit_norm='batchnorm'"):
        F.validate_hparams(hp(vit_norm="batchnorm"))
    with pytest.raises(FamilyError, match="not divisible by vit_heads=3"):
        F.validate_hparams(hp(vit_heads=3))
    F.validate_hparams(hp(vit_heads=3, vit_qk_dim=4, vit_v_dim=6))  # explicit dims: fine
    params = F.init(jax.random.PRNGKey(0), hp())
    with pytest.raises(FamilyError, match="ds_image_size=8"):
        F.apply(params, images(12), hp())
    with pytest.raises(FamilyError, match="unexpected components \\['encoderblock_7'\\]"):
        F.apply({**params, "encoderblock_7": {}}, images(), hp())
    assert base.get_family("vit") is F


def test_flops_positive_and_cached():
    base._cached_flops.cache_clear()
    f1 = F.flops(hp())
    info = base._cached_flops.cache_info()
    f2 = F.flops(dict(reversed(list(hp().items()))))
    assert f1 > 0 and f1 == f2
    assert base._cached_flops.cache_info().hits == info.hits + 1
    assert F.flops(hp(num_layers=1)) < f1
    assert F.architecture_key(hp(vit_hidden=32)) != F.architecture_key(hp())


def test_gradients_reach_only_trainable_components():
    hparams = hp(adapter_layers="1")
    params = F.init(jax.random.PRNGKey(0), hparams)
    params = {**randomize(params), "head": params["head"]}  # zero head, as for a new task
    trainable_names = ("head", "residual_adapter_1", "encoder_norm")
    trainable = {k: v for k, v in params.items() if k in trainable_names}
    frozen = {k: v for k, v in params.items() if k not in trainable_names}
    frozen_copy = jax.tree_util.tree_map(np.array, frozen)
    x, y = images(batch=4), jnp.array([0, 1, 2, 1])

    def loss(tr):
        logits = apply_split(F, tr, frozen, x, hparams)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    opt = optax.sgd(0.1, momentum=0.9)

    @jax.jit  # one compile: gradient, SGD step, loss before and after
    def step(tr):
        before, grads = jax.value_and_grad(loss)(tr)
        updates, _ = opt.update(grads, opt.init(tr), tr)
        new_tr = optax.apply_updates(tr, updates)
        return grads, new_tr, before, loss(new_tr)

    grads, new_trainable, before, after = step(trainable)
    assert set(grads) == set(trainable_names)
    assert np.abs(grads["head"]["kernel"]).sum() > 0
    assert after < before
    jax.tree_util.tree_map(np.testing.assert_array_equal, frozen, frozen_copy)
    with pytest.raises(FamilyError, match="both trainable and frozen"):
        apply_split(F, trainable, params, x, hparams)
