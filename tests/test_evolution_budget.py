"""Compute budgets: a task iteration bounded by FLOPs or seconds, and baselines given the same."""

import dataclasses
import math

import pytest
from test_evolution_system import tiny_config

from mu2net.evolution.baselines import LR_GRID_FACTORS, run_baseline
from mu2net.evolution.budget import Budget, Spending
from mu2net.evolution.config import ConfigError
from mu2net.evolution.live import add_tasks_to_store
from mu2net.evolution.loop import Evolver
from mu2net.evolution.main import open_or_create
from mu2net.models import get_family

TASK = "mu2net:lfw_faces"


def _evolve(tmp_path, name, cfg):
    store = open_or_create(str(tmp_path / name), cfg)
    add_tasks_to_store(store, [TASK])
    (summary,) = Evolver(store, cfg, progress=False, log=lambda s: None).run()
    return store, summary


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    """One count-bounded iteration: 2 candidates; its FLOPs per candidate set the budgets."""
    _, summary = _evolve(tmp_path_factory.mktemp("budget"), "counted", tiny_config())
    return summary


def test_summary_accounts_flops_and_seconds_by_kind(counted):
    assert counted["candidates"] == 2
    # Published per generation, yet a new best against where the iteration started.
    assert counted["new_best"]
    kinds = counted["flops_by_kind"]
    assert kinds["train"] > 0 and kinds["eval"] > 0
    assert counted["flops"] == pytest.approx(sum(kinds.values()))
    phases = counted["seconds_by_phase"]
    assert {"compile_s", "data_s", "train_s", "eval_s"} <= set(phases)
    assert counted["spent"]["flops"] == pytest.approx(counted["flops"])
    assert counted["budget"] == {"flops": 0.0, "seconds": 0.0}


def test_flops_budget_runs_as_many_candidates_as_fit(counted, tmp_path):
    per_candidate = counted["flops"] / counted["candidates"]
    # 3.5 candidates' worth: the first generation's 2, then 1 more (a 4th would not fit).
    cfg = tiny_config(budget_flops=3.5 * per_candidate)
    store, summary = _evolve(tmp_path, "budgeted", cfg)
    assert summary["candidates"] == 3
    assert summary["flops"] <= cfg.budget_flops
    gens = sorted(
        h["generation"] for h in store.history() if h.get("task") == TASK and "parent" in h
    )
    assert gens == [0, 0, 1]
    assert summary["budget"]["flops"] == cfg.budget_flops


def test_baselines_train_as_long_as_the_budget_pays(counted, tmp_path):
    cfg = tiny_config()
    system = open_or_create(str(tmp_path / "root"), cfg).load()
    small = run_baseline(
        system, dataclasses.replace(cfg, budget_flops=counted["flops"]), TASK, "finetune_all"
    )
    big = run_baseline(
        system, dataclasses.replace(cfg, budget_flops=3 * counted["flops"]), TASK, "finetune_all"
    )
    assert 0 < small.flops <= counted["flops"]
    assert big.flops <= 3 * counted["flops"]
    # One validation interval more would have overshot: the budget is nearly spent.
    assert big.examples > 2 * small.examples
    assert big.flops > 2 * small.flops


def test_lr_grid_shares_the_budget_and_keeps_the_best_on_validation(counted, tmp_path):
    cfg = dataclasses.replace(tiny_config(), budget_flops=counted["flops"])
    system = open_or_create(str(tmp_path / "root"), cfg).load()
    grid = run_baseline(system, cfg, TASK, "finetune_all_lr_grid")
    base_lr = cfg.defaults["opt_lr"]
    assert grid.hparams["opt_lr"] in [pytest.approx(base_lr * f) for f in LR_GRID_FACTORS]
    assert grid.flops <= cfg.budget_flops


def test_spending_fit_stops_when_the_next_candidate_does_not_fit():
    budget = Budget(flops=10.0)
    spent = Spending()
    assert spent.fit(budget, 2) == 2  # nothing known yet: the first generation runs
    spent.add([{"flops": {"train": 3.0}}, {"flops": {"train": 3.0}}], seconds=1.0)
    assert spent.fit(budget, 2) == 1  # 4 left, 3 per candidate
    spent.add([{"flops": {"train": 3.0}}], seconds=1.0)
    assert spent.fit(budget, 2) == 0
    assert Spending().fit(Budget(), 5) == 5  # no budget: the counts decide
    assert Spending.from_json(spent.to_json()) == spent


@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf])
def test_bad_budget_names_the_key(value):
    cfg = tiny_config(budget_seconds=value)
    with pytest.raises(ConfigError, match="budget_seconds"):
        cfg.validate(get_family("vit"))


@pytest.mark.parametrize("suffix", [False, True])
def test_step_cost_on_a_fresh_cache_is_what_training_executes(suffix):
    import jax

    from mu2net.train import testing
    from mu2net.train.compile_cache import CompileCache
    from mu2net.train.cost import step_cost
    from mu2net.train.trainer import TrainConfig, train_candidate

    fam = get_family(testing.FAMILY_NAME)
    hp = fam.default_hparams()
    params = fam.init(jax.random.PRNGKey(0), hp)
    trainable = {"dense_1": params["dense_1"], "head": params["head"]}
    frozen = {"dense_0": params["dense_0"]}
    data = testing.synthetic_data(32)
    val = [{k: v[:16] for k, v in data.items()}]
    cfg = TrainConfig(
        batch_size=8, steps_between_validations=3, num_validations=1, suffix_executable=suffix
    )
    cost = step_cost(
        family=fam, hparams=hp, trainable=trainable, frozen=frozen,
        batch={k: v[:8] for k, v in data.items()}, validation_batches=val, config=cfg,
        measure=True, cache=CompileCache(persistent=False),
    )  # fmt: skip
    result = train_candidate(
        family=fam, hparams=hp, trainable=trainable, frozen=frozen,
        train_batches=testing.batches(data, 8), validation_batches=val, config=cfg,
        progress=False, cache=CompileCache(persistent=False),
    )  # fmt: skip
    assert cost.train_flops > 0 and cost.train_seconds > 0 and cost.eval_seconds > 0
    assert cost.train_flops * result.steps == pytest.approx(result.flops["train"])
    assert cost.eval_flops == pytest.approx(result.flops["eval"])
