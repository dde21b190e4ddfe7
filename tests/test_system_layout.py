"""The store's layout module and the one-way arrows among the store's modules."""

import ast
import os
import re

import pytest

from mu2net.system import Store, layout
from mu2net.system.state import System

SYSTEM = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mu2net", "system"
)
MINE = ["names", "layout", "documents", "records", "lease", "task_index", "store", "verify"]


def _imports(module):
    """mu2net.system modules ``module`` imports anywhere (deferred imports included)."""
    tree = ast.parse(open(os.path.join(SYSTEM, f"{module}.py")).read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "mu2net.system":
                out |= {a.name for a in node.names}
            elif node.module.startswith("mu2net.system."):
                out.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[2] for a in node.names if a.name.startswith("mu2net.system.")}
    return out & set(MINE)


def test_store_modules_form_no_cycle():
    graph = {m: _imports(m) for m in MINE}
    order = []
    seen = set()

    def visit(m, stack):
        assert m not in stack, f"import cycle: {' -> '.join([*stack, m])}"
        if m in seen:
            return
        for dep in graph[m]:
            visit(dep, (*stack, m))
        seen.add(m)
        order.append(m)

    for m in MINE:
        visit(m, ())
    assert "store" not in graph["task_index"] | graph["lease"] | graph["records"]
    assert order.index("store") > order.index("task_index")


@pytest.mark.parametrize("module", ["task_index", "lease", "verify"])
def test_no_private_store_names_across_modules(module):
    text = open(os.path.join(SYSTEM, f"{module}.py")).read()
    assert not re.findall(r"store\._[a-z]", text), module
    assert "_MANIFEST_RE" not in text


def test_layout_names_match_their_patterns():
    assert layout.MANIFEST_RE.match(os.path.basename(layout.manifest_path("a", 3)))
    assert layout.HISTORY_RE.match(layout.history_name(3))
    assert layout.COMPONENT_RE.match(layout.component_name("a/c7"))
    assert layout.INDEXED_RE.match(os.path.basename(layout.indexed_marker("a", 3)))
    assert layout.INDEX_RE.match(os.path.basename(layout.index_path("t:x", "a", 3)))
    assert layout.LEASE_RE.match(os.path.basename(layout.lease_path("a", 3)))
    assert layout.VERIFY_RE.match(os.path.basename(layout.verify_record()))
    assert layout.is_tmp(layout.tmp_name("x/manifest-00000001.json"))
    assert layout.ID_RE.match("t~a/c12") and not layout.ID_RE.match("t~a/c\u00e9")


def test_store_written_by_the_previous_version_still_loads(tmp_path):
    """A store laid out by the code before the layout module (names copied from it)."""
    import json

    import numpy as np

    from mu2net.system.documents import canonical, sha256
    from mu2net.system.store import encode_component

    root = tmp_path / "old"
    (root / "shards" / "root" / "params").mkdir(parents=True)
    marker = {"format": "mu2net-store", "version": 1, "system": "old", "created": 1.0}
    (root / "mu2net-store.json").write_text(json.dumps(marker, indent=1))
    params = {"kernel": np.arange(4, dtype=np.float32)}
    data = encode_component(params)
    (root / "shards/root/params/c0-0123abcd.safetensors").write_bytes(data)
    s = System()
    r = s.add_root("root:toy", "toy", {"w": params}, {}, "root")
    cid = r.components["w"]
    rec = {"name": "w", "family": "toy", "signature": s.components[cid].signature,
           "num_params": 4, "lineage": None, "file": "params/c0-0123abcd.safetensors",
           "sha256": sha256(data), "bytes": len(data), "seq": 0}  # fmt: skip
    body = {"agent": "root", "seq": 0, "created": 1.0, "note": "root",
            "components": {cid: rec}, "paths": [r.to_json()], "tasks": [],
            "counters": {"root:c": 1, "root:p": 1}, "history_files": []}  # fmt: skip
    doc = {"format": "mu2net-store", "version": 1, "sha256": sha256(canonical(body)), "body": body}
    (root / "shards/root/manifest-00000000.json").write_text(json.dumps(doc, indent=1))
    loaded = Store.open(str(root)).load(lazy=False)
    assert loaded.roots()[0].to_json() == r.to_json()
    np.testing.assert_array_equal(loaded.components[cid].params["kernel"], params["kernel"])
