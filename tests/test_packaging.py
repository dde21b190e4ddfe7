"""A regular wheel carries the whole `mu2net` namespace and the gin configs."""

import os
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_imports_all_rooms_and_ships_gin_files(tmp_path):
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            ROOT,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").iterdir()
    names = zipfile.ZipFile(wheel).namelist()
    for expected in [
        "mu2net/gin/experiments/default.gin",
        "mu2net/gin/runs/evolve.gin",
        "mu2net/gin/runs/train.gin",
        "mu2net/evolution/loop.py",
        "mu2net/tasks/data.py",
        "mu2net/mixtures/live.py",
        "mu2net/cli.py",
    ]:
        assert expected in names, expected
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/"))]
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import importlib.util, os\n"
        "import mu2net, mu2net.gin_utils as g\n"
        "for m in ['mu2net', 'mu2net.evolution.loop', 'mu2net.tasks', 'mu2net.mixtures']:\n"
        "    origin = importlib.util.find_spec(m).origin\n"
        "    assert origin.startswith(os.environ['SITE']), origin\n"
        "assert os.path.isfile(os.path.join(g.package_gin_dir(), 'experiments', 'default.gin'))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(site), SITE=str(site), JAX_PLATFORMS="cpu")
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
