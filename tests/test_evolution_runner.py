"""The task-iteration runner and the strategy seam: generation semantics, resume, classes."""

import dataclasses

import numpy as np
import pytest
from test_evolution_system import tiny_config

from mu2net.evolution.config import ConfigError, EvolutionConfig
from mu2net.evolution.hparams import BASE_DEFAULTS, SPACES, mutate_model_hparams
from mu2net.evolution.hparams import sample_dataset_hparams as sample_ds
from mu2net.evolution.live import add_tasks_to_store
from mu2net.evolution.loop import Evolver
from mu2net.evolution.main import open_or_create
from mu2net.evolution.roots import create_root
from mu2net.evolution.runner import PROGRESS_KEY
from mu2net.evolution.search import Mu2NetStrategy
from mu2net.evolution.selection import OFFSPRING_KEY
from mu2net.evolution.strategy import get_strategy, register_strategy
from mu2net.models import get_family
from mu2net.system.store import Store

A, B = "mu2net:lfw_faces", "mu2net:digits"


def _quiet(store, cfg, **kw):
    return Evolver(store, cfg, progress=False, log=lambda s: None, **kw)


@pytest.fixture(scope="module")
def one_task(tmp_path_factory):
    """A store whose task A has one published path (so B has seeds: A's path and the root)."""
    url = str(tmp_path_factory.mktemp("runner") / "sys")
    cfg = tiny_config()
    store = open_or_create(url, cfg)
    add_tasks_to_store(store, [A])
    _quiet(store, cfg).run()
    return url, cfg


