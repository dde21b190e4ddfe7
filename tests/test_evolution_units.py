"""Pure pieces of the evolution layer: hparam mutations, parent selection, child construction."""

import numpy as np
import pytest

from mu2net.evolution.config import ConfigError, EvolutionConfig
from mu2net.evolution.hparams import (
    AUTOTUNE_V1,
    AUTOTUNE_V2,
    incremental_mutation,
    mutate_model_hparams,
    sample_dataset_hparams,
)
from mu2net.evolution.mutations import (
    ChildTarget,
    Lineage,
    MutationError,
    MutationPolicy,
    make_child,
)
from mu2net.evolution.selection import DecaySelector, seed_paths
from mu2net.system.state import Path, System
from mu2net.train import testing as mlp

FAM = mlp.FAMILY


def test_incremental_mutation_moves_one_step_and_clamps():
    rng = np.random.default_rng(0)
    values = [1, 2, 3, 4]
    moves = {incremental_mutation(2, values, rng) for _ in range(50)}
    assert moves == {1, 3}
    ends = {incremental_mutation(1, values, rng) for _ in range(50)}
    assert ends == {1, 2}
    assert incremental_mutation(None, [None, 0.2, 0.4], np.random.default_rng(1)) in (None, 0.2)


def test_mu_mutates_first_and_all_keys_move_at_mu_one():
    rng = np.random.default_rng(0)
    hp = {
        "_mu_": 0.30,
        "opt_lr": 0.01,
        "opt_momentum": 0.9,
        "opt_nesterov": False,
        "opt_lr_warmup_ratio": 0.1,
        "ds_image_size": 32,
    }
    # _mu_ is processed first: with mu at the top of the list a draw may lower it; then every
    # later key uses the new value. With mu ~ 1 (a custom list) every key is mutated.
    space = {**AUTOTUNE_V2, "_mu_": [0.99, 1.0]}
    hp["_mu_"] = 1.0
    changes = mutate_model_hparams(hp, space, rng)
    assert "ds_image_size" not in changes  # dataset keys are per generation
    assert hp["ds_image_size"] == 32
    assert {"opt_lr", "opt_momentum", "opt_lr_warmup_ratio"} <= set(changes) | {"opt_nesterov"}
    for k, (old, new) in changes.items():
        vals = space[k]
        assert abs(vals.index(new) - vals.index(old)) == 1


def test_mu_zero_mutates_nothing():
    hp = {"_mu_": 0.0, "opt_lr": 0.01}
    assert mutate_model_hparams(hp, AUTOTUNE_V1, np.random.default_rng(0)) == {}


def test_per_type_mu_is_stored_and_inherited():
    hp = {"_mu_": 0.3, "opt_lr": 0.01}
    space = {"_mu_": [0.1, 0.2, 0.3], "opt_lr": [0.001, 0.01, 0.1]}
    mutate_model_hparams(hp, space, np.random.default_rng(0), per_type=True)
    assert "_mu_|hp:opt_lr" in hp and hp["_mu_|hp:opt_lr"] in space["_mu_"]
    # A child inherits its parent's per-type probability, not the global _mu_: with the
    # stored value at 0 (and no _mu_ list to move it) opt_lr never mutates, at 1 always.
    space = {"opt_lr": [0.001, 0.01, 0.1]}
    never = [{"_mu_": 1.0, "_mu_|hp:opt_lr": 0.0, "opt_lr": 0.01} for _ in range(30)]
    always = [{"_mu_": 0.0, "_mu_|hp:opt_lr": 1.0, "opt_lr": 0.01} for _ in range(30)]
    rng = np.random.default_rng(1)
    assert not any(mutate_model_hparams(h, space, rng, per_type=True) for h in never)
    assert all(mutate_model_hparams(h, space, rng, per_type=True) for h in always)


