"""Baselines through the same trainer and budget (reference §4.9).

A baseline is one child of the root with a fixed clone set and no mutations, trained for the
whole evolutionary budget of a task: V x cycles x generations validation intervals.

* ``finetune_all``: every component cloned and trained.
* ``freeze_bottom:k``: the first k blocks (and everything below them) frozen and shared.
* ``adapters:d``: adapters of dim d before every block; adapters, head and forced
  components (the final norm) train.
* ``linear_probe``: only the head trains.

Baseline paths are never published: they exist to be compared with.
"""

from __future__ import annotations

import dataclasses
import re
import time
import zlib
from typing import Any

import numpy as np

from mu2net.evolution import data as evo_data
from mu2net.evolution.config import ConfigError, EvolutionConfig
from mu2net.evolution.mutations import make_child
from mu2net.evolution.prefix import PrefixCache, deterministic_inputs, suffix_plan
from mu2net.models.base import format_adapter_layers, get_family
from mu2net.system.state import System

_BLOCK = re.compile(r"^(encoderblock|block)_(\d+)$")


@dataclasses.dataclass
class BaselineResult:
    """Outcome of one baseline run."""

    kind: str
    task: str
    validation: float
    test: float
    trainable_params: int
    path_params: int
    examples: int
    seconds: float
    predictions: np.ndarray


def clone_rule(kind: str, family) -> tuple[Any, dict[str, Any]]:
    """(clone predicate, fixed hparams) of a baseline kind; errors name the kind."""
    forced = set(family.force_clone)
    if kind == "finetune_all":
        return (lambda name: True), {}
    if kind == "linear_probe":
        return (lambda name: False), {}
    m = re.fullmatch(r"freeze_bottom:(\d+)", kind)
    if m:
        k = int(m.group(1))

        def clone(name: str) -> bool:
            b = _BLOCK.match(name)
            if b:
                return int(b.group(2)) >= k
            return name in forced or _above_blocks(name)

        return clone, {}
    m = re.fullmatch(r"adapters:(\d+)", kind)
    if m:
        if not family.supports_adapters:
            raise ConfigError(f"baseline {kind!r}: family {family.name!r} has no adapters")
        return (lambda name: name in forced), {"adapter_dim": int(m.group(1))}
    raise ConfigError(
        f"unknown baseline {kind!r}; use finetune_all, linear_probe, freeze_bottom:K, adapters:D"
    )


def _above_blocks(name: str) -> bool:
    # Components after the block stack (final norm, head conv) train with the top blocks.
    return name in ("encoder_norm", "head_conv", "pooler")


def run_baseline(
    system: System, config: EvolutionConfig, task: str, kind: str, seed: int = 0
) -> BaselineResult:
    """Trains baseline ``kind`` for ``task`` from the system's root; returns its accuracies."""
    from mu2net.tasks import data as task_data
    from mu2net.train.trainer import TrainConfig, evaluate, train_candidate

    family = get_family(config.family)
    roots = [r for r in system.roots() if r.family == family.name]
    if not roots:
        raise ConfigError(f"no {family.name!r} root in the system: run `mu2net init` first")
    root = roots[0]
    info = task_data.task_info(task)
    rng = np.random.default_rng([seed, zlib.crc32(f"{task}|{kind}".encode())])
    clone, fixed = clone_rule(kind, family)
    defaults = config.path_defaults(family.default_hparams())
    ds = {k: v for k, v in defaults.items() if k.startswith("ds_")}
    base_hparams = {**root.hparams, **{k: v for k, v in defaults.items() if k.startswith("opt_")}}
    if kind.startswith("adapters:"):
        fixed["adapter_layers"] = format_adapter_layers(range(int(base_hparams["num_layers"])))
    scratch = System()
    scratch.components = dict(system.components)
    scratch.counters = dict(system.counters)
    parent = dataclasses.replace(root, hparams=base_hparams)
    child = make_child(
        system=scratch,
        family=family,
        parent=parent,
        task=task,
        num_classes=info.num_classes,
        ds_hparams=ds,
        space={},
        rng=rng,
        agent="baseline",
        lookup=lambda pid: None,
        mutate=False,
        fixed_hparams=fixed,
        clone_names=clone,
    )
    steps_between = evo_data.steps_between_validations(
        int(info.split_sizes["train"]),
        config.train_examples_between_validations,
        config.batch_size,
    )
    intervals = (
        config.num_validations * max(config.num_cycles, 1) * config.generations_per_task_iteration()
    )
    train_cfg = TrainConfig(
        batch_size=config.batch_size,
        steps_between_validations=steps_between,
        num_validations=intervals,
        seed=int(rng.integers(2**31)),
    )
    stream = evo_data.TrainStream(
        task,
        family,
        ds,
        config.batch_size,
        steps_between * intervals,
        seed=int(rng.integers(2**31)),
    )
    val = evo_data.validation_batches(
        evo_data.eval_arrays(task, "validation", family, ds, config.validation_examples),
        config.batch_size,
    )
    t0 = time.time()
    cache = None
    if config.prefix_cache and stream.materialized and deterministic_inputs(ds):
        cache = PrefixCache(family, list(stream), val)
    train_family, frozen, batches, val_batches = suffix_plan(
        cache, family, child.path.hparams, child.path.components, child.trainable,
        child.frozen, stream, val,
    )  # fmt: skip
    result = train_candidate(
        family=train_family, hparams=child.path.hparams, trainable=child.trainable,
        frozen=frozen, momentum=None, train_batches=iter(batches),
        validation_batches=val_batches, config=train_cfg, progress=False,
    )  # fmt: skip
    if result.failed or not result.best_trainable:
        raise RuntimeError(f"baseline {kind} on {task} failed: {result.failure_reason}")
    params = {**child.frozen, **result.best_trainable}
    test = evo_data.eval_batches(
        evo_data.eval_arrays(task, "test", family, child.path.hparams), config.batch_size
    )
    acc, preds = evaluate(family, child.path.hparams, params, test)
    return BaselineResult(
        kind=kind,
        task=task,
        validation=float(result.quality),
        test=float(acc),
        trainable_params=int(result.trainable_params),
        path_params=int(
            sum(scratch.component(c).num_params for c in child.path.components.values())
        ),
        examples=int(result.examples_seen),
        seconds=time.time() - t0,
        predictions=np.asarray(preds),
    )