def _copy_store(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return Store.open(dst)


def test_all_parents_of_a_generation_are_drawn_before_training(one_task, tmp_path):
    url, cfg = one_task
    store = _copy_store(url, str(tmp_path / "s"))
    add_tasks_to_store(store, [B])
    _quiet(store, cfg, tasks=[B]).run()
    cands = [h for h in store.history() if h.get("task") == B and "parent" in h]
    assert len(cands) == 2 and {h["generation"] for h in cands} == {0}
    # Both parents of the new task's first generation are seeds (A's path and the root),
    # never the first child of the same generation.
    assert all(h["parent_task"] != B for h in cands)
    assert len({h["parent"] for h in cands}) == 2
    # Offspring counts of every parent used, other agents' paths and the root included, are
    # persisted in B's own path.
    best = store.load().best_path(B)
    import json

    counts = json.loads(best.metrics[OFFSPRING_KEY])
    assert counts == {h["parent"]: 1 for h in cands}


def _readme_strategy():
    """The README's 20-line example strategy, run as written (it registers ``head_only``)."""
    import os
    import re

    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    blocks = re.findall(r"```python\n(.*?)```", open(readme).read(), flags=re.S)
    code = next(b for b in blocks if "class HeadOnly(Strategy)" in b)
    assert len(code.strip().splitlines()) <= 25
    exec(compile(code, "README.md", "exec"), {})


_readme_strategy()


def test_a_new_strategy_runs_through_the_same_runner(tmp_path):
    cfg = tiny_config(strategy="head_only", samples_per_task_iteration=2)
    store = open_or_create(str(tmp_path / "s"), cfg)
    add_tasks_to_store(store, [A])
    summaries = _quiet(store, cfg).run()
    assert summaries[0]["strategy"] == "head_only" and summaries[0]["candidates"] == 2
    system = store.load()
    best, root = system.best_path(A), system.roots()[0]
    shared = {n for n, c in best.components.items() if root.components.get(n) == c}
    assert shared == set(best.components) - {"head"}
    assert best.metrics["test_quality"] is not None


def test_unknown_strategy_is_named():
    with pytest.raises(ConfigError, match="unknown strategy 'nope'.*mu2net"):
        get_strategy("nope")


class _Killed(Exception):
    pass


class KilledAfterFirstGeneration(Mu2NetStrategy):
    name = "test_killed"

    def propose(self, ctx, gen, n):
        if gen.index == 1:
            raise _Killed  # as if the process died here: nothing after this point lands
        return super().propose(ctx, gen, n)


register_strategy("test_killed", KilledAfterFirstGeneration)


def test_kill_after_a_generation_keeps_its_best_and_resumes(tmp_path):
    cfg = tiny_config(samples_per_task_iteration=4, candidates_per_generation=2)
    store = open_or_create(str(tmp_path / "s"), cfg)
    add_tasks_to_store(store, [A])
    with pytest.raises(_Killed):
        _quiet(store, dataclasses.replace(cfg, strategy="test_killed")).run()
    kept = store.load().best_path(A)
    progress = kept.metrics[PROGRESS_KEY]
    assert (progress["iteration"], progress["generation"]) == (0, 0)
    # What generation 0 spent is kept, so a compute budget resumes where it stopped.
    assert progress["spent"]["candidates"] == 2 and progress["spent"]["flops"] > 0
    assert "task_iterations" not in kept.metrics or kept.metrics["task_iterations"] == 0
    _quiet(store, cfg).run()
    done = store.load().best_path(A)
    assert done.metrics["task_iterations"] == 1 and PROGRESS_KEY not in done.metrics
    assert done.metrics["quality"] >= kept.metrics["quality"]
    gens = [h["generation"] for h in store.history() if h.get("task") == A and "parent" in h]
    assert sorted(gens) == [0, 0, 1, 1]  # generation 0 was not trained again


def test_continuous_evolution_tests_the_best_after_every_improving_generation(tmp_path):
    """µ4Net2: the best is committed and test-evaluated after each generation that improved it."""
    cfg = tiny_config(
        samples_per_task_iteration=4, candidates_per_generation=1, test_eval_every_generation=True
    )
    store = open_or_create(str(tmp_path / "s"), cfg)
    add_tasks_to_store(store, [B])
    lines = []
    Evolver(store, cfg, progress=False, log=lines.append).run()
    per_gen = [line for line in lines if " test " in line and " gen" in line]
    commits = [h for h in store.history() if h.get("event") == "task_iteration"]
    cands = [h for h in store.history() if h.get("task") == B and "parent" in h]
    assert len(cands) == 4 and len(commits) == 1
    # The first generation always improves on nothing; each later one only if it beat the best.
    assert 1 <= len(per_gen) <= 4 and "gen0" in per_gen[0]
    best = store.load().best_path(B)
    assert best.metrics["test_generation"] == int(per_gen[-1].split(" gen")[1].split(":")[0])
    assert f"test {best.metrics['test_quality']:.4f}" in per_gen[-1]
    assert commits[0]["test_quality"] == best.metrics["test_quality"]


def test_changed_validation_settings_revalidate_the_parent(one_task, tmp_path):
    url, cfg = one_task
    store = _copy_store(url, str(tmp_path / "s"))
    before = store.load().best_path(A)
    assert before.metrics["validation"]["examples"] == cfg.validation_examples
    lines = []
    other = dataclasses.replace(cfg, validation_examples=64, num_cycles=2)
    Evolver(store, other, progress=False, log=lines.append).run()
    assert any("re-validated" in line and before.id in line for line in lines)
    assert store.load().best_path(A).metrics["validation"]["examples"] == 64


def test_agent_classes_never_mix_architectures(one_task, tmp_path):
    url, cfg = one_task
    store = _copy_store(url, str(tmp_path / "s"))
    other = dataclasses.replace(
        cfg, root_hparams={**cfg.root_hparams, "vit_size": "Ti/16", "num_layers": 1}
    )
    root = create_root(store, other)
    assert root.id != store.load().roots()[0].id or len(store.load().roots()) == 2
    assert len(store.load().roots()) == 2
    # A task evolved by the "test" class cannot be taken over by the Ti/16 class.
    with pytest.raises(ConfigError, match="agent class"):
        _quiet(store, dataclasses.replace(other, num_cycles=2)).run()
    # A new task of the Ti/16 class uses only its own class's paths: the Ti/16 root.
    add_tasks_to_store(store, [B])
    _quiet(store, other, tasks=[B]).run()
    system = store.load()
    for h in store.history():
        if h.get("task") == B and "parent" in h:
            assert h["parent"] == root.id
    assert system.best_path(B).hparams["vit_size"] == "Ti/16"


def _vit_defaults(cfg: EvolutionConfig):
    return cfg.path_defaults(get_family("vit").default_hparams())


@pytest.mark.parametrize("space_name", sorted(SPACES))
def test_every_key_of_every_space_can_mutate(space_name):
    space = SPACES[space_name]
    defaults = {**_vit_defaults(EvolutionConfig(space=space_name)), "num_layers": 2}
    stuck = []
    for key, values in space.items():
        moved = False
        for seed in range(20):
            rng = np.random.default_rng(seed)
            if key.startswith("ds_"):
                _, changes = sample_ds(defaults, None, {key: values}, 1.0, rng)
            else:
                hp = {**defaults, "_mu_": 1.0} if key != "_mu_" else dict(defaults)
                sub = {key: values} if key != "_mu_" else {"_mu_": [*values, 1.0]}
                hp["_mu_"] = 1.0
                changes = mutate_model_hparams(hp, sub, rng)
            if key in changes:
                moved = True
                break
        if not moved:
            stuck.append(key)
    assert not stuck, f"{space_name}: keys that can never mutate: {stuck}"
    assert set(BASE_DEFAULTS) >= {k for k in space if k.startswith("ds_")}
