"""The six function-preserving transformer expansions (reference §7.4) on the ViT family."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mu2net.models import expansions, vit
from mu2net.models.base import FamilyError

F = vit.FAMILY
BASE = {
    "vit_norm": "rmsnorm",
    "vit_hidden": 8,
    "vit_mlp_dim": 16,
    "vit_heads": 2,
    "vit_patch": 4,
    "num_layers": 2,
    "num_classes": 3,
    "adapter_layers": "1",
    "adapter_dim": 4,
    "ds_image_size": 8,
}
X = np.random.RandomState(0).randn(4, 8, 8, 3).astype(np.float32)
W = np.random.RandomState(1).randn(4, 3).astype(np.float32)


def _attn(g, i=0):
    return g[f"encoderblock_{i}"]["MultiHeadDotProductAttention_0"]


# name -> (new size, the zero-initialised new entries whose gradient must be non-zero)
CASES = {
    "mlp_width": (24, lambda g: g["encoderblock_0"]["MlpBlock_0"]["Dense_1"]["kernel"][16:]),
    "add_heads": (3, lambda g: _attn(g)["out"]["kernel"][2:]),
    "value_dim": (6, lambda g: _attn(g)["out"]["kernel"][:, 4:]),
    # (rows of the original hidden units: hidden expansion fills new input rows arbitrarily)
    "key_query_dim": (7, lambda g: _attn(g)["key"]["kernel"][:8, :, 4:]),
    "hidden_dim": (12, lambda g: g["embedding"]["kernel"][..., 8:]),
    "add_layers": (3, lambda g: _attn(g, 2)["out"]["kernel"]),
}


def random_params(hparams, seed=0):
    """Random non-zero params everywhere (norm scales around 1, heads and adapters live)."""
    gen = np.random.default_rng(seed)
    params = F.init(jax.random.PRNGKey(seed), hparams)

    def draw(path, x):
        is_scale = jax.tree_util.keystr(path).endswith("['scale']")
        value = (1.0 if is_scale else 0.0) + 0.5 * gen.standard_normal(x.shape)
        return jnp.asarray(value, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, params)


def logits_and_grads(hparams, params):
    def loss(p):
        logits = F.apply(p, X, hparams)
        return jnp.sum(logits * W), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return np.asarray(logits), grads


@pytest.fixture(scope="module")
def base():
    params = random_params(BASE)
    return params, np.asarray(F.apply(params, X, BASE))


def assert_same_function(logits, reference):
    assert np.abs(reference).max() > 0.1  # a non-trivial function
    np.testing.assert_allclose(logits, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_each_expansion_preserves_function(base, name):
    params, reference = base
    size, new_entries = CASES[name]
    new_h, new_p = expansions.EXPANSIONS[name](BASE, params, jax.random.PRNGKey(7), size)
    assert expansions.current_size(name, new_h) == size
    assert expansions.current_size(name, BASE) < size
    # New params have exactly the new architecture's shapes.
    want = jax.tree_util.tree_map(lambda s: s.shape, F.expected_shapes(new_h))
    assert jax.tree_util.tree_map(np.shape, new_p) == want
    assert_same_function(np.asarray(F.apply(new_p, X, new_h)), reference)
    assert not np.any(new_entries(new_p))  # the constrained new entries are zero
    # ... while the "arbitrary" new entries are random, not zero.
    if name == "key_query_dim":
        assert np.all(_attn(new_p)["query"]["kernel"][..., 4:] != 0)


def test_untouched_components_stay_shared(base):
    params, _ = base
    new_h, new_p = expansions.expand_mlp(BASE, params, jax.random.PRNGKey(1), 24)
    for name in ("embedding", "cls", "posembed_input", "residual_adapter_1", "head"):
        assert new_p[name] is params[name]
    assert new_p["encoderblock_0"] is not params["encoderblock_0"]
    # Resolved dims are pinned, so the other derived sizes cannot drift.
    assert (new_h["vit_qk_dim"], new_h["vit_v_dim"], new_h["vit_heads"]) == (4, 4, 2)


def test_all_six_composed(base):
    params, reference = base
    hparams = dict(BASE)
    for i, name in enumerate(CASES):
        size = CASES[name][0]
        hparams, params = expansions.expand(name, hparams, params, jax.random.PRNGKey(i), size)
    cfg = F.config(hparams)
    assert (cfg.mlp_dim, cfg.heads, cfg.v_dim, cfg.qk_dim, cfg.hidden, cfg.num_layers) == (
        24,
        3,
        6,
        7,
        12,
        3,
    )
    logits, grads = logits_and_grads(hparams, params)
    assert_same_function(logits, reference)
    # Every expansion's zero-initialised new entries are still zero, yet receive gradient:
    # they are trainable (a step moves them and, through them, the function).
    for name, (_, new_entries) in CASES.items():
        assert not np.any(new_entries(params)), name
        assert np.abs(new_entries(grads)).sum() > 0, name
    assert np.abs(_attn(grads)["out"]["kernel"][..., 8:]).sum() > 0
    assert np.abs(grads["encoderblock_2"]["MlpBlock_0"]["Dense_1"]["kernel"]).sum() > 0


def test_non_hidden_expansions_are_exact_with_layernorm():
    hparams = {**BASE, "vit_norm": "layernorm"}
    params = random_params(hparams, seed=3)
    reference = np.asarray(F.apply(params, X, hparams))
    for i, name in enumerate(["mlp_width", "add_heads", "value_dim", "key_query_dim"]):
        size = CASES[name][0]
        hparams, params = expansions.expand(name, hparams, params, jax.random.PRNGKey(i), size)
    hparams, params = expansions.add_layers(hparams, params, jax.random.PRNGKey(9), 4, position=0)
    # Two blocks inserted below the old ones: old blocks and the adapter move up by two.
    assert hparams["adapter_layers"] == "3"
    assert "residual_adapter_3" in params and "residual_adapter_1" not in params
    assert F.component_names(hparams)[3:9] == [
        "encoderblock_0",
        "encoderblock_1",
        "encoderblock_2",
        "residual_adapter_3",
        "encoderblock_3",
        "encoder_norm",
    ]
    assert_same_function(np.asarray(F.apply(params, X, hparams)), reference)
    with pytest.raises(FamilyError, match="vit_norm='layernorm' is not function-preserving"):
        expansions.expand_hidden(hparams, params, jax.random.PRNGKey(0), 16)


def test_expansion_errors(base):
    params, _ = base
    with pytest.raises(FamilyError, match="vit_mlp_dim can only grow, got 16 -> 8"):
        expansions.expand_mlp(BASE, params, jax.random.PRNGKey(0), 8)
    with pytest.raises(FamilyError, match="missing \\['encoderblock_1'\\]"):
        partial = {k: v for k, v in params.items() if k != "encoderblock_1"}
        expansions.add_heads(BASE, partial, jax.random.PRNGKey(0), 3)
    with pytest.raises(FamilyError, match="position=5 outside 0..2"):
        expansions.add_layers(BASE, params, jax.random.PRNGKey(0), 3, position=5)
    with pytest.raises(FamilyError, match="unknown expansion 'wider'"):
        expansions.expand("wider", BASE, params, jax.random.PRNGKey(0), 3)
    assert set(expansions.EXPANSIONS) == set(expansions.EXPANSION_KEYS) == set(CASES)


def test_default_step_as_evolution_calls_it(base):
    params, _ = base
    steps = {}
    for name, fn in expansions.EXPANSIONS.items():
        new_h, new_p = fn(BASE, params, jax.random.PRNGKey(0))  # evolution's call: no size
        steps[name] = expansions.current_size(name, new_h)
        assert sorted(new_p) == sorted(F.component_names(new_h))
    assert steps == {
        "mlp_width": 20,
        "add_heads": 3,
        "value_dim": 5,
        "key_query_dim": 5,
        "hidden_dim": 10,
        "add_layers": 3,
    }