def test_dataset_hparams_come_from_the_best_path():
    defaults = {"ds_image_size": 32, "ds_flip_left_right": True, "opt_lr": 0.1}
    best = {"ds_image_size": 64, "opt_lr": 0.5}
    ds, changes = sample_dataset_hparams(defaults, best, AUTOTUNE_V1, 0.0, np.random.default_rng(0))
    assert ds == {"ds_image_size": 64, "ds_flip_left_right": True} and changes == {}
    ds, changes = sample_dataset_hparams(defaults, best, AUTOTUNE_V1, 1.0, np.random.default_rng(0))
    assert set(changes) <= {"ds_image_size", "ds_flip_left_right"} and changes


def _path(pid, task, quality=None, is_root=False):
    return Path(pid, task, FAM.name, {}, {}, "a", metrics={"quality": quality}, is_root=is_root)


def test_decay_selector_seeds_then_exploits():
    rng = np.random.default_rng(0)
    root = _path("r/p0", "root:x", is_root=True)
    others = [_path(f"o/p{i}", f"t:{i}", 0.5) for i in range(3)]
    seeds = seed_paths([root, *others, _path("p/p0", "private:z", 0.9)], "t:new", rng)
    assert {s.id for s in seeds} == {"r/p0", "o/p0", "o/p1", "o/p2"}  # private excluded
    pop = []
    sel = DecaySelector("t:new", pop, seeds, lambda p: p.metrics["quality"] or 0, {})
    first = [sel.select(rng)[0].id for _ in range(4)]
    assert len(set(first)) == 4  # a new task's first parents are distinct seeds
    good, bad = _path("n/p1", "t:new", 0.9), _path("n/p2", "t:new", 0.1)
    pop.extend([bad, good])
    picks = [sel.select(rng)[0].id for _ in range(200)]
    assert picks[0] == "n/p1"  # the best never-used path is accepted with probability 1
    # The decay rule balances offspring between paths (0.5 ** offspring acceptance).
    assert abs(picks.count("n/p1") - picks.count("n/p2")) <= 2
    assert sel.offspring["n/p1"] == picks.count("n/p1")


def test_linear_probe_seeding_uses_every_seed_unmutated_first():
    seeds = [_path(f"o/p{i}", f"t:{i}", 0.5) for i in range(3)]
    rng = np.random.default_rng(0)
    sel = DecaySelector("t:new", [], seeds, lambda p: 0.5, {}, linear_probe_seeding=True)
    got = [sel.select(rng) for _ in range(3)]
    assert [p.id for p, _ in got] == ["o/p0", "o/p1", "o/p2"]
    assert all(m is False for _, m in got)
    assert sel.select(rng)[1] is True


def _system_with_task():
    s = System()
    hp = {**FAM.default_hparams(), "_mu_": 0.0}
    import jax

    root = s.add_root(
        "root:mlp", FAM.name, jax.device_get(FAM.init(jax.random.PRNGKey(0), hp)), hp, "root"
    )
    s.add_task("t:a", "a")
    child = make_child(
        s,
        FAM,
        root,
        ChildTarget("t:a", 3, "a", {}),
        {},
        np.random.default_rng(0),
        Lineage(s, {}, None),
    )
    s.publish(child.path)
    return s, root, child


def test_child_of_root_shares_locked_components_and_gets_a_fresh_head():
    s, root, child = _system_with_task()
    assert child.actions == {"dense_0": "share", "dense_1": "share", "head": "fresh"}
    assert child.path.components["dense_0"] == root.components["dense_0"]
    assert child.path.components["head"] != root.components["head"]


def test_own_unlocked_components_are_always_cloned():
    s, root, first = _system_with_task()
    s.unlock_task("t:a", "a")
    child = make_child(
        s,
        FAM,
        first.path,
        ChildTarget("t:a", 3, "a", {}),
        {},
        np.random.default_rng(0),
        Lineage(s, {}, None),
    )
    # The parent's head is unlocked (its own task's): cloned, never modified in place.
    assert child.actions["head"] == "clone"
    assert child.path.components["head"] != first.path.components["head"]
    assert s.components[child.path.components["head"]].lineage == first.path.components["head"]
    assert child.actions["dense_0"] == "share"


