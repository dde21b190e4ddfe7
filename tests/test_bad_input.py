"""Bad-input catalogue: every case gives a clear error naming the culprit and loses nothing.

One parametrized test over a small committed store (a ``test_mlp`` root and one task whose
shard holds two commits). Each case breaks one thing -- a store file, a name, a gin binding, a
task's data, an inference batch, the disk -- runs the operation a user would run, and checks
(1) the exception type and that its message names the culprit file/key/task/field, and (2) that
the last published state is intact: either the store reloads equal to before (params digests,
path records, live mixture), or, where the case damaged a store file itself, the failing
operation wrote nothing and the previous committed state still loads unchanged.
"""

import errno
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import seqio
import tensorflow as tf

from mu2net.evolution import main as evolve_main
from mu2net.evolution.live import add_tasks_to_store
from mu2net.serve import TaskPredictor
from mu2net.system.names import NameError_
from mu2net.system.state import Path, System
from mu2net.system.store import Store, StoreError
from mu2net.tasks.registry import SPLITS, TaskError, register_classification_task, unregister
from mu2net.train._gin import gin
from mu2net.train.testing import FAMILY as MLP

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_GIN = str(REPO / "tests" / "data" / "tiny_vit.gin")
TASK = "t:good"


def _faults():
    spec = importlib.util.spec_from_file_location("mu2net_faults", REPO / "benchmarks/faults.py")
    mod = sys.modules.get(spec.name)
    if mod is None:
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    return mod


observe = _faults().observe


def _state(url, **kw):
    """The published state, comparable across loads (no counts of files read)."""
    if kw:
        system = Store.open(url).load(**kw)
        return {
            "tasks": list(system.tasks),
            "paths": json.loads(json.dumps({pid: p.to_json() for pid, p in system.paths.items()})),
            "digests": {c: _faults().params_digest(x.params) for c, x in system.components.items()},
        }
    obs = observe(url)
    return {k: obs[k] for k in ("tasks", "paths", "digests")}


