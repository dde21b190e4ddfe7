"""The optional t5x plug-in (skips cleanly when t5x is not installed)."""

import jax
import numpy as np
import pytest

pytest.importorskip("t5x")


def test_path_model_loss_predict_score():
    import optax
    from t5x import optimizers

    from mu2net.train import t5x_plugin, testing  # noqa: F401  (registers test_mlp)

    model = t5x_plugin.PathModel("test_mlp", {}, optimizers.wrap_optax_optimizer(optax.sgd)(0.1))
    params = model.get_initial_variables(jax.random.PRNGKey(0), {})["params"]
    data = testing.synthetic_data(8)
    loss, _ = model.loss_fn(params, data, None)
    assert np.isclose(float(loss), np.log(3), atol=1e-5)  # zero head: uniform logits
    preds, aux = model.predict_batch_with_aux(params, data)
    assert preds.shape == (8,) and aux["logits"].shape == (8, 3)
    assert np.allclose(model.score_batch(params, data), -np.log(3), atol=1e-5)
