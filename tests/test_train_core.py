"""Trainer core on the tiny MLP family: schedules, optimizer, snapshots, failures, compiles."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mu2net.train import (
    CompileCache,
    TrainConfig,
    TrainError,
    evaluate,
    lr_schedule,
    optim,
    predict_logits,
    split_path,
    testing,
    train_candidate,
)
from mu2net.train import steps as steps_lib
from mu2net.train.steps import cross_entropy

FAM = testing.FAMILY
HP = {**FAM.default_hparams(), "opt_lr": 0.1, "opt_momentum": 0.9}
CACHE = CompileCache(persistent=False)


@pytest.fixture(scope="module")
def setup():
    params = jax.tree_util.tree_map(np.asarray, FAM.init(jax.random.PRNGKey(0), HP))
    data = testing.synthetic_data(256)
    val = list(testing.batches(testing.synthetic_data(72, seed=1), 32, repeat=False))
    return params, data, val


def _train(params, data, val, trainable=("dense_1", "head"), hp=None, **kw):
    tr, fr = split_path(params, trainable)
    cfg = kw.pop(
        "config",
        TrainConfig(
            batch_size=16, steps_between_validations=5, num_validations=2, momentum_dtype=None
        ),
    )
    return train_candidate(
        family=FAM,
        hparams=hp or HP,
        trainable=tr,
        frozen=fr,
        train_batches=testing.batches(data, cfg.batch_size),
        validation_batches=val,
        config=cfg,
        progress=False,
        cache=CACHE,
        **kw,
    )


def _reference_loop(params, data, trainable, hp, steps, s, v, init_trace=None):
    """Hand-written optax loop: clip + SGD momentum with the schedule's per-step lr."""
    as_jnp = jax.tree_util.tree_map(jnp.asarray, dict(params))
    tr = {k: as_jnp[k] for k in trainable}
    fr = {k: as_jnp[k] for k in params if k not in trainable}
    lrs = lr_schedule(hp, s, v)
    trace = jax.tree_util.tree_map(jnp.zeros_like, tr)
    if init_trace:
        trace = {**trace, **init_trace}
    it = testing.batches(data, 16)

    def loss_fn(t, b):
        return cross_entropy(FAM.apply({**fr, **t}, b["inputs"], hp), b["targets"][:, 0])

    @jax.jit
    def ref_step(tr, trace, b, lr):
        grads = jax.grad(loss_fn)(tr, b)
        tx = optax.chain(
            optax.clip_by_global_norm(1.0),
            optax.sgd(lr, hp["opt_momentum"], hp.get("opt_nesterov", False)),
        )
        state = (optax.EmptyState(), (optax.TraceState(trace), optax.EmptyState()))
        upd, state = tx.update(grads, state, tr)
        return optax.apply_updates(tr, upd), state[1][0].trace

    for i in range(steps):
        tr, trace = ref_step(tr, trace, next(it), lrs[i])
    return tr


def test_schedule_values():
    s, v = 10, 4
    n = s * v
    const = lr_schedule({"opt_lr": 0.2, "opt_lr_schedule": "constant"}, s, v)
    np.testing.assert_allclose(const, np.full(n, 0.1), rtol=1e-6)
    cos = lr_schedule(
        {"opt_lr": 0.2, "opt_lr_schedule": "cosine", "opt_lr_warmup_ratio": 0.1}, s, v
    )
    ref = optax.warmup_cosine_decay_schedule(0.002, 0.2, 4, n, end_value=0.0)
    for step in (0, 1, 3, 4, 5, 20, 39):
        assert cos[step] == pytest.approx(float(ref(step)), rel=1e-5, abs=1e-8), step
    assert cos[0] == pytest.approx(0.002) and cos[4] == pytest.approx(0.2)
    rst = lr_schedule(
        {"opt_lr": 0.2, "opt_lr_schedule": "restarts", "opt_lr_warmup_ratio": 0.25}, s, v
    )
    one = optax.warmup_cosine_decay_schedule(0.002, 0.2, 2, s, end_value=0.0)
    for step in (0, 1, 2, 9, 10, 12, 31, 39):
        assert rst[step] == pytest.approx(float(one(step % s)), rel=1e-5, abs=1e-8), step
    lin = lr_schedule(
        {"opt_lr": 0.2, "opt_lr_schedule": "linear", "opt_lr_warmup_ratio": 0.25}, s, v
    )
    assert lin[0] == pytest.approx(0.0002) and lin[10] == pytest.approx(0.2)
    assert lin[25] == pytest.approx(0.2 + (0.0002 - 0.2) * 15 / 30)
    with pytest.raises(optim.OptimizerError, match="opt_lr_schedule"):
        lr_schedule({"opt_lr_schedule": "step"}, s, v)


