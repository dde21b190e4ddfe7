"""EfficientNet-Lite0 family and the restricted legacy-torch reader."""

import glob
import importlib.util
import os
import pickle
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mu2net.models import FamilyError, depthwise, get_family, shape_signature
from mu2net.models import efficientnet as eff
from mu2net.models.torch_legacy import LegacyCheckpointError, load_legacy_pth

FAM = eff.EFFICIENTNET_LITE0
IMAGENET_HP = {"num_classes": 1000, "keep_imagenet_head": True}
# One jitted root forward shared by the tests (compiles dominate their run time).
APPLY_ROOT = jax.jit(lambda p, x: FAM.apply(p, x, IMAGENET_HP))


def _header() -> bytes:
    # The three header pickles of torch's legacy format (plain ints and a dict).
    return b"".join(
        pickle.dumps(x, protocol=2)
        for x in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True, "protocol_version": 1001})
    )


@pytest.mark.parametrize("where", ["object", "header"])
def test_legacy_reader_refuses_foreign_globals(tmp_path, where):
    marker = tmp_path / "pwned"
    # Protocol-0 GLOBAL opcode for os.system, called with a command that would leave a marker.
    evil = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    path = tmp_path / "evil.pth"
    path.write_bytes(_header() + evil if where == "object" else evil)
    with pytest.raises(LegacyCheckpointError) as e:
        load_legacy_pth(path)
    assert "refused global os.system" in str(e.value)
    assert str(path) in str(e.value)
    assert not marker.exists()


def test_legacy_reader_loads_the_wheel_and_rejects_truncation(tmp_path):
    sd = load_legacy_pth(eff.bundled_checkpoint())
    assert len(sd) == 296
    assert sum(v.size for v in sd.values()) == 4_694_073
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert sd["_conv_stem.weight"].dtype == np.float32
    assert sd["_bn0.num_batches_tracked"].dtype == np.int64
    assert np.isfinite(sd["_fc.weight"]).all() and sd["_fc.weight"].std() > 0
    cut = tmp_path / "cut.pth"
    shutil.copy(eff.bundled_checkpoint(), cut)
    os.truncate(cut, os.path.getsize(cut) - 1000)
    with pytest.raises(LegacyCheckpointError, match="truncated"):
        load_legacy_pth(cut)


def _foolbox_imagenet(size: int):
    root = importlib.util.find_spec("foolbox").submodule_search_locations[0]
    files = sorted(glob.glob(os.path.join(root, "data", "imagenet_*")))
    labels = np.array([int(f.rsplit("_", 1)[1].split(".")[0]) for f in files])
    images = np.stack(
        [
            np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BICUBIC))
            for f in files
        ]
    ).astype(np.float32)
    images = (images / 255.0 - np.array(FAM.pixel_mean, np.float32)) / np.array(
        FAM.pixel_std, np.float32
    )
    return images, labels


def test_pretrained_classifies_foolbox_imagenet_at_224px():
    images, labels = _foolbox_imagenet(224)  # plain bicubic resize to 224, ImageNet mean/std
    assert len(labels) == 20
    params = FAM.load_pretrained(IMAGENET_HP)
    logits = np.asarray(APPLY_ROOT(params, images))
    top5 = (np.argsort(-logits, axis=1)[:, :5] == labels[:, None]).any(axis=1).mean()
    assert top5 >= 0.9  # measured 20/20
    assert (logits.argmax(1) == labels).mean() >= 0.6  # measured 14/20


def test_slice_depthwise_matches_grouped_conv_reference():
    params = FAM.load_pretrained(IMAGENET_HP)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    fast = APPLY_ROOT(params, x)
    ref = jax.jit(lambda p, x: eff.forward(p, x, IMAGENET_HP, depthwise="grouped"))(params, x)
    assert float(np.abs(np.asarray(ref)).max()) > 0.1  # a real signal, not all zeros
    np.testing.assert_allclose(np.asarray(fast), np.asarray(ref), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "size,channels,kernel,stride",
    [(8, 4, 3, 1), (9, 3, 3, 2), (8, 5, 5, 2), (7, 2, 5, 1), (10, 3, 5, 2), (2, 6, 3, 1)],
)
def test_hand_written_depthwise_backward_matches_autodiff(size, channels, kernel, stride):
    """Same forward bits as the slice sum; gradients to x, kernel and bias as JAX's."""
    rng = np.random.default_rng(size * 100 + kernel * 10 + stride)
    x = rng.normal(size=(3, size, size + 1, channels)).astype(np.float32)
    p = {
        "kernel": rng.normal(size=(kernel, kernel, channels)).astype(np.float32),
        "bias": rng.normal(size=(channels,)).astype(np.float32),
    }
    fast = jax.jit(lambda x, p: depthwise.depthwise_conv(x, p, stride))
    ref = jax.jit(lambda x, p: eff.depthwise_conv_autodiff(x, p, stride))
    y = fast(x, p)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ref(x, p)))
    ct = rng.normal(size=y.shape).astype(np.float32)
    got = jax.vjp(fast, x, p)[1](ct)
    want = jax.vjp(ref, x, p)[1](ct)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert g.shape == w.shape
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


