"""Configuration of an evolution run: one gin-configurable dataclass.

Every field is a gin binding (``EvolutionConfig.num_cycles = 2``); experiments in
``gin/experiments/*.gin`` set them, and every path records the hparams it was trained with.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from mu2net.errors import Mu2netError
from mu2net.evolution.hparams import BASE_DEFAULTS, SPACES
from mu2net.train._gin import gin


class ConfigError(Mu2netError, ValueError):
    """A contradictory or impossible evolution configuration; names the key."""


@gin.configurable
@dataclasses.dataclass
class EvolutionConfig:
    """What to evolve and with which budget.

    Attributes:
      strategy: agent strategy (``mu2net``; baselines ``finetune_all``, ``linear_probe``,
        ``freeze_bottom:K``, ``adapters:D``), see ``mu2net.evolution.strategy``.
      agent_classes_to_load: other agent classes (e.g. ``vit(vit_size=L/16)``) whose paths
        this agent may use as parents; its own class always (reference §7.2).
      family: registered model family of the root (``vit``, ``efficientnet_lite0``, ``bert``).
      root_hparams: architecture hparams of the root (e.g. ``{"vit_size": "Ti/16"}``).
      pretrained: load the family's pretrained root (else a random init, reference "Ti0").
      checkpoint: checkpoint path for the pretrained root (family default when empty).
      defaults: default hparams of new paths (reference §3.2), merged over the base defaults.
      space: search-space name (``none``, ``v1``, ``v2``, ``mu3``) or explicit dict.
      extra_space: extra keys/value lists added to the space (e.g. ``num_layers``).
      per_type_mu: µ3Net per-mutation-type self-tuned probabilities.
      mutate_adapters: adapter insertion mutations (reference §2.3).
      expansions: names of function-preserving transformer expansions allowed as mutations.
      force_clone: component names always cloned (the family's own list is added).
      scale: scorer base s (1.0 = score is validation accuracy).
      params_base: P_base of the scorer (defaults to the root's param count).
      flops_base: F_base of the optional FLOPs factor (0 = off).
      batch_size: training batch size.
      train_examples_between_validations: cap on examples between validations (S x batch).
      num_validations: validations per candidate (V).
      validation_examples: cap on validation examples.
      candidates_per_generation: children trained on the same data stream per generation.
      samples_per_task_iteration: children sampled per task iteration (ignored when a
        compute budget is set).
      budget_flops: a task iteration's compute budget in training + validation FLOPs (XLA's
        count); as many candidates run as fit (0 = bounded by the counts above).
      budget_seconds: the same in wall seconds, compiles and input pipelines included.
      num_cycles: passes over the live mixture (0 with ``continuous`` = forever).
      continuous: keep looping and pick up tasks added while running.
      poll_seconds: continuous mode: wait between checks when there is nothing to do.
      strict_improvement: ``>`` (muNet/µ4Net) instead of ``>=`` (µ2Net) against the parent.
      max_population: cap on a task's population during an iteration (0 = none).
      prune_by_decay: µ4Net2's pruning: keep the best, then survivors drawn by the decay
        rule (by score, accepted with probability 0.5^offspring) up to ``max_population``.
      linear_probe_seeding: muNet's policy: every seed is first tried unmutated.
      test_eval: evaluate new best paths on the test split.
      test_eval_every_generation: µ4Net2's continuous evolution: also test-evaluate the best
        after every generation that improved it (when it is committed), not only at the end
        of the task iteration; logged and written as the ``test_quality_per_generation``
        scalar. Test numbers are reported, never used for selection.
      prefix_cache: reuse the activations of frozen bottom stages within a generation when
        the input pipeline is deterministic (see ``mu2net.evolution.prefix``).
      prefix_memo: with ``prefix_cache``, also keep those activations per example across the
        generations and task iterations of a run, so each example goes through a frozen
        prefix once (exact: keyed by the prefix's and the example's bytes).
      suffix_executables: one compiled train step per lowest trainable component, shared by
        every clone set above it (see ``TrainConfig.suffix_executable``).
      quality_metric: what validation quality (hence the score) is: ``accuracy`` (top-1,
        the reference), ``primary`` (the task's first seqio metric), or the name of any
        scalar its metric_fns give (e.g. ``macro_f1``); recorded with each path.
      seed: master seed (same seed and config => same system on CPU).
    """

    strategy: str = "mu2net"
    agent_classes_to_load: tuple[str, ...] = ()
    family: str = "vit"
    root_hparams: dict[str, Any] = dataclasses.field(default_factory=dict)
    pretrained: bool = False
    checkpoint: str = ""
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    space: Any = "v1"
    extra_space: dict[str, list] = dataclasses.field(default_factory=dict)
    per_type_mu: bool = False
    mutate_adapters: bool = False
    expansions: tuple[str, ...] = ()
    force_clone: tuple[str, ...] = ()
    scale: float = 1.0
    params_base: float = 0.0
    flops_base: float = 0.0
    batch_size: int = 32
    train_examples_between_validations: int = 512
    num_validations: int = 2
    validation_examples: int = 256
    candidates_per_generation: int = 2
    samples_per_task_iteration: int = 4
    budget_flops: float = 0.0
    budget_seconds: float = 0.0
    num_cycles: int = 1
    continuous: bool = False
    poll_seconds: float = 5.0
    strict_improvement: bool = False
    max_population: int = 0
    prune_by_decay: bool = False
    linear_probe_seeding: bool = False
    test_eval: bool = True
    test_eval_every_generation: bool = False
    prefix_cache: bool = True
    prefix_memo: bool = True
    suffix_executables: bool = True
    quality_metric: str = "accuracy"
    seed: int = 0

    def search_space(self) -> dict[str, list]:
        """The resolved search space (named space + extra keys)."""
        if isinstance(self.space, str):
            if self.space not in SPACES:
                raise ConfigError(
                    f"EvolutionConfig.space: unknown space {self.space!r}; known {sorted(SPACES)}"
                )
            space = dict(SPACES[self.space])
        else:
            space = dict(self.space)
        space.update({k: list(v) for k, v in self.extra_space.items()})
        return space

    def path_defaults(self, family_defaults: dict[str, Any]) -> dict[str, Any]:
        """Hparams of a brand-new path: base defaults < family defaults < config defaults."""
        return {**BASE_DEFAULTS, **family_defaults, **self.root_hparams, **self.defaults}

    def generations_per_task_iteration(self) -> int:
        """Generations per task iteration: ceil(samples / candidates per generation)."""
        return -(-self.samples_per_task_iteration // self.candidates_per_generation)

    def validate(self, family) -> None:
        """Raises :class:`ConfigError` naming the offending key."""
        positive = [
            "batch_size",
            "train_examples_between_validations",
            "num_validations",
            "validation_examples",
            "candidates_per_generation",
            "samples_per_task_iteration",
        ]
        for key in positive:
            if int(getattr(self, key)) <= 0:
                raise ConfigError(
                    f"EvolutionConfig.{key} = {getattr(self, key)!r}: the budget must be > 0"
                )
        for key in ("budget_flops", "budget_seconds"):
            value = float(getattr(self, key))
            if not math.isfinite(value) or value < 0:
                raise ConfigError(
                    f"EvolutionConfig.{key} = {getattr(self, key)!r}: must be finite and >= 0 "
                    "(0 = no compute budget)"
                )
        if self.num_cycles < 0 or (self.num_cycles == 0 and not self.continuous):
            raise ConfigError("EvolutionConfig.num_cycles must be >= 1 (or set continuous=True)")
        if not 0.0 < self.scale <= 1.0:
            raise ConfigError(f"EvolutionConfig.scale = {self.scale}: must be in (0, 1]")
        if self.mutate_adapters and not family.supports_adapters:
            raise ConfigError(
                f"EvolutionConfig.mutate_adapters: family {family.name!r} has no residual adapters"
            )
        if self.expansions:
            from mu2net.models import expansions as exp

            unknown = set(self.expansions) - set(exp.EXPANSIONS)
            if unknown:
                raise ConfigError(
                    f"EvolutionConfig.expansions: unknown {sorted(unknown)}; "
                    f"known {sorted(exp.EXPANSIONS)}"
                )
            if not family.supports_expansions:
                raise ConfigError(
                    f"EvolutionConfig.expansions: family {family.name!r} does not support "
                    "the transformer expansions"
                )
        self.search_space()