@pytest.mark.parametrize("nesterov", [False, True])
def test_runtime_optimizer_matches_optax_sgd(nesterov):
    params = {"w": jnp.arange(6.0).reshape(2, 3)}
    tx = optim.make_optimizer(clip_norm=1.0)
    state = tx.init(params)
    ref_p, p = params, params
    ref_tx = [
        optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(lr, 0.8, nesterov))
        for lr in (0.1, 0.05, 0.2)
    ]
    ref_state = ref_tx[0].init(params)
    for i, lr in enumerate((0.1, 0.05, 0.2)):
        g = {"w": jnp.sin(p["w"] * (i + 1))}
        state = optim.set_runtime_hparams(state, lr, 0.8, float(nesterov))
        upd, state = tx.update(g, state, p)
        p = optax.apply_updates(p, upd)
        g_ref = {"w": jnp.sin(ref_p["w"] * (i + 1))}
        ref_upd, ref_state = ref_tx[i].update(g_ref, ref_state, ref_p)
        ref_p = optax.apply_updates(ref_p, ref_upd)
    np.testing.assert_allclose(p["w"], ref_p["w"], rtol=1e-6)


def test_matches_hand_written_loop_and_keeps_frozen_bitwise(setup):
    params, data, val = setup
    frozen_before = np.array(params["dense_0"]["kernel"], copy=True)
    on_device = jax.tree_util.tree_map(jnp.asarray, dict(params))  # frozen may alias these
    cfg = TrainConfig(
        batch_size=16, steps_between_validations=8, num_validations=1, momentum_dtype=None
    )
    r = _train(on_device, data, val, config=cfg)
    assert r.improved and not r.failed and r.steps == 8 and r.examples_seen == 128
    assert set(r.best_trainable) == {"dense_1", "head"} and r.best_step == 8
    ref = _reference_loop(params, data, ["dense_1", "head"], HP, 8, 8, 1)
    for k in ref:
        np.testing.assert_allclose(r.best_trainable[k]["kernel"], ref[k]["kernel"], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(on_device["dense_0"]["kernel"]), frozen_before)
    # The caller's trainable arrays are never donated to the step either.
    np.testing.assert_array_equal(np.asarray(on_device["head"]["kernel"]), params["head"]["kernel"])
    assert r.trainable_params == 16 * 16 + 16 + 16 * 3 + 3
    assert set(r.timings) >= {"compile_s", "train_s", "eval_s", "data_s", "total_s"}


def test_momentum_carry_over_is_used(setup):
    params, data, val = setup
    cfg = TrainConfig(
        batch_size=16, steps_between_validations=3, num_validations=1, momentum_dtype=None
    )
    rng = np.random.default_rng(0)
    carried = {
        "head": {
            "kernel": rng.normal(size=(16, 3)).astype(np.float32),
            "bias": rng.normal(size=(3,)).astype(np.float32),
        },
        "dense_0": params["dense_0"],
    }  # frozen here: must be ignored
    r = _train(params, data, val, config=cfg, momentum=carried)
    assert r.momentum_restored == ["head"]
    ref = _reference_loop(
        params,
        data,
        ["dense_1", "head"],
        HP,
        3,
        3,
        1,
        init_trace={"head": jax.tree_util.tree_map(jnp.asarray, carried["head"])},
    )
    np.testing.assert_allclose(r.best_trainable["head"]["kernel"], ref["head"]["kernel"], atol=1e-5)
    plain = _train(params, data, val, config=cfg)
    assert not np.allclose(plain.best_trainable["head"]["kernel"], ref["head"]["kernel"], atol=1e-3)
    # The kept momentum is the trace at the snapshot, by component.
    assert set(r.best_momentum) == {"dense_1", "head"}


