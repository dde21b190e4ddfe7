"""Pure step functions of the trainer (built per architecture, jitted by the compile cache).

Loss (reference §3.5): mean over the batch of ``-sum(onehot * log_softmax(logits))``; no label
smoothing, weight decay or dropout. Frozen components enter as constants through
:func:`mu2net.models.base.apply_split`, so no gradient reaches them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mu2net.models.base import Family, apply_split
from mu2net.train.optim import set_runtime_hparams


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of integer ``labels`` ``[B]`` under ``logits`` ``[B, C]``."""
    logits = logits.astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _masked(tree: dict[str, Any], mask: dict[str, jax.Array], fallback: dict[str, Any] | None):
    # where, not multiply: a masked component keeps its exact value even if its gradient is inf.
    out = {}
    for name, sub in tree.items():
        keep = mask[name] > 0
        other = jax.tree_util.tree_map(jnp.zeros_like, sub) if fallback is None else fallback[name]
        out[name] = jax.tree_util.tree_map(lambda a, b, k=keep: jnp.where(k, a, b), sub, other)
    return out


def make_train_step(
    family: Family,
    hparams: Mapping[str, Any],
    tx: optax.GradientTransformation,
    masked: bool = False,
):
    """``step(trainable, opt_state, frozen, batch, hp[, mask]) -> (trainable, opt_state, metrics)``.

    ``hp`` is a float32 ``[3]`` array ``(learning_rate, momentum, nesterov)``: runtime values, so
    changing them never recompiles. ``batch`` holds ``inputs`` and integer ``targets`` ``[B]``.
    With ``masked``, ``mask`` maps every component of ``trainable`` to a float32 scalar: where it
    is 0 the gradient is zeroed before clipping (so it neither moves the global norm nor the
    momentum, which stays 0) and the params are returned unchanged, bit for bit.
    """
    hparams = dict(hparams)

    def step(trainable, opt_state, frozen, batch, hp, mask=None):
        opt_state = set_runtime_hparams(opt_state, hp[0], hp[1], hp[2])

        def loss_fn(tr):
            logits = apply_split(family, tr, frozen, batch["inputs"], hparams)
            return cross_entropy(logits, batch["targets"]), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        if masked:
            grads = _masked(grads, mask, None)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        new = optax.apply_updates(trainable, updates)
        trainable = _masked(new, mask, trainable) if masked else new
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["targets"])
        return trainable, opt_state, {"loss": loss, "accuracy": accuracy}

    return step


def make_eval_step(family: Family, hparams: Mapping[str, Any]):
    """``step(params, batch) -> (num_correct, predictions)``; ``batch['mask']`` drops padding."""
    hparams = dict(hparams)

    def step(params, batch):
        logits = family.apply(params, batch["inputs"], hparams)
        predictions = jnp.argmax(logits, -1).astype(jnp.int32)
        correct = jnp.sum((predictions == batch["targets"]) * batch["mask"])
        return correct, predictions

    return step


def make_logits_step(family: Family, hparams: Mapping[str, Any]):
    """``step(params, inputs) -> logits`` (float32)."""
    hparams = dict(hparams)

    def step(params, inputs):
        return family.apply(params, inputs, hparams).astype(jnp.float32)

    return step
