"""BERT / MiniLM-L6 text family: tokenizer, pretrained encoder, adapters, checkpoint errors."""

import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from scipy.special import erf

from mu2net.models import FamilyError, bert, get_family, shape_signature

FAM = bert.BERT
SENTENCES = [
    "A man is playing a guitar.",
    "Someone plays the guitar on stage.",
    "The stock market fell sharply today.",
    "Shares dropped steeply on Wall Street.",
    "My cat sleeps on the sofa all afternoon.",
]
LENGTH = 16


def _numpy_reference(texts, length):
    """all-MiniLM-L6-v2 in float64 numpy, straight from the safetensors names (offline_data.md)."""
    w = {
        k: v.astype(np.float64)
        for k, v in load_file(os.path.join(bert.wheel_dir(), "model.safetensors")).items()
        if v.dtype == np.float32
    }
    ids = bert.tokenize(texts, length)
    mask = (ids != 0).astype(np.float64)

    def ln(x, p):
        m = x.mean(-1, keepdims=True)
        v = ((x - m) ** 2).mean(-1, keepdims=True)
        return (x - m) / np.sqrt(v + 1e-12) * w[p + ".weight"] + w[p + ".bias"]

    def lin(x, p):
        return x @ w[p + ".weight"].T + w[p + ".bias"]

    b, t = ids.shape
    x = ln(
        w["embeddings.word_embeddings.weight"][ids]
        + w["embeddings.position_embeddings.weight"][:t]
        + w["embeddings.token_type_embeddings.weight"][0],
        "embeddings.LayerNorm",
    )
    bias = (1.0 - mask[:, None, None, :]) * -1e9
    for layer in range(6):
        p = f"encoder.layer.{layer}."
        q, k, v = (
            lin(x, p + f"attention.self.{n}").reshape(b, t, 12, -1).transpose(0, 2, 1, 3)
            for n in ("query", "key", "value")
        )
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1]) + bias
        s = np.exp(s - s.max(-1, keepdims=True))
        a = (s / s.sum(-1, keepdims=True)) @ v
        x = ln(
            x + lin(a.transpose(0, 2, 1, 3).reshape(b, t, -1), p + "attention.output.dense"),
            p + "attention.output.LayerNorm",
        )
        h = lin(x, p + "intermediate.dense")
        h = 0.5 * h * (1.0 + erf(h / np.sqrt(2.0)))
        x = ln(x + lin(h, p + "output.dense"), p + "output.LayerNorm")
    e = (x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    return e / np.linalg.norm(e, axis=-1, keepdims=True)


def test_tokenize_pads_truncates_and_marks_specials():
    ids = bert.tokenize(["Hello world", "word " * 40], max_length=LENGTH)
    assert ids.dtype == np.int32 and ids.shape == (2, LENGTH)
    assert ids[0, 0] == 101 and ids[0, 3] == 102 and not ids[0, 4:].any()  # [CLS] hello world [SEP]
    assert ids[1, 0] == 101 and ids[1, -1] == 102 and (ids[1] != 0).all()  # truncated, still [SEP]
    with pytest.raises(FamilyError, match="max_length=1"):
        bert.tokenize(["x"], max_length=1)
    with pytest.raises(FamilyError, match="sequence of strings"):
        bert.tokenize("just one string", max_length=8)


def test_pretrained_embeddings_match_reference_and_capture_meaning():
    hp = {"num_classes": 3, "ds_max_length": LENGTH}
    params = FAM.load_pretrained(hp)
    ids = bert.tokenize(SENTENCES, LENGTH)
    embed = jax.jit(lambda p, x: bert.encode(p, x, {**FAM.default_hparams(), **hp}, normalize=True))
    e = np.asarray(embed(params, ids))
    np.testing.assert_array_equal(e, np.asarray(embed(params, ids)))  # deterministic
    np.testing.assert_allclose(e, _numpy_reference(SENTENCES, LENGTH), atol=1e-5, rtol=0)
    sim = e @ e.T
    assert sim[0, 1] > 0.6 and sim[2, 3] > 0.4  # paraphrases (measured 0.84 / 0.60)
    unrelated = [sim[0, 2], sim[0, 3], sim[1, 2], sim[1, 3], sim[0, 4], sim[2, 4]]
    assert max(unrelated) < min(sim[0, 1], sim[2, 3]) - 0.2
    # The head is zero, so the root path starts at uniform logits.
    assert not np.asarray(jax.jit(lambda p, x: FAM.apply(p, x, hp))(params, ids)).any()


def test_adapters_and_layer_dropping():
    hp = {"num_classes": 4, "ds_max_length": LENGTH, "num_layers": 3}
    hp_a = {**hp, "adapter_layers": "0_2", "adapter_dim": 8}
    assert FAM.component_names(hp_a) == [
        "embeddings",
        "residual_adapter_0",
        "encoderblock_0",
        "encoderblock_1",
        "residual_adapter_2",
        "encoderblock_2",
        "head",
    ]
    head = {
        "kernel": np.random.default_rng(0).normal(size=(384, 4)).astype(np.float32),
        "bias": np.zeros(4, np.float32),
    }
    base = {**FAM.load_pretrained(hp), "head": head}
    with_a = {**FAM.load_pretrained(hp_a), "head": head}
    ids = bert.tokenize(SENTENCES[:2], LENGTH)
    run = jax.jit(lambda p, x: FAM.apply(p, x, hp))
    y0 = np.asarray(run(base, ids))
    run_a = jax.jit(lambda p, x: FAM.apply(p, x, hp_a))
    np.testing.assert_array_equal(np.asarray(run_a(with_a, ids)), y0)
    changed = dict(with_a)
    changed["residual_adapter_2"] = {
        **with_a["residual_adapter_2"],
        "up": {"kernel": np.full((8, 384), 0.05, np.float32), "bias": np.zeros(384, np.float32)},
    }
    assert np.abs(np.asarray(run_a(changed, ids)) - y0).max() > 1e-3
    # Dropping top layers changes the function; all-padding rows stay finite.
    full = {**FAM.load_pretrained({**hp, "num_layers": 6}), "head": head}
    y6 = np.asarray(jax.jit(lambda p, x: FAM.apply(p, x, {**hp, "num_layers": 6}))(full, ids))
    assert np.abs(y6 - y0).max() > 1e-3
    assert np.isfinite(np.asarray(run(base, FAM.dummy_inputs(hp, 2)))).all()


def test_init_shapes_match_pretrained():
    hp = {"num_classes": 5, "num_layers": 2, "adapter_layers": "1", "adapter_dim": 16}
    fresh = FAM.init(jax.random.PRNGKey(0), hp)
    pre = FAM.load_pretrained(hp)
    assert list(fresh) == list(pre) == FAM.component_names(hp)
    for name in fresh:
        assert shape_signature(fresh[name]) == shape_signature(pre[name]), name
    assert (
        not fresh["head"]["kernel"].any() and not fresh["residual_adapter_1"]["up"]["kernel"].any()
    )
    traced = jax.jit(lambda r: FAM.init(r, hp))(jax.random.PRNGKey(0))
    for a, b in zip(jax.tree_util.tree_leaves(fresh), jax.tree_util.tree_leaves(traced)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # eager == traced init
    assert get_family("bert") is FAM and FAM.modality == "text"
    assert "ds_max_length" in FAM.architecture_key(hp)[-1]


@pytest.mark.parametrize(
    "hp, match",
    [
        ({"num_layers": 7}, "num_layers=7"),
        ({"num_layers": 2, "adapter_layers": "2"}, "index 2 out of range"),
        ({"ds_max_length": 1000}, "ds_max_length=1000"),
    ],
)
def test_bad_hparams_are_named(hp, match):
    with pytest.raises(FamilyError, match=match):
        FAM.component_names(hp)


def test_bad_checkpoint_names_the_key(tmp_path):
    path = str(tmp_path / "model.safetensors")
    save_file({"encoder.layer.2.output.dense.weight": np.zeros((384, 99), np.float32)}, path)
    with pytest.raises(
        FamilyError, match=r"key 'encoder\.layer\.2\.output\.dense\.weight' has sha"
    ):
        FAM.load_pretrained({}, path=str(tmp_path))  # a directory holding model.safetensors
    save_file({"embeddings.LayerNorm.bias": np.zeros((384,), np.float32)}, path)
    with pytest.raises(FamilyError, match=r"missing key 'embeddings\.word_embeddings\.weight'"):
        FAM.load_pretrained({}, path=path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 20)
    with pytest.raises(FamilyError, match="junk.safetensors"):
        FAM.load_pretrained({}, path=str(junk))
    with pytest.raises(FamilyError, match="not found"):
        FAM.load_pretrained({}, path=str(tmp_path / "nope.safetensors"))