def test_snapshot_rule_and_baseline(setup):
    params, data, val = setup
    tied = _train(params, data, val, score_fn=lambda q: 0.5, baseline_score=0.5)
    assert tied.improved and tied.best_step == 10  # >=: ties take the latest snapshot
    assert tied.score == 0.5 and len(tied.evals) == 2
    beaten = _train(params, data, val, score_fn=lambda q: 0.5, baseline_score=0.5000001)
    assert not beaten.improved and beaten.best_trainable is None
    assert beaten.quality == max(q for _, q in beaten.evals)


def test_non_finite_loss_fails(setup):
    params, data, val = setup
    bad = {**data, "inputs": np.full_like(data["inputs"], np.nan)}
    tr, fr = split_path(params, ["head"])
    cfg = TrainConfig(batch_size=16, steps_between_validations=5, num_validations=2)
    r = train_candidate(
        family=FAM,
        hparams=HP,
        trainable=tr,
        frozen=fr,
        train_batches=testing.batches(bad, 16),
        validation_batches=val,
        config=cfg,
        progress=False,
        cache=CACHE,
    )
    assert r.failed and not r.improved and "non-finite" in r.failure_reason
    assert r.best_trainable is None and r.steps < 10


@pytest.mark.parametrize("aot", [False, True])
def test_one_compile_for_numeric_hparam_changes(setup, aot):
    params, data, val = setup
    cache = CompileCache(persistent=False, aot=aot)
    cfg = TrainConfig(batch_size=16, steps_between_validations=2, num_validations=1)
    variants = [
        {"opt_lr": 0.1, "opt_momentum": 0.9, "opt_lr_schedule": "cosine"},
        {
            "opt_lr": 0.02,
            "opt_momentum": None,
            "opt_lr_schedule": "restarts",
            "opt_nesterov": True,
            "opt_lr_warmup_ratio": 0.3,
        },
        {"opt_lr": 0.5, "opt_momentum": 0.5, "opt_lr_schedule": "constant"},
    ]
    tr, fr = split_path(params, ["head"])
    results = [
        train_candidate(
            family=FAM,
            hparams={**HP, **v},
            trainable=tr,
            frozen=fr,
            train_batches=testing.batches(data, 16),
            validation_batches=val,
            config=cfg,
            progress=False,
            cache=cache,
        )
        for v in variants
    ]
    assert cache.stats.compiles_by_kind["train"] == 1
    assert [r.num_compiles for r in results] == [2, 0, 0]  # train + eval, then none
    tr2, fr2 = split_path(params, ["dense_1", "head"])
    train_candidate(
        family=FAM,
        hparams=HP,
        trainable=tr2,
        frozen=fr2,
        train_batches=testing.batches(data, 16),
        validation_batches=val,
        config=cfg,
        progress=False,
        cache=cache,
    )
    assert cache.stats.compiles_by_kind["train"] == 2  # new trainable set, new executable


def test_bad_inputs_name_the_culprit(setup):
    params, data, val = setup
    tr, fr = split_path(params, ["head"])
    del fr["dense_1"]
    with pytest.raises(TrainError, match=r"missing components \['dense_1'\]"):
        train_candidate(
            family=FAM,
            hparams=HP,
            trainable=tr,
            frozen=fr,
            train_batches=testing.batches(data, 16),
            validation_batches=val,
            config=TrainConfig(),
            progress=False,
            cache=CACHE,
        )
    tr, fr = split_path(params, ["head"])
    short = testing.batches(data, 16, repeat=False)  # 16 batches < 2 * 10 steps
    with pytest.raises(TrainError, match="train_batches ran out after 16 of 20 steps"):
        train_candidate(
            family=FAM,
            hparams=HP,
            trainable=tr,
            frozen=fr,
            train_batches=short,
            validation_batches=val,
            progress=False,
            cache=CACHE,
            config=TrainConfig(steps_between_validations=10, num_validations=2),
        )
    with pytest.raises(Exception, match="unknown components"):
        split_path(params, ["nope"])


def test_evaluate_weights_partial_batch(setup):
    params, data, val = setup
    test = list(testing.batches(testing.synthetic_data(50, seed=3), 16, repeat=False))
    assert [len(b["inputs"]) for b in test] == [16, 16, 16, 2]
    trained = {**params, **_train(params, data, val).best_trainable}
    acc, preds = evaluate(FAM, HP, trained, test, cache=CACHE)
    logits = predict_logits(
        FAM, HP, trained, np.concatenate([b["inputs"] for b in test]), batch_size=16, cache=CACHE
    )
    labels = np.concatenate([b["targets"][:, 0] for b in test])
    assert preds.shape == (50,)
    np.testing.assert_array_equal(preds, logits.argmax(-1))
    assert acc == pytest.approx(np.mean(preds == labels))
    assert math.isfinite(acc)


