"""From the repository root, ``import gin`` is gin-config, never the repo's ``gin/`` configs."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = (
    "import gin, sys; from mu2net import gin_utils; "
    "assert hasattr(gin, 'configurable'), gin.__path__; "
    "print(gin.__file__); print(gin_utils.package_gin_dir())"
)


def test_repo_root_imports_gin_config_without_path_surgery():
    # `python -c` and `python -m` both put the working directory first on sys.path.
    for argv in ([sys.executable, "-c", CHECK], [sys.executable, "-m", "mu2net.cli", "--help"]):
        res = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
    res_lines = subprocess.run(
        [sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True, timeout=300
    ).stdout.split()
    gin_file, gin_dir = res_lines
    assert not gin_file.startswith(os.path.join(ROOT, "gin")), res_lines
    assert os.path.isfile(os.path.join(gin_dir, "runs", "evolve.gin"))
    assert not os.path.exists(os.path.join(ROOT, "gin", "__init__.py"))  # the whole trick
    source = open(os.path.join(ROOT, "mu2net", "train", "_gin.py")).read()
    assert not re.search(r"^\s*(import|from) (sys|importlib)\b", source, re.M)  # no surgery


def test_pytest_from_repo_root_sees_gin_config(tmp_path):
    test = tmp_path / "test_probe.py"
    test.write_text("import gin\n\ndef test_gin():\n    assert hasattr(gin, 'parse_config')\n")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "--rootdir", ROOT, str(test)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
