"""The optional t5x plug-in (skips cleanly when t5x is not installed)."""

import jax
import numpy as np
import pytest

from mu2net.train._gin import gin  # noqa: F401  (t5x imports gin: the real one, not gin/)

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


def test_t5x_trainer_trains_a_path():
    """t5x's own Trainer, partitioner and optimizer wrapper fit a path (loss and accuracy)."""
    import optax
    from t5x import optimizers, partitioning, utils
    from t5x import trainer as t5x_trainer

    from mu2net.train import t5x_plugin, testing

    model = t5x_plugin.PathModel(
        "test_mlp", {}, optimizers.wrap_optax_optimizer(optax.adam)(learning_rate=0.01)
    )
    data = testing.synthetic_data(64)
    partitioner = partitioning.PjitPartitioner(num_partitions=1)
    shapes = {k: v.shape for k, v in data.items()}
    init = utils.TrainStateInitializer(
        model.optimizer_def, model.get_initial_variables, shapes, partitioner
    )
    state = init.from_scratch(jax.random.PRNGKey(0))
    trainer = t5x_trainer.Trainer(
        model,
        train_state=state,
        partitioner=partitioner,
        eval_names=[],
        summary_dir=None,
        train_state_axes=init.train_state_axes,
        rng=jax.random.PRNGKey(1),
        learning_rate_fn=lambda step: 0.01,
        num_microbatches=None,
    )
    batches = testing.batches(data, 32)
    first = {k: v.value for k, v in trainer.train(batches, num_steps=1).result().items()}
    last = {k: v.value for k, v in trainer.train(batches, num_steps=40).result().items()}
    assert int(trainer.train_state.step) == 41
    assert last["loss"] < 0.5 * first["loss"], (first, last)
    assert last["accuracy"] > first["accuracy"], (first, last)


def test_t5x_binary_trains_with_a_relative_model_dir(tmp_path):
    """``python -m t5x.train`` as a t5x user runs it: the README's command, relative MODEL_DIR."""
    import os
    import subprocess
    import sys

    from mu2net.gin_utils import package_gin_dir

    cmd = [
        sys.executable, "-m", "t5x.train", f"--gin_search_paths={package_gin_dir()}",
        "--gin_file=t5x/path_model.gin", "--gin_file=t5x/pretrain_path.gin",
        "--gin.MIXTURE_OR_TASK_NAME='mu2net:digits'", "--gin.MIXTURE_OR_TASK_MODULE='mu2net.tasks'",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 1, 'targets': 1}", "--gin.TRAIN_STEPS=2",
        "--gin.BATCH_SIZE=8", "--gin.USE_CACHED_TASKS=False", "--gin.MODEL_DIR='runs/t5x'",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    model_dir = tmp_path / "runs" / "t5x"
    assert (model_dir / "checkpoint_0").is_dir() and (model_dir / "checkpoint_2").is_dir()
    assert not list(model_dir.glob("*orbax-checkpoint-tmp*"))
    assert list((model_dir / "training_eval").rglob("events.out.tfevents.*"))  # the train eval ran