def test_tensorboard_metrics_written(setup, tmp_path):
    pytest.importorskip("clu")
    params, data, val = setup
    r = _train(params, data, val, writer=str(tmp_path))
    assert r.improved
    import tensorflow as tf

    logged = []
    for f in tmp_path.rglob("events.out.tfevents*"):
        for event in tf.compat.v1.train.summary_iterator(str(f)):
            for v in event.summary.value:
                if v.tag == "validation/accuracy":
                    logged.append((event.step, float(tf.make_ndarray(v.tensor))))
    # Every validation is logged at its step with the accuracy the trainer recorded.
    expected = sorted((int(s), float(q)) for s, q in r.evals)
    assert [s for s, _ in sorted(logged)] == [s for s, _ in expected]
    assert [q for _, q in sorted(logged)] == pytest.approx([q for _, q in expected], rel=1e-6)


def test_suffix_executable_shares_one_compile_and_matches_exact_training(setup):
    """Clone sets above the same lowest component share an executable; the maths is unchanged."""
    params, data, val = setup
    base = dict(batch_size=16, steps_between_validations=4, num_validations=2, momentum_dtype=None)
    exact_cfg = TrainConfig(**base)
    suffix_cfg = TrainConfig(**base, suffix_executable=True)
    cache = CompileCache(persistent=False)

    def run(trainable, cfg, cache):
        tr, fr = split_path(params, trainable)
        return train_candidate(
            family=FAM, hparams=HP, trainable=tr, frozen=fr,
            train_batches=testing.batches(data, 16), validation_batches=val,
            config=cfg, progress=False, cache=cache,
        )  # fmt: skip

    gapped = run(["dense_0", "head"], suffix_cfg, cache)  # dense_1 frozen in between
    run(["dense_0", "dense_1", "head"], suffix_cfg, cache)
    assert cache.stats.compiles_by_kind["train"] == 1
    exact_cache = CompileCache(persistent=False)
    exact = run(["dense_0", "head"], exact_cfg, exact_cache)
    run(["dense_0", "dense_1", "head"], exact_cfg, exact_cache)
    assert exact_cache.stats.compiles_by_kind["train"] == 2

    # Only the real trainable components come back, trained as without the mask.
    assert set(gapped.best_trainable) == set(gapped.best_momentum) == {"dense_0", "head"}
    assert gapped.trainable_params == exact.trainable_params
    assert gapped.evals == pytest.approx(exact.evals, abs=1e-6)
    for name in ("dense_0", "head"):
        for leaf in ("kernel", "bias"):
            np.testing.assert_allclose(
                gapped.best_trainable[name][leaf], exact.best_trainable[name][leaf], atol=1e-5
            )
            np.testing.assert_allclose(
                gapped.best_momentum[name][leaf], exact.best_momentum[name][leaf], atol=1e-5
            )


def test_masked_step_returns_frozen_components_bit_identical(setup):
    """A masked component and its momentum come back untouched while the others train."""
    params, data, _ = setup
    tx = optim.make_optimizer(1.0, None)
    step = jax.jit(steps_lib.make_train_step(FAM, HP, tx, masked=True))
    trainable = {n: params[n] for n in ("dense_0", "dense_1", "head")}
    opt_state = tx.init(trainable)
    mask = {"dense_0": np.float32(1), "dense_1": np.float32(0), "head": np.float32(1)}
    batch = {"inputs": data["inputs"][:16], "targets": data["targets"][:16, 0]}
    hp = np.array([0.1, 0.9, 0.0], np.float32)
    for _ in range(3):
        trainable, opt_state, _ = step(trainable, opt_state, {}, batch, hp, mask)
    for leaf in ("kernel", "bias"):
        np.testing.assert_array_equal(
            np.asarray(trainable["dense_1"][leaf]), params["dense_1"][leaf]
        )
        assert not np.any(np.asarray(optim.get_momentum(opt_state)["dense_1"][leaf]))
    assert not np.array_equal(np.asarray(trainable["head"]["kernel"]), params["head"]["kernel"])
