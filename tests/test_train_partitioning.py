"""Same training on 1 device and on 8 fake CPU devices; population mode vs sequential runs."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mu2net.train import (
    CompileCache,
    TrainConfig,
    split_path,
    testing,
    train_candidate,
    train_population,
)

_SCRIPT = textwrap.dedent(
    """
    import json, jax, numpy as np
    from mu2net.train import Partitioner, TrainConfig, make_mesh, split_path, train_candidate
    from mu2net.train import testing
    assert len(jax.devices()) == 8, jax.devices()
    fam = testing.FAMILY
    hp = {**fam.default_hparams(), "opt_lr": 0.1}
    params = jax.tree_util.tree_map(np.asarray, fam.init(jax.random.PRNGKey(0), hp))
    data = testing.synthetic_data(128)
    val = list(testing.batches(testing.synthetic_data(44, seed=1), 16, repeat=False))
    tr, fr = split_path(params, ["dense_1", "head"])
    cfg = TrainConfig(batch_size=16, steps_between_validations=4, num_validations=2,
                      momentum_dtype=None)
    meshes = {
        "1": Partitioner(make_mesh(devices=jax.devices()[:1])),
        "8": Partitioner(make_mesh()),
        "4x2": Partitioner(make_mesh(4, 2), min_shard_size=1),
    }
    out = {}
    for name, part in meshes.items():
        r = train_candidate(family=fam, hparams=hp, trainable=tr, frozen=fr,
                            train_batches=testing.batches(data, 16), validation_batches=val,
                            config=cfg, progress=False, partitioner=part)
        out[name] = {"evals": r.evals, "params": jax.tree_util.tree_map(
            lambda x: np.asarray(x).tolist(), r.best_trainable)}
    sh = meshes["4x2"].leaf_sharding((16, 16)).spec
    out["model_spec"] = str(sh)
    print("RESULT" + json.dumps(out))
    """
)


def test_one_vs_eight_devices_same_result(tmp_path):
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        "MU2NET_JAX_CACHE_DIR": "",
    }
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    out = json.loads(line[len("RESULT") :])
    assert "model" in out["model_spec"]  # the 4x2 mesh really shards a kernel
    ref = out["1"]
    for name in ("8", "4x2"):
        assert [q for _, q in out[name]["evals"]] == [q for _, q in ref["evals"]]
        for comp in ("dense_1", "head"):
            for leaf in ("kernel", "bias"):
                np.testing.assert_allclose(
                    out[name]["params"][comp][leaf], ref["params"][comp][leaf], atol=1e-5
                )


def test_population_matches_sequential_runs():
    fam = testing.FAMILY
    base = fam.default_hparams()
    params = {
        k: {n: np.asarray(x) for n, x in v.items()}
        for k, v in fam.init(__import__("jax").random.PRNGKey(0), base).items()
    }
    data = testing.synthetic_data(128)
    val = list(testing.batches(testing.synthetic_data(40, seed=1), 16, repeat=False))
    cfg = TrainConfig(
        batch_size=16, steps_between_validations=3, num_validations=2, momentum_dtype=None
    )
    hps = [
        {**base, "opt_lr": 0.1, "opt_momentum": 0.9},
        {**base, "opt_lr": 0.03, "opt_momentum": None, "opt_lr_schedule": "restarts"},
        {
            **base,
            "opt_lr": 0.2,
            "opt_momentum": 0.5,
            "opt_nesterov": True,
            "opt_lr_schedule": "constant",
        },
        {**base, "opt_lr": 0.1},
    ]
    tr, fr = split_path(params, ["dense_1", "head"])
    nan_momentum = {
        "head": {"kernel": np.full((16, 3), np.nan, np.float32), "bias": np.zeros(3, np.float32)}
    }
    momenta = [
        None,
        {"head": {"kernel": np.ones((16, 3), np.float32), "bias": np.ones(3, np.float32)}},
        None,
        nan_momentum,
    ]
    cache = CompileCache(persistent=False)
    pop = train_population(
        family=fam,
        hparams_list=hps,
        trainable_list=[tr] * 4,
        frozen=fr,
        momentum_list=momenta,
        train_batches=testing.batches(data, 16),
        validation_batches=val,
        config=cfg,
        progress=False,
        cache=cache,
        baseline_scores=[None, None, 2.0, None],
    )
    assert cache.stats.compiles_by_kind["population_train"] == 1
    assert pop[3].failed and not pop[3].improved and "non-finite" in pop[3].failure_reason
    assert not pop[2].improved and pop[2].quality is not None  # baseline 2.0 is unbeatable
    for i in range(2):
        seq = train_candidate(
            family=fam,
            hparams=hps[i],
            trainable=tr,
            frozen=fr,
            momentum=momenta[i],
            train_batches=testing.batches(data, 16),
            validation_batches=val,
            config=cfg,
            progress=False,
            cache=cache,
        )
        assert pop[i].improved and seq.improved
        assert pop[i].momentum_restored == seq.momentum_restored
        np.testing.assert_allclose([q for _, q in pop[i].evals], [q for _, q in seq.evals])
        for comp in ("dense_1", "head"):
            np.testing.assert_allclose(
                pop[i].best_trainable[comp]["kernel"], seq.best_trainable[comp]["kernel"], atol=1e-5
            )
            np.testing.assert_allclose(
                pop[i].best_momentum[comp]["kernel"], seq.best_momentum[comp]["kernel"], atol=1e-5
            )


def test_population_rejects_mixed_architectures():
    fam = testing.FAMILY
    base = fam.default_hparams()
    import jax

    p1 = fam.init(jax.random.PRNGKey(0), base)
    p2 = fam.init(jax.random.PRNGKey(0), {**base, "num_classes": 5})
    with pytest.raises(ValueError, match="share architecture"):
        train_population(
            family=fam,
            hparams_list=[base, {**base, "num_classes": 5}],
            trainable_list=[{"head": p1["head"]}, {"head": p2["head"]}],
            frozen=[{k: p1[k] for k in ("dense_0", "dense_1")}] * 2,
            train_batches=iter([]),
            validation_batches=[],
            config=TrainConfig(),
            progress=False,
        )
