"""A tiny MLP model family and synthetic data, for fast tests and benchmarks of the trainer.

``test_mlp`` has components ``dense_0``, ``dense_1`` (ReLU layers) and ``head`` (zero-initialised,
as every family's head). Inputs are float32 ``[B, ds_image_size, ds_image_size, 3]`` images,
flattened; the family is registered on import under :data:`FAMILY_NAME`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mu2net.models.base import Family, register_family
from mu2net.train._gin import gin

FAMILY_NAME = "test_mlp"


class MLPFamily(Family):
    """Two hidden dense layers and a linear head."""

    name = FAMILY_NAME
    modality = "image"
    shape_keys = ("num_classes", "hidden_dim", "ds_image_size")
    supports_adapters = False

    def default_hparams(self) -> dict[str, Any]:
        """Small defaults: 4x4x3 inputs, 16 hidden units, 3 classes."""
        return {
            "num_classes": 3,
            "hidden_dim": 16,
            "ds_image_size": 4,
            "num_layers": 2,
            "adapter_layers": "",
        }

    def component_names(self, hparams: Mapping[str, Any]) -> list[str]:
        """``dense_0``, ``dense_1``, ``head``."""
        return ["dense_0", "dense_1", "head"]

    def init(self, rng: jax.Array, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """LeCun-normal hidden layers, zero head."""
        d_in = int(hparams["ds_image_size"]) ** 2 * 3
        h, c = int(hparams["hidden_dim"]), int(hparams["num_classes"])
        k0, k1 = jax.random.split(rng)
        init = jax.nn.initializers.lecun_normal()
        return {
            "dense_0": {"kernel": init(k0, (d_in, h)), "bias": jnp.zeros((h,))},
            "dense_1": {"kernel": init(k1, (h, h)), "bias": jnp.zeros((h,))},
            "head": {"kernel": jnp.zeros((h, c)), "bias": jnp.zeros((c,))},
        }

    def apply(self, params, inputs, hparams):
        """Logits ``[B, num_classes]``."""
        x = inputs.reshape(inputs.shape[0], -1)
        for name in ("dense_0", "dense_1"):
            x = jax.nn.relu(x @ params[name]["kernel"] + params[name]["bias"])
        return x @ params["head"]["kernel"] + params["head"]["bias"]

    def load_pretrained(self, hparams, path=None):
        """No checkpoint: a seeded init stands in for a pretrained root."""
        del path
        return self.init(jax.random.PRNGKey(0), hparams)


FAMILY = register_family(MLPFamily())


def synthetic_data(
    n: int, hparams: Mapping[str, Any] | None = None, seed: int = 0
) -> dict[str, np.ndarray]:
    """A learnable classification set: the class is the argmax of 3 fixed input projections."""
    hp = {**FAMILY.default_hparams(), **(hparams or {})}
    size, c = int(hp["ds_image_size"]), int(hp["num_classes"])
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, size, size, 3)).astype(np.float32)
    proj = np.random.default_rng(1234).normal(size=(size * size * 3, c))
    y = np.argmax(x.reshape(n, -1) @ proj, axis=1).astype(np.int32)
    return {"inputs": x, "targets": y[:, None]}


def batches(
    data: Mapping[str, np.ndarray], batch_size: int, repeat: bool = True, seed: int | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of ``data`` in order (or shuffled per epoch with ``seed``), repeating forever."""
    n = len(data["inputs"])
    rng = np.random.default_rng(seed) if seed is not None else None
    while True:
        order = rng.permutation(n) if rng is not None else np.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            if repeat and len(idx) < batch_size:
                break
            yield {k: v[idx] for k, v in data.items()}
        if not repeat:
            return


@gin.configurable
def synthetic_task_data(
    task: str,
    *,
    family: Family,
    hparams: Mapping[str, Any],
    batch_size: int,
    seed: int,
    train_examples: int = 256,
    validation_examples: int = 64,
    test_examples: int = 50,
):
    """A :class:`mu2net.train.main.TaskData` of :func:`synthetic_data` (binary tests, no TF)."""
    from mu2net.train.batching import validation_batches
    from mu2net.train.main import TaskData

    del family
    hp = {**FAMILY.default_hparams(), **dict(hparams)}
    flat = {}
    for name, n, s in (
        ("train", train_examples, seed),
        ("validation", validation_examples, 10**6),
        ("test", test_examples, 10**6 + 1),
    ):
        d = synthetic_data(max(n, 1), hp, seed=s)
        flat[name] = {"inputs": d["inputs"][:n], "targets": d["targets"][:n, 0]}
    test = [
        {k: v[i : i + batch_size] for k, v in flat["test"].items()}
        for i in range(0, test_examples, batch_size)
    ]
    train = (
        batches(flat["train"], batch_size, seed=seed) if batch_size <= train_examples else iter(())
    )
    return TaskData(
        num_classes=int(hp["num_classes"]),
        train_batches=train,
        validation_batches=validation_batches(flat["validation"], batch_size, validation_examples)
        if validation_examples
        else [],
        test_batches=test,
        train_size=train_examples,
        name=f"synthetic:{task}",
    )
