"""Same training on 1 device and on 8 fake CPU devices."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

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