def test_network_gradients_match_the_autodiff_depthwise():
    hp = IMAGENET_HP
    params = jax.tree_util.tree_map(np.asarray, FAM.load_pretrained(hp))
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)

    def loss(p, impl):
        return jnp.sum(eff.forward(p, x, hp, depthwise=impl, features_only=True) ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    got, want = grad(params, "fast"), grad(params, "autodiff")
    assert float(np.abs(np.asarray(want["block_1"]["depthwise"]["kernel"])).max()) > 0
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        scale = float(np.abs(np.asarray(w)).max()) + 1e-12
        np.testing.assert_allclose(np.asarray(g) / scale, np.asarray(w) / scale, atol=1e-5)


def test_adapters_are_function_preserving_and_trainable():
    with_adapters = {**IMAGENET_HP, "adapter_layers": "0_5_15", "adapter_dim": 8}
    base = FAM.load_pretrained(IMAGENET_HP)
    params = FAM.load_pretrained(with_adapters)
    assert FAM.component_names(with_adapters)[:3] == ["stem", "residual_adapter_0", "block_0"]
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
    y0 = np.asarray(APPLY_ROOT(base, x))
    apply_a = jax.jit(lambda p, x: FAM.apply(p, x, with_adapters))
    np.testing.assert_array_equal(np.asarray(apply_a(params, x)), y0)
    # The adapter does take part: a non-zero output projection changes the logits.
    changed = dict(params)
    changed["residual_adapter_5"] = jax.tree_util.tree_map(np.array, params["residual_adapter_5"])
    changed["residual_adapter_5"]["up"]["kernel"] = np.full((8, 40), 0.1, np.float32)
    assert np.abs(np.asarray(apply_a(changed, x)) - y0).max() > 1e-3


def test_init_matches_pretrained_shapes_and_zero_head():
    hp = {"num_classes": 7, "adapter_layers": "3", "adapter_dim": 16}
    fresh = FAM.init(jax.random.PRNGKey(0), hp)
    pre = FAM.load_pretrained(hp)
    assert list(fresh) == FAM.component_names(hp) == list(pre)
    traced = jax.jit(lambda r: FAM.init(r, hp))(jax.random.PRNGKey(0))
    for a, b in zip(jax.tree_util.tree_leaves(fresh), jax.tree_util.tree_leaves(traced)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # eager == traced init
    other = FAM.init(jax.random.PRNGKey(1), hp)
    assert not np.array_equal(
        other["block_3"]["expand"]["kernel"], fresh["block_3"]["expand"]["kernel"]
    )
    for name in fresh:
        assert shape_signature(fresh[name]) == shape_signature(pre[name]), name
    assert not np.asarray(pre["head"]["kernel"]).any()
    assert pre["head"]["kernel"].shape == (1280, 7)
    assert pre["residual_adapter_3"]["up"]["kernel"].shape == (16, 24)
    assert get_family("efficientnet_lite0") is FAM
    assert FAM.fresh_allowed("head", hp) and FAM.fresh_allowed("residual_adapter_3", hp)
    assert not FAM.fresh_allowed("block_3", hp)
    with pytest.raises(ValueError):  # the shared cache hands out read-only arrays
        pre["block_0"]["depthwise"]["kernel"][0, 0, 0] = 1.0


@pytest.mark.parametrize(
    "hp, match",
    [
        ({"adapter_layers": "16"}, "index 16 out of range"),
        ({"num_layers": 12}, "num_layers=12"),
        ({"num_classes": 10, "keep_imagenet_head": True}, "keep_imagenet_head"),
        ({"adapter_layers": "a_b"}, "adapter_layers"),
    ],
)
def test_bad_hparams_are_named(hp, match):
    with pytest.raises(FamilyError, match=match):
        FAM.component_names(hp)


def test_bad_checkpoint_names_the_key(tmp_path):
    sd = load_legacy_pth(eff.bundled_checkpoint())
    missing = {k: v for k, v in sd.items() if k != "_blocks.7._bn1.running_var"}
    with pytest.raises(FamilyError, match=r"missing key '_blocks\.7\._bn1\.running_var'"):
        eff.components_from_state_dict(missing, "ckpt.pth")
    bad = dict(sd, **{"_blocks.3._project_conv.weight": np.zeros((40, 144, 3, 3), np.float32)})
    with pytest.raises(FamilyError, match=r"ckpt.pth: key '_blocks\.3\._project_conv\.weight'"):
        eff.components_from_state_dict(bad, "ckpt.pth")
    with pytest.raises(FamilyError, match="unexpected key '_blocks.16.x'"):
        eff.components_from_state_dict(dict(sd, **{"_blocks.16.x": np.zeros(1)}), "ckpt.pth")
    with pytest.raises(FamilyError, match="not found"):
        FAM.load_pretrained({}, path=str(tmp_path / "nope.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a pickle at all")
    with pytest.raises(FamilyError, match="junk.pth"):
        FAM.load_pretrained({}, path=str(junk))