def test_other_tasks_head_is_never_inherited_and_force_clone_works():
    s, root, first = _system_with_task()
    s.add_task("t:b", "b")
    child = make_child(
        s,
        FAM,
        first.path,
        ChildTarget("t:b", 5, "b", {}),
        {},
        np.random.default_rng(0),
        Lineage(s, {}, None),
        MutationPolicy(force_clone=("dense_1",)),
    )
    assert child.actions["head"] == "fresh"
    assert child.trainable["head"]["kernel"].shape[-1] == 5
    assert child.actions["dense_1"] == "clone"
    assert child.actions["dense_0"] == "share"


def test_wrong_family_parent_is_refused():
    s, root, first = _system_with_task()
    wrong = Path("x/p0", "t:a", "vit", dict(first.path.components), {}, "x")
    with pytest.raises(MutationError, match="'vit' path"):
        make_child(
            s,
            FAM,
            wrong,
            ChildTarget("t:a", 3, "a", {}),
            {},
            np.random.default_rng(0),
            Lineage(s, {}, None),
        )


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("num_validations", 0, "budget must be > 0"),
        ("batch_size", -1, "budget must be > 0"),
        ("space", "nope", "unknown space"),
        ("scale", 1.5, "scale"),
        ("mutate_adapters", True, "has no residual adapters"),
    ],
)
def test_contradictory_config_errors(field, value, match):
    cfg = EvolutionConfig(family=FAM.name, **{field: value})
    with pytest.raises(ConfigError, match=match):
        cfg.validate(FAM)


# ------------------------------------------------------------------ structural mutations on ViT
def _vit_root(**hp):
    import jax

    from mu2net.models import get_family

    vit = get_family("vit")
    hparams = {
        **vit.default_hparams(),
        "num_classes": 3,
        "ds_image_size": 16,
        "_mu_": 1.0,
        "vit_norm": "rmsnorm",
        **hp,
    }
    s = System()
    params = jax.device_get(vit.init(jax.random.PRNGKey(0), hparams))
    root = s.add_root("root:vit", "vit", params, hparams, "root")
    return vit, s, root


def _vit_child(vit, s, root, ds_hparams=None, **policy):
    target = ChildTarget("t:v", 3, "v", ds_hparams or {"ds_image_size": 16})
    rng = np.random.default_rng(3)
    return make_child(s, vit, root, target, {}, rng, Lineage(s, {}, None), MutationPolicy(**policy))


def test_adapter_mutation_adds_fresh_zero_output_adapters():
    vit, s, root = _vit_root()
    child = _vit_child(vit, s, root, adapters=True)
    layers = child.path.hparams["adapter_layers"]
    assert layers == "0_1"  # mu = 1: an adapter before every block
    assert child.actions["residual_adapter_0"] == "fresh"
    assert not np.any(child.trainable["residual_adapter_0"]["Dense_1"]["kernel"])


def test_image_size_change_interpolates_the_position_embedding():
    vit, s, root = _vit_root(_mu_=0.0)
    child = _vit_child(vit, s, root, ds_hparams={"ds_image_size": 24})
    assert child.actions["posembed_input"] == "adapt"
    pos = child.trainable["posembed_input"]["pos_embedding"]
    assert pos.shape == (1, 1 + (24 // 4) ** 2, 32)
    np.testing.assert_array_equal(
        pos[:, :1], s.components[root.components["posembed_input"]].params["pos_embedding"][:, :1]
    )


def test_expansion_mutations_preserve_the_function():
    vit, s, root = _vit_root(_mu_=1.0)
    child = _vit_child(vit, s, root, expansions=("mlp_width", "add_layers"))
    assert set(child.mutations["expansions"]) == {"mlp_width", "add_layers"}
    assert int(child.path.hparams["num_layers"]) == 3
    rng = np.random.default_rng(0)
    head = {
        k: rng.normal(size=v.shape).astype(np.float32) for k, v in child.trainable["head"].items()
    }  # non-zero, else logits are all 0
    params = {**child.frozen, **child.trainable, "head": head}
    x = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
    hp_root = {**root.hparams, "num_classes": 3}
    before = {**s.params_of(root), "head": head}
    np.testing.assert_allclose(
        np.asarray(vit.apply(params, x, child.path.hparams)),
        np.asarray(vit.apply(before, x, hp_root)),
        atol=1e-5,
    )
