"""The µ2Net / muNet search as an agent strategy (reference §2-§4).

Parents come from the decay rule over the task's population and the seeds (other tasks'
paths and the root of the agent's class); children get incremental hparam mutations,
clone-or-share draws per component, adapters, expansions, as the config allows.
"""

from __future__ import annotations

from mu2net.evolution.mutations import ChildTarget, MutationPolicy, make_child
from mu2net.evolution.selection import DecaySelector
from mu2net.evolution.strategy import (
    GenerationSpec,
    IterationContext,
    Proposal,
    Strategy,
    register_strategy,
)


class Mu2NetStrategy(Strategy):
    """The evolutionary search of µ2Net (muNet's linear-probe seeding as a config option)."""

    name = "mu2net"

    def __init__(self, name: str | None = None):
        super().__init__(name)
        self.selector: DecaySelector | None = None

    def begin(self, ctx: IterationContext) -> None:
        """Builds the decay-rule selector over the task's population and seeds."""
        self.selector = DecaySelector(
            ctx.task,
            ctx.population,
            ctx.seeds,
            lambda p: ctx.score(p, None),
            ctx.offspring,
            ctx.config.linear_probe_seeding,
        )

    def propose(self, ctx: IterationContext, gen: GenerationSpec, n: int) -> list[Proposal]:
        """All ``n`` parents first (counts updated as drawn, §4.3), then their children."""
        assert self.selector is not None, "begin() was not called"
        drawn = [self.selector.select(gen.rng) for _ in range(n)]
        cfg = ctx.config
        target = ChildTarget(ctx.task, ctx.info.num_classes, ctx.agent, gen.ds)
        proposals = []
        for parent, mutate in drawn:
            policy = MutationPolicy(
                mutate=mutate,
                per_type_mu=cfg.per_type_mu,
                adapters=cfg.mutate_adapters,
                expansions=tuple(cfg.expansions),
                force_clone=tuple(cfg.force_clone),
            )
            child = make_child(
                ctx.system, ctx.family, parent, target, ctx.space, gen.rng, ctx.lineage, policy
            )
            proposals.append(Proposal(parent, child))
        return proposals


register_strategy("mu2net", Mu2NetStrategy)
