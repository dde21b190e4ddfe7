"""The `mu2net train` gin binary: good runs write their outputs, bad input fails clearly."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mu2net.train import main as train_main
from mu2net.train import testing

_MLP = [
    "--gin.FAMILY='test_mlp'",
    "--gin.train_path.data_provider=@synthetic_task_data",
    "--gin.train_path.progress=False",
    "--gin.TrainConfig.batch_size=16",
    "--gin.TrainConfig.steps_between_validations=4",
    "--gin.TrainConfig.num_validations=2",
    "--gin.TrainConfig.momentum_dtype=None",
]


def _run(argv, capsys):
    code = train_main.main(argv)
    return code, capsys.readouterr()


def test_trains_and_writes_outputs(tmp_path, capsys):
    out = tmp_path / "run"
    code, io = _run(
        [
            *_MLP,
            "--gin.TASK='toy'",
            f"--gin.MODEL_DIR='{out}'",
            "--gin.train_path.frozen_components=['dense_0']",
            "--gin.train_path.logdir=''",
        ],
        capsys,
    )
    assert code == 0, io.err
    result = json.loads((out / "result.json").read_text())
    assert result["improved"] and result["trainable"] == ["dense_1", "head"]
    assert result["frozen"] == ["dense_0"] and 0.0 <= result["test_accuracy"] <= 1.0
    assert result["steps"] == 8 and result["hparams"]["num_classes"] == 3
    operative = (out / "operative_config.gin").read_text()
    assert "TrainConfig.batch_size = 16" in operative and "train_path.task = %TASK" in operative
    from safetensors.numpy import load_file

    params = load_file(str(out / "params.safetensors"))
    assert set(params) == {
        f"{c}/{leaf}" for c in ("dense_0", "dense_1", "head") for leaf in ("kernel", "bias")
    }
    root = testing.FAMILY.load_pretrained(testing.FAMILY.default_hparams())
    np.testing.assert_array_equal(params["dense_0/kernel"], np.asarray(root["dense_0"]["kernel"]))
    assert not np.array_equal(params["head/kernel"], np.asarray(root["head"]["kernel"]))


def test_missing_required_macros_are_named(capsys):
    code, io = _run(["--gin.FAMILY='test_mlp'"], capsys)
    assert code == 2
    assert "required gin macro(s) not set: ['TASK', 'MODEL_DIR']" in io.err


def test_unknown_gin_key_is_named(tmp_path, capsys):
    code, io = _run(
        [
            *_MLP,
            "--gin.TASK='toy'",
            f"--gin.MODEL_DIR='{tmp_path}'",
            "--gin.TrainConfig.bacth_size=8",
        ],
        capsys,
    )
    assert code == 2 and "bacth_size" in io.err and "TrainConfig" in io.err
    code, io = _run(
        [*_MLP, "--gin.TASK='toy'", f"--gin.MODEL_DIR='{tmp_path}'", "--gin.NoSuchThing.x=1"],
        capsys,
    )
    assert code == 2 and "NoSuchThing" in io.err
    code, io = _run(["--gin_file=models/nope.gin"], capsys)
    assert code == 2 and "models/nope.gin" in io.err


def test_bad_path_and_data_inputs_are_named(tmp_path, capsys):
    base = [*_MLP, "--gin.TASK='toy'", f"--gin.MODEL_DIR='{tmp_path}'"]
    code, io = _run([*base, "--gin.train_path.frozen_components=['dense_9']"], capsys)
    assert code == 2 and "dense_9" in io.err and "frozen_components" in io.err
    code, io = _run([*base, "--gin.TrainConfig.batch_size=512"], capsys)
    assert code == 2 and "TrainConfig.batch_size=512" in io.err and "256 examples" in io.err
    code, io = _run([*base, "--gin.synthetic_task_data.validation_examples=0"], capsys)
    assert code == 2 and "no validation examples" in io.err
    code, io = _run([*base, "--gin.FAMILY='vitt'"], capsys)
    assert code == 2 and "unknown model family 'vitt'" in io.err


def test_model_gin_files_parse_from_the_package():
    # Every shipped model file parses (found via mu2net.gin, no source checkout needed).
    from mu2net.gin_utils import package_gin_dir

    models = sorted(os.listdir(os.path.join(package_gin_dir(), "models")))
    assert {"vit_test.gin", "vit_ti16.gin", "efficientnet_lite0.gin", "bert_minilm.gin"} <= set(
        models
    )
    from mu2net.train._gin import gin

    for name in ("vit_test.gin", "vit_ti16.gin", "efficientnet_lite0.gin", "bert_minilm.gin"):
        gin.clear_config()
        gin.parse_config_files_and_bindings(
            [
                os.path.join(package_gin_dir(), "runs", "train.gin"),
                os.path.join(package_gin_dir(), "models", name),
            ],
            [],
            finalize_config=False,
        )
        assert gin.query_parameter("%FAMILY") in ("vit", "efficientnet_lite0", "bert")
    gin.clear_config()


def test_module_entry_point_runs_from_repo_root(tmp_path):
    # `python -m` puts the working directory first on sys.path; the repo's gin/ config folder
    # must not shadow gin-config.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-m", "mu2net.train.main", "--gin.FAMILY='x'"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "['TASK', 'MODEL_DIR']" in proc.stderr


@pytest.mark.slow
def test_real_task_glue(tmp_path, capsys):
    pytest.importorskip("mu2net.tasks.data")
    out = tmp_path / "digits"
    code, io = _run(
        [
            "--gin.FAMILY='test_mlp'",
            "--gin.TASK='mu2net:digits'",
            f"--gin.MODEL_DIR='{out}'",
            "--gin.train_path.hparams={'ds_image_size': 4, 'hidden_dim': 16, 'opt_lr': 0.1}",
            "--gin.train_path.progress=False",
            "--gin.train_path.logdir=''",
            "--gin.TrainConfig.batch_size=32",
            "--gin.TrainConfig.steps_between_validations=30",
            "--gin.TrainConfig.num_validations=2",
            "--gin.seqio_task_data.validation_examples=64",
        ],
        capsys,
    )
    assert code == 0, io.err
    result = json.loads((out / "result.json").read_text())
    assert result["hparams"]["num_classes"] == 10
    # Trained on the real task: above chance (0.1) on its test split (deterministic: 0.2).
    assert result["test_accuracy"] > 0.15, result


def test_includes_resolve_beside_a_runs_folder(tmp_path, monkeypatch):
    # `mu2net demo` leaves runs/demo/ in the working directory; gin must still find the
    # shipped runs/evolve.gin instead of crashing on the namespace package `runs`.
    import argparse
    import importlib

    import mu2net.evolution.config  # noqa: F401  (registers EvolutionConfig)
    from mu2net.gin_utils import parse_gin
    from mu2net.train._gin import gin

    (tmp_path / "runs" / "demo").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert importlib.util.find_spec("runs").origin is None  # the case gin-config trips on
    gin.clear_config()
    args = argparse.Namespace(
        gin_file=["experiments/vit_ti0_quick.gin"], gin_bindings=[], gin_search_paths=""
    )
    try:
        parse_gin(args, finalize=False)
        assert gin.query_parameter("EvolutionConfig.family") == "vit"
    finally:
        gin.clear_config()