def _files(root):
    out = {}
    for p in sorted(pathlib.Path(root).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


# ------------------------------------------------------------------------------ fixtures
HP = {**MLP.default_hparams(), "ds_image_size": 4, "num_classes": 2}


def _mlp_path(system, parent, seed):
    params = jax.device_get(MLP.init(jax.random.PRNGKey(seed), HP))
    root = system.best_path(parent) if parent != "root" else system.roots()[0]
    comps = dict(root.components)
    for name in ("dense_1", "head"):
        comps[name] = system.new_component(name, MLP.name, params[name], "good").id
    path = Path(system.new_id("good", "p"), TASK, MLP.name, comps, dict(HP), "good",
                parent=root.id, metrics={"quality": 0.5 + seed / 10})  # fmt: skip
    system.publish(path)
    return path


@pytest.fixture
def base(tmp_path):
    """A store: root (shard root~mlp), task t:good (shard good) with two commits."""
    url = str(tmp_path / "store")
    store = Store.create(url, "bad_input")
    s = System()
    s.add_root("root:test_mlp", MLP.name, jax.device_get(MLP.init(jax.random.PRNGKey(0), HP)),
               HP, "root~test_mlp")  # fmt: skip
    store.commit(s, "root~test_mlp")
    s.add_task(TASK, "good")
    _mlp_path(s, "root", 1)
    store.commit(s, "good")
    first = _state(url)
    s.unlock_task(TASK, "good")
    _mlp_path(s, TASK, 2)
    store.commit(s, "good")
    return {"url": url, "root": url, "first": first, "system": s}


@pytest.fixture(autouse=True)
def _clean_gin():
    yield
    gin.clear_config()  # also unlocks a config a binary finalized


BAD_TASKS = {
    "mu2net:bad_nan": ("validation", "nan"),
    "mu2net:bad_inf": ("train", "inf"),
    "mu2net:bad_label_high": ("test", "label_high"),
    "mu2net:bad_label_negative": ("train", "label_negative"),
    "mu2net:bad_empty_split": ("validation", "empty"),
}


@pytest.fixture(scope="module")
def bad_tasks():
    """Small seqio tasks whose data breaks one rule in one split."""
    rng = np.random.default_rng(0)
    for name, (bad_split, kind) in BAD_TASKS.items():
        data = {}
        for split in SPLITS:
            x = rng.random((6, 5, 5, 3), dtype=np.float32)
            y = (np.arange(6) % 2).astype(np.int32)[:, None]
            if split == bad_split:
                if kind in ("nan", "inf"):
                    x[3, 2, 2, 1] = np.nan if kind == "nan" else np.inf
                elif kind == "label_high":
                    y[4, 0] = 2
                elif kind == "label_negative":
                    y[1, 0] = -1
                else:
                    x, y = x[:0], y[:0]
            data[split] = (x, y)

        def fn(split, shuffle_files=False, seed=None, data=data):
            x, y = data[split]
            return tf.data.Dataset.from_tensor_slices({"inputs": x, "targets": y})

        register_classification_task(
            name, seqio.FunctionDataSource(fn, splits=SPLITS), [seqio.CacheDatasetPlaceholder()],
            num_classes=2,
        )  # fmt: skip
    yield
    for name in BAD_TASKS:
        unregister(name)


# ------------------------------------------------------------------------------ the cases
def _shard_file(b, pattern):
    d = pathlib.Path(b["root"]) / "shards" / "good"
    return sorted(d.rglob(pattern))[-1]


def _head_file(b):
    body = json.loads(_shard_file(b, "manifest-*.json").read_text())["body"]
    head = b["system"].best_path(TASK).components["head"]
    return pathlib.Path(b["root"]) / "shards" / "good" / body["components"][head]["file"]


def _predict(b):
    return TaskPredictor.load(b["url"], TASK).predict(TASK, np.zeros((2, 4, 4, 3), np.float32))


def _evolve(b, *extra):
    # The store's family: evolve would otherwise (rightly) add a ViT root before failing.
    code = evolve_main.main(
        [
            f"--gin_file={TINY_GIN}",
            f"--store={b['url']}",
            "--no_progress",
            "--logdir=",
            "--gin.EvolutionConfig.family='test_mlp'",
            "--gin.EvolutionConfig.root_hparams={'ds_image_size': 4}",
            *extra,
        ]
    )
    if code != 0:
        raise SystemExit(code)


def corrupt_params(b):
    f = _head_file(b)
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    return lambda: _predict(b), StoreError, [f.name, "checksum mismatch"], "files"


def missing_params(b):
    f = _head_file(b)
    f.unlink()
    return lambda: _predict(b), StoreError, [f.name, "missing"], "files"


def truncated_manifest(b):
    f = _shard_file(b, "manifest-*.json")
    f.write_bytes(f.read_bytes()[:200])
    return lambda: _evolve(b), SystemExit, [f.name, "truncated"], "previous"


def unknown_version(b):
    f = _shard_file(b, "manifest-*.json")
    doc = json.loads(f.read_text())
    doc["version"] = 99
    f.write_text(json.dumps(doc))
    return lambda: _evolve(b), SystemExit, [f.name, "version 99"], "previous"


def dangling_component(b):
    s = b["system"]
    path = s.best_path(TASK)
    ghost = Path("good/p77", TASK, MLP.name, {**path.components, "head": "good/c999"}, dict(HP),
                 "good", parent=path.id)  # fmt: skip
    s.components["good/c999"] = s.component(path.components["head"])  # only in memory
    s.paths[ghost.id] = ghost
    s.paths.pop(path.id)
    body = json.loads(_shard_file(b, "manifest-*.json").read_text())["body"]
    store = Store.open(b["url"])
    body.update(seq=2, paths=[ghost.to_json()])
    doc = {"format": "mu2net-store", "version": 1, "body": body}
    from mu2net.system.store import _canonical, _sha256

    doc["sha256"] = _sha256(_canonical(body))
    store._put(store._manifest_path("good", 2), json.dumps(doc).encode())
    return lambda: Store.open(b["url"]).load(), StoreError, ["good/c999", TASK], "files"


def bad_name(name, validate):
    def case(b):
        store = Store.open(b["url"])
        exc = TaskError if validate else NameError_
        return (
            lambda: add_tasks_to_store(store, [name], validate=validate),
            exc,
            [repr(name)],
            "state",
        )

    return case


def evolve_bad_task_name(b):
    return lambda: _evolve(b, "--add_tasks=mu2net:a/b"), SystemExit, [], "state"


def gin_unknown_key_binary(b):
    def op():
        r = subprocess.run(
            [sys.executable, "-m", "mu2net.evolution.main", f"--gin_file={TINY_GIN}",
             f"--store={b['url']}", "--gin.EvolutionConfig.no_such_key=3"],
            cwd=REPO, capture_output=True, text=True,
            env={**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"},
        )  # fmt: skip
        raise RuntimeError(f"exit code {r.returncode}: {r.stderr[-2000:]}")

    return op, RuntimeError, ["exit code 1", "no_such_key"], "state"


def gin_unknown_configurable(b):
    return lambda: _evolve(b, "--gin.NoSuchThing.x=1"), SystemExit, [], "state"


def bad_data(task, words):
    def case(b):
        store = Store.open(b["url"])
        return lambda: add_tasks_to_store(store, [task]), TaskError, [task, *words], "state"

    return case


def predict_input(kind):
    def case(b):
        x = {
            "oversized": np.zeros((2, 64, 64, 3), np.float32),
            "dtype": np.zeros((2, 4, 4, 3), np.int32),
            "nan": np.full((2, 4, 4, 3), np.nan, np.float32),
        }[kind]
        words = {"oversized": ["(64, 64, 3)", "(4, 4, 3)"], "dtype": ["int32"], "nan": ["NaN"]}
        return (lambda: TaskPredictor.load(b["url"], TASK).predict(TASK, x), ValueError,
                [TASK, *words[kind]], "state")  # fmt: skip

    return case


def disk_full(which):
    def case(b, monkeypatch=None):
        s = b["system"]
        s.unlock_task(TASK, "good")
        _mlp_path(s, TASK, 3)
        store = Store.open(b["url"])
        real = Store._put
        hit = []

        def failing_put(self, path, data):
            if which in path and not hit:
                hit.append(path)
                with open(f"{path}.tmp-full", "wb") as f:  # a partial temp file, never published
                    f.write(data[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device", path)
            return real(self, path, data)

        def op():
            Store._put = failing_put
            try:
                store.commit(s, "good", history=[{"event": "x"}])
            finally:
                Store._put = real

        pattern = {"params/": "safetensors", "history-": "history-", "manifest-": "manifest-"}
        return op, OSError, ["No space left", pattern[which]], "state+retry"

    return case


CASES = {
    "corrupt_params_file": corrupt_params,
    "missing_params_file": missing_params,
    "truncated_manifest": truncated_manifest,
    "manifest_unknown_version": unknown_version,
    "component_referenced_but_missing": dangling_component,
    "task_name_slash": bad_name("mu2net:a/b", False),
    "task_name_dotdot": bad_name("mu2net:..", False),
    "task_name_nul": bad_name("mu2net:t\x00", False),
    "task_name_newline": bad_name("t\nx", False),
    "task_name_backslash_validated": bad_name("mu2net:a\\b", True),
    "evolve_add_task_bad_name": evolve_bad_task_name,
    "gin_unknown_key_binary": gin_unknown_key_binary,
    "gin_unknown_configurable": gin_unknown_configurable,
    "data_nan": bad_data("mu2net:bad_nan", ["validation", "inputs", "NaN"]),
    "data_inf": bad_data("mu2net:bad_inf", ["train", "inputs", "inf"]),
    "data_label_too_high": bad_data("mu2net:bad_label_high", ["test", "targets", "label 2"]),
    "data_label_negative": bad_data("mu2net:bad_label_negative", ["train", "targets", "-1"]),
    "data_empty_split": bad_data("mu2net:bad_empty_split", ["validation", "empty split"]),
    "predict_oversized_image": predict_input("oversized"),
    "predict_wrong_dtype": predict_input("dtype"),
    "predict_nan_inputs": predict_input("nan"),
    "disk_full_params": disk_full("params/"),
    "disk_full_history": disk_full("history-"),
    "disk_full_manifest": disk_full("manifest-"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(case, base, bad_tasks, capsys):
    url = base["url"]
    before = _state(url)
    op, exc, words, mode = CASES[case](base)
    files_before = _files(base["root"])
    with pytest.raises(exc) as info:
        op()
    message = str(info.value) + capsys.readouterr().err
    if exc is SystemExit:
        assert info.value.code == 1, message
        words = words or {"evolve_add_task_bad_name": ["mu2net:a/b"],
                          "gin_unknown_configurable": ["NoSuchThing"]}[case]  # fmt: skip
    for w in words:
        assert w in message, f"{case}: {w!r} not in error: {message}"
    if mode.startswith("state"):
        assert _state(url) == before, f"{case}: published state changed"
    if mode == "files":
        assert _files(base["root"]) == files_before, f"{case}: the failing operation wrote"
    if mode == "previous":
        assert _files(base["root"]) == files_before, f"{case}: the failing operation wrote"
        with pytest.warns(UserWarning, match=re.escape(words[0])):
            assert _state(url, on_corrupt="previous") == base["first"]
    if mode == "state+retry":  # the disk has room again: the same commit now goes through
        Store.open(url).commit(base["system"], "good")
        after = _state(url)
        assert set(after["paths"]) - set(before["paths"]) == {base["system"].best_path(TASK).id}


# ------------------------------------------------------------------------------ no code from data
SOURCE_DIRS = ("mu2net", "tasks", "mixtures", "evolution")
# The only unpicklers allowed: closed find_class allowlists for formats we do not control.
RESTRICTED_UNPICKLERS = {"mu2net/models/torch_legacy.py", "tasks/bundled.py"}
_UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "joblib",
                   "shelve", "torch"}  # fmt: skip
_UNSAFE_FUNCS = {"load", "loads", "open", "Unpickler", "read_pickle"}


def unsafe_loads(source: str, rel: str) -> list[str]:
    """Calls that can execute code from data: pickle-family loads, np.load(allow_pickle=True),
    yaml.load without a safe loader, and Unpickler subclasses without ``find_class``."""
    import ast

    tree = ast.parse(source)
    bad = []
    allowed = rel in RESTRICTED_UNPICKLERS

    def dotted(node):
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name):
            parts.append(node.id)
        return ".".join(reversed(parts))

    for node in ast.walk(tree):
        where = f"{rel}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ImportFrom) and node.module in _UNSAFE_MODULES:
            names = {a.name for a in node.names} & _UNSAFE_FUNCS
            if names:
                bad.append(f"{where}: from {node.module} import {sorted(names)}")
        if isinstance(node, ast.Call):
            name = dotted(node.func)
            mod, _, func = name.rpartition(".")
            kw = {k.arg: k.value for k in node.keywords}
            if mod.split(".")[-1] in _UNSAFE_MODULES and func in _UNSAFE_FUNCS - {"Unpickler"}:
                bad.append(f"{where}: {name}(...)")
            if mod.split(".")[-1] in ("pickle", "_pickle") and func == "Unpickler" and not allowed:
                bad.append(f"{where}: {name}(...) outside the restricted readers")
            if func == "load" and mod in ("np", "numpy") and "allow_pickle" in kw:
                v = kw["allow_pickle"]
                if not (isinstance(v, ast.Constant) and v.value is False):
                    bad.append(f"{where}: {name}(..., allow_pickle=...) not literally False")
            if func == "load" and mod == "yaml" and "Safe" not in ast.dump(node):
                bad.append(f"{where}: yaml.load without a safe loader")
            if func in ("read_pickle",):
                bad.append(f"{where}: {name}(...)")
        if isinstance(node, ast.ClassDef):
            bases = [dotted(b) for b in node.bases]
            if any(b.endswith("Unpickler") for b in bases):
                methods = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
                if not allowed:
                    bad.append(f"{where}: Unpickler subclass {node.name} outside the allowlist")
                elif "find_class" not in methods:
                    bad.append(f"{where}: Unpickler subclass {node.name} without find_class")
    return bad


def test_unsafe_load_checker_catches_violations():
    snippet = (
        "import pickle, numpy as np, yaml\n"
        "from pickle import loads\n"
        "pickle.load(open('x', 'rb'))\n"
        "np.load('a.npy', allow_pickle=True)\n"
        "yaml.load(s)\n"
        "class U(pickle.Unpickler):\n    pass\n"
        "np.load('ok.npy', allow_pickle=False)\n"
    )
    found = unsafe_loads(snippet, "mu2net/x.py")
    assert len(found) == 5, found
    assert all("x.py:" in f for f in found)


def test_loading_never_executes_code_from_data():
    bad, checked = [], 0
    for d in SOURCE_DIRS:
        for f in sorted((REPO / d).rglob("*.py")):
            rel = str(f.relative_to(REPO))
            bad += unsafe_loads(f.read_text(), rel)
            checked += 1
    assert checked > 30
    assert not bad, "code that can unpickle untrusted data:\n" + "\n".join(bad)
