"""The README's code examples run as written."""

import os
import re
import subprocess
import sys

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _block(marker):
    blocks = re.findall(r"```python\n(.*?)```", open(README).read(), flags=re.S)
    found = [b for b in blocks if marker in b]
    assert found, f"no README python block containing {marker!r}"
    return found[0]


def test_register_your_own_task_example(tmp_path):
    (tmp_path / "my_tasks.py").write_text(_block("# my_tasks.py"))
    code = (
        "import mu2net.tasks, my_tasks\n"
        "info = mu2net.tasks.validate_task('mu2net:my_sevens')\n"
        "print(info.num_classes, info.split_sizes['train'])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["2", "1000"]


def test_store_api_example(tmp_path):
    code = _block("Store.create").replace("/tmp/demo_store", str(tmp_path / "store"))
    code = "import mu2net.train.testing\n" + code
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) == 4 + 20


def test_plain_seqio_task_example(tmp_path):
    (tmp_path / "seqio_tasks.py").write_text(_block("# seqio_tasks.py"))
    assert "mu2net" not in _block("# seqio_tasks.py").split("\n", 1)[1]  # seqio alone
    code = (
        "import numpy as np, mu2net.tasks as T, seqio_tasks\n"
        "info = T.validate_task('my:digit_parity')\n"
        "name, fn = T.primary_metric('my:digit_parity')\n"
        "print(info.num_classes, info.split_sizes['test'], name,"
        " fn(np.array([0, 0, 0, 1]), np.array([0, 0, 0, 0])))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-4:] == ["2", "397", "balanced_accuracy", "0.5"]
