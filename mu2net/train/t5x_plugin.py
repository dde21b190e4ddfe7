"""Optional t5x plug-in: a mu2net path as a ``t5x.models.BaseModel`` (classification).

Install t5x from source to use it (it is not on PyPI); nothing else in mu2net imports this module.
The model trains every component of the path it is given with t5x's own trainer and optimizer
(use mu2net's trainer for frozen/shared components: t5x's optimizer updates all params unless
you configure its ``MultiOptimizer``). Batches are ``{'inputs', 'targets'}`` as produced by the
mu2net seqio tasks; ``targets`` are class ids ``[B]`` or ``[B, 1]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import seqio

# t5x imports gin: the real gin-config must be in sys.modules first (a source checkout's gin/
# config folder would shadow it when running from the repository root).
from mu2net.train._gin import gin  # noqa: F401

# isort: split
from t5x import models as t5x_models

from mu2net.models.base import get_family
from mu2net.train.steps import cross_entropy


class ClassificationFeatureConverter(seqio.PassThroughFeatureConverter):
    """Passes ``inputs``/``targets`` through (t5x needs TASK_FEATURES / MODEL_FEATURES)."""

    TASK_FEATURES = {
        "inputs": seqio.FeatureConverter.FeatureSpec(dtype="float32", rank=3),
        "targets": seqio.FeatureConverter.FeatureSpec(dtype="int32"),
    }
    MODEL_FEATURES = TASK_FEATURES
    PACKING_FEATURE_DTYPE = None


def _labels(targets: jax.Array) -> jax.Array:
    return targets.reshape(targets.shape[0], -1)[:, 0].astype(jnp.int32)


class PathModel(t5x_models.BaseModel):
    """A mu2net path (family + hparams; params keyed by component) for t5x's train/eval loops."""

    FEATURE_CONVERTER_CLS = ClassificationFeatureConverter

    def __init__(self, family: str, hparams: Mapping[str, Any], optimizer_def: Any):
        self.family = get_family(family)
        self.hparams = {**self.family.default_hparams(), **dict(hparams)}
        super().__init__(optimizer_def=optimizer_def)

    def _logits(self, params, inputs):
        return self.family.apply(params, inputs, self.hparams).astype(jnp.float32)

    def loss_fn(self, params, batch, dropout_rng):
        """Mean softmax cross-entropy; metrics: accuracy and loss (clu metrics)."""
        del dropout_rng  # mu2net paths are deterministic (reference §3.5: no dropout)
        from clu import metrics as clu_metrics

        logits = self._logits(params, batch["inputs"])
        labels = _labels(batch["targets"])
        loss = cross_entropy(logits, labels)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        metrics = {
            "loss": clu_metrics.Average.from_model_output(jnp.full_like(correct, loss)),
            "accuracy": clu_metrics.Average.from_model_output(correct),
        }
        return loss, metrics

    def predict_batch_with_aux(self, params, batch, rng=None):
        """Predicted class ids ``[B]`` and the logits as auxiliary output."""
        del rng
        logits = self._logits(params, batch["inputs"])
        return jnp.argmax(logits, -1).astype(jnp.int32), {"logits": logits}

    def score_batch(self, params, batch, return_intermediates=False):
        """Log-probability of each example's target class ``[B]``."""
        del return_intermediates
        logp = jax.nn.log_softmax(self._logits(params, batch["inputs"]), -1)
        return jnp.take_along_axis(logp, _labels(batch["targets"])[:, None], -1)[:, 0]

    def get_initial_variables(self, rng, input_shapes, input_types=None):
        """``{'params': {component: params}, 'params_axes': ...}`` from the family's init.

        ``params_axes`` names no logical axis, so t5x's ``PjitPartitioner`` replicates every
        param (mu2net components are small; shard them with your own rules if they are not).
        """
        del input_shapes, input_types  # shapes follow from hparams
        params = self.family.init(rng, self.hparams)
        return {"params": params, "params_axes": _replicated_axes(params)}


def _replicated_axes(params: Mapping[str, Any]) -> dict[str, Any]:
    """Flax ``AxisMetadata`` (all dims unnamed) for every leaf, keyed ``<name>_axes``."""
    from flax.linen import partitioning as flax_partitioning

    out = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            out[key] = _replicated_axes(value)
        else:
            out[f"{key}_axes"] = flax_partitioning.AxisMetadata(names=(None,) * jnp.ndim(value))
    return out


def absolute_path(path: str) -> str:
    """``path`` made absolute against the working directory (t5x's MODEL_DIR).

    orbax-checkpoint refuses a relative checkpoint path at the first save, while t5x users
    pass ``--gin.MODEL_DIR="'runs/x'"``; ``gin/t5x/pretrain_path.gin`` routes MODEL_DIR
    through this.
    """
    import os

    return os.path.abspath(os.path.expanduser(path))
