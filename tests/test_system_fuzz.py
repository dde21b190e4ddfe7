"""Fuzzed store readers: mutate real store files, every load is right or a named mu2net error.

One store is built once (on ``memory://``, so a case costs a few dict writes): a toy root and
three task paths in four shards, then a second commit of ``t:a``'s shard (so it has a previous
state), with a history file, task indexes and markers. Each hypothesis case mutates one file --
bit flips, truncation, appended or spliced bytes, reordered or duplicated JSON keys, a value of
another JSON type, a deleted key, unicode in names, a rewritten safetensors header (dtype,
shape, offsets, a huge declared size), NaN in params -- and for the structural changes also
recomputes the checksums that cover it (a writer bug, not bit rot). Then every reader runs:

* ``load(on_corrupt="raise")`` returns exactly the committed system or raises;
* ``load(on_corrupt="previous")`` returns, per path, a committed state, and warns when it is not
  the latest; or raises;
* ``load_task`` of each task returns its committed path (latest, or previous with a warning);
* ``verify_store`` never crashes, and finds a fault whenever a strict load failed;

where "raises" means a :class:`Mu2netError` whose message names a mutated file; any other
exception, or a silently different system, fails the test. ``benchmarks/faults.py --fuzz N``
runs the same cases at length (:func:`run_cases`).
"""

from __future__ import annotations

import json
import math
import os
import struct
import warnings
from typing import Any

import hypothesis
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_system_store import build_system, commit_all
from test_system_task_index import _new_best

from mu2net.errors import Mu2netError
from mu2net.system import Store, agent_for_task
from mu2net.system.documents import canonical, sha256
from mu2net.system.verify import verify_store

URL = "memory://mu2net-fuzz/store"
A = agent_for_task("t:a")
TASKS = ("t:a", "t:b", "t:c")
# ~10% of cases are harmless (key reordering) or repeat an earlier damaged store: 1,150 cases
# give >= 1,000 distinct bad files (the CI target), in about a minute.
CASES = int(os.environ.get("MU2NET_FUZZ_CASES", "1150"))
BAD_FILES = 1000 if CASES >= 1150 else int(0.8 * CASES)
STRUCTURAL = {
    "agent", "seq", "components", "paths", "tasks", "counters", "history_files", "name",
    "family", "num_params", "file", "sha256", "bytes", "id", "task", "parent", "is_root",
    "shard", "added", "path", "system", "format", "version", "hparams", "metrics",
}  # fmt: skip
FREE_FORM = {"hparams", "metrics", "signature"}


# ----------------------------------------------------------------------------- the store
def _snapshot(system) -> dict[str, Any]:
    paths = {p.id: json.dumps(p.to_json(), sort_keys=True) for p in system.paths.values()}
    params = {}
    for cid, c in system.components.items():
        leaves = c.params if isinstance(c.params, dict) else {"": c.params}
        params[cid] = sha256(b"".join(np.asarray(v).tobytes() for _, v in sorted(leaves.items())))
    return {"paths": paths, "params": params, "tasks": list(system.tasks)}


class Fixture:
    """The committed store's files and every state a reader may legitimately return."""

    def __init__(self) -> None:
        store = Store(URL)
        if store.fs.exists(store.root):
            store.fs.rm(store.root, recursive=True)
        s = build_system()
        commit_all(Store.create(URL, "fuzz"), s)
        previous = _snapshot(Store.open(URL).load(lazy=False))
        _new_best(s, "t:a", seed=5, quality=0.95)
        Store.open(URL).commit(s, A, history=[{"event": "fuzz", "n": 1}], note="second")
        self.store = Store.open(URL)
        self.latest = _snapshot(self.store.load(lazy=False))
        self.allowed_paths = set(previous["paths"].items()) | set(self.latest["paths"].items())
        self.params = {**previous["params"], **self.latest["params"]}
        self.files = {p: self.store.fs.cat(p) for p in sorted(self.store.fs.find(self.store.root))}

    def write(self, path: str, data: bytes) -> None:
        self.store.fs.pipe(path, data)

    def restore(self) -> None:
        for path, data in self.files.items():
            self.store.fs.pipe(path, data)


_FIXTURE: Fixture | None = None


def fixture() -> Fixture:
    """The store, built once per process."""
    global _FIXTURE
    if _FIXTURE is None:
        _FIXTURE = Fixture()
    return _FIXTURE


# ----------------------------------------------------------------------------- mutations
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda kids: st.lists(kids, max_size=3)
    | st.dictionaries(st.text(max_size=6), kids, max_size=3),
    max_leaves=6,
)
UNICODE = st.sampled_from(["é", "\u202e", "\x00", "/", "..", "\U0001f600", " ", "\ufeff", "ü/ü"])
ST_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I8", "U8", "BOOL", "XX", "", 7]


def _json_type(x: Any) -> str:
    return "bool" if isinstance(x, bool) else type(x).__name__


def _slots(node: Any, structural: bool, path=()) -> list[tuple]:
    """Paths (key tuples) of every value in a JSON tree (structural keys only if asked)."""
    out = []
    items = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else []
    )
    for k, v in items:
        here = (*path, k)
        if not structural or (isinstance(k, str) and k in STRUCTURAL) or isinstance(k, int):
            out.append(here)
        if structural and k in FREE_FORM:
            continue  # user data: a re-signed edit inside it is a legitimate-looking commit
        out.extend(_slots(v, structural, here))
    return out


def _get(node, path):
    for k in path:
        node = node[k]
    return node


def _resign(doc: Any) -> Any:
    if isinstance(doc, dict) and isinstance(doc.get("body"), dict):
        doc["sha256"] = sha256(canonical(doc["body"]))
    return doc


def _dumps_with_duplicate(node: Any, target: tuple, value: Any, first: bool) -> str:
    """JSON text of ``node`` where the dict at ``target`` holds one key twice."""
    if isinstance(node, dict):
        parts = [
            f"{json.dumps(k)}: {_dumps_with_duplicate(v, (), None, first)}" for k, v in node.items()
        ]
        if target == () and node:
            key = next(iter(node))
            extra = f"{json.dumps(key)}: {json.dumps(value, allow_nan=True)}"
            parts = [extra, *parts] if first else [*parts, extra]
        elif target:
            parts = [
                f"{json.dumps(k)}: "
                + _dumps_with_duplicate(
                    v, target[1:] if k == target[0] else (0, "never"), value, first
                )
                for k, v in node.items()
            ]
        return "{" + ", ".join(parts) + "}"
    if isinstance(node, list):
        return "[" + ", ".join(_dumps_with_duplicate(v, (), None, first) for v in node) + "]"
    return json.dumps(node, allow_nan=True)


def _mutate_bytes(data: bytes, draw) -> tuple[bytes, str]:
    kind = draw(st.sampled_from(["flip", "truncate", "append", "splice"]))
    if kind == "flip" and data:
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(out) - 1))
            out[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(out), kind
    if kind == "truncate":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))], kind
    junk = draw(st.binary(min_size=1, max_size=64))
    if kind == "append":
        return data + junk, kind
    i = draw(st.integers(0, len(data)))
    return data[:i] + junk + data[i + len(junk) :], "splice"


def _mutate_json(data: bytes, draw) -> tuple[bytes, str]:
    doc = json.loads(data)
    kind = draw(st.sampled_from(["reorder", "duplicate", "retype", "delete", "unicode"]))
    if kind == "reorder":  # harmless: the same document

        def shuffle(n):
            if isinstance(n, dict):
                keys = draw(st.permutations(list(n)))
                return {k: shuffle(n[k]) for k in keys}
            return [shuffle(v) for v in n] if isinstance(n, list) else n

        indent = draw(st.sampled_from([None, 0, 4]))
        return json.dumps(shuffle(doc), indent=indent).encode(), kind
    slots = _slots(doc, structural=kind != "duplicate")
    if not slots:
        return _mutate_bytes(data, draw)
    target = draw(st.sampled_from(slots))
    parent, key = _get(doc, target[:-1]), target[-1]
    if kind == "duplicate":
        dicts = [()] + [s for s in _slots(doc, False) if isinstance(_get(doc, s), dict)]
        where = draw(st.sampled_from(dicts))
        text = _dumps_with_duplicate(doc, where, draw(JSON_VALUES), draw(st.booleans()))
        return text.encode(), kind
    if kind == "retype":
        old = parent[key]
        new = draw(JSON_VALUES.filter(lambda v: _json_type(v) != _json_type(old)))
        parent[key] = new
    elif kind == "delete":
        del parent[key]
    else:
        old = parent[key]
        if isinstance(old, str):
            parent[key] = old + draw(UNICODE)
        elif isinstance(parent, dict) and isinstance(key, str):
            parent[key + draw(UNICODE)] = parent.pop(key)
        else:
            parent[key] = draw(UNICODE)
    if draw(st.booleans()):
        _resign(doc)
        kind += "+resigned"
    return json.dumps(doc, allow_nan=True).encode(), kind


def _mutate_safetensors(data: bytes, draw) -> tuple[bytes, str]:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    rest = data[8 + n :]
    kind = draw(st.sampled_from(["dtype", "shape", "offsets", "huge", "nan"]))
    names = sorted(k for k in header if k != "__metadata__")
    name = draw(st.sampled_from(names))
    entry = header[name]
    if kind == "huge":
        size = draw(st.sampled_from([2**63 - 1, 2**40, n + 1_000_000, 2**64 - 1]))
        return struct.pack("<Q", size) + data[8:], kind
    if kind == "nan":
        start, end = entry["data_offsets"]
        if entry["dtype"] != "F32" or end - start < 4:
            return _mutate_bytes(data, draw)
        i = start + 4 * draw(st.integers(0, (end - start) // 4 - 1))
        val = struct.pack("<f", draw(st.sampled_from([math.nan, math.inf, -math.inf])))
        return data[: 8 + n] + rest[:i] + val + rest[i + 4 :], kind
    if kind == "dtype":
        entry["dtype"] = draw(st.sampled_from(ST_DTYPES))
    elif kind == "shape":
        entry["shape"] = draw(st.lists(st.integers(-2, 2**33), max_size=4))
    else:
        entry["data_offsets"] = draw(st.lists(st.integers(-5, 2**34), min_size=0, max_size=3))
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + rest, kind


def _resign_component(fx: Fixture, file: str, data: bytes) -> dict[str, bytes]:
    """The documents referencing ``file`` with its new sha256/size, re-signed."""
    rel = file.split("/shards/", 1)[1].split("/", 1)[1]
    out = {}
    for path, raw in fx.files.items():
        if not path.endswith(".json") or rel.encode() not in raw:
            continue
        doc = json.loads(raw)
        recs = doc["body"].get("components", {})
        for rec in recs.values():
            if rec.get("file") == rel:
                rec.update(sha256=sha256(data), bytes=len(data))
        out[path] = json.dumps(_resign(doc)).encode()
    return out


def draw_case(fx: Fixture, draw) -> tuple[dict[str, bytes], str]:
    """One mutated store: {file: new bytes} and a description."""
    target = draw(st.sampled_from(sorted(fx.files)))
    data = fx.files[target]
    style = draw(st.sampled_from(["bytes", "structure"]))
    if style == "bytes":
        new, kind = _mutate_bytes(data, draw)
        return {target: new}, f"{kind} {target}"
    if target.endswith(".json"):
        new, kind = _mutate_json(data, draw)
        return {target: new}, f"{kind} {target}"
    if target.endswith(".safetensors"):
        new, kind = _mutate_safetensors(data, draw)
        files = {target: new}
        if draw(st.booleans()):  # as if the writer had produced it: checksums match
            files.update(_resign_component(fx, target, new))
            kind += "+resigned"
        return files, f"{kind} {target}"
    new, kind = _mutate_bytes(data, draw)
    return {target: new}, f"{kind} {target}"


# ----------------------------------------------------------------------------- the oracle
def _named(err: Exception, files) -> bool:
    msg = str(err)
    return any(f in msg or os.path.basename(f) in msg for f in files)


def _attempt(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return fn(), None, caught
        except Mu2netError as e:
            return None, e, caught


def check_case(fx: Fixture, files: dict[str, bytes], what: str) -> list[str]:
    """Writes the mutated files, runs every reader; returns the violations (none = pass)."""
    problems = []
    try:
        for path, data in files.items():
            fx.write(path, data)
        strict_failed = False
        for mode in ("raise", "previous"):
            try:
                system, err, caught = _attempt(
                    lambda m=mode: Store(URL).load(on_corrupt=m, lazy=False)
                )
            except Exception as e:  # noqa: BLE001  (the property: nothing but mu2net errors)
                problems.append(f"load({mode}): {type(e).__name__}: {e}")
                continue
            if err is not None:
                strict_failed |= mode == "raise"
                if not _named(err, files):
                    problems.append(f"load({mode}) error names no mutated file: {err}")
                continue
            snap = _snapshot(system)
            if mode == "raise" and snap != fx.latest:
                problems.append("load(raise) returned a different system")
            if mode == "previous":
                bad = set(snap["paths"].items()) - fx.allowed_paths
                bad_params = {c for c, d in snap["params"].items() if fx.params.get(c) != d}
                if bad or bad_params:
                    problems.append(
                        f"load(previous): uncommitted paths {bad} / params {bad_params}"
                    )
                if snap != fx.latest and not caught:
                    problems.append("load(previous) silently returned an older state")
        for task in TASKS:
            try:
                got, err, caught = _attempt(
                    lambda t=task: Store(URL).load_task(t, on_corrupt="previous", lazy=False)
                )
            except Exception as e:  # noqa: BLE001
                problems.append(f"load_task({task}): {type(e).__name__}: {e}")
                continue
            if err is not None:
                if not _named(err, files):
                    problems.append(f"load_task({task}) error names no mutated file: {err}")
                continue
            path = got.best_path(task)
            rec = (path.id, json.dumps(path.to_json(), sort_keys=True))
            if rec not in fx.allowed_paths:
                problems.append(f"load_task({task}) returned an uncommitted path")
            elif rec not in fx.latest["paths"].items() and not caught:
                problems.append(f"load_task({task}) silently returned an older path")
        try:
            report = verify_store(Store(URL))
            if strict_failed and report.ok:
                problems.append("verify passed a store that does not load")
        except Mu2netError:
            pass
        except Exception as e:  # noqa: BLE001
            problems.append(f"verify: {type(e).__name__}: {e}")
    finally:
        fx.restore()
    return [f"{what}: {p}" for p in problems]


def run_cases(n: int, seed: int = 0) -> dict[str, Any]:
    """Runs ``n`` generated cases (for ``benchmarks/faults.py --fuzz``); returns counts.

    ``bad_files`` counts the cases that really damaged a file: bytes differ from the committed
    ones and the mutation is not the harmless key reordering; ``distinct_bad_files`` the
    different damaged stores among them.
    """
    fx = fixture()
    stats: dict[str, Any] = {"cases": 0, "violations": [], "kinds": {}, "bad_files": 0}
    distinct: set[str] = set()

    @hypothesis.seed(seed)
    @settings(max_examples=n, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(st.data())
    def case(data):
        files, what = draw_case(fx, data.draw)
        stats["cases"] += 1
        kind = what.split()[0]
        stats["kinds"][kind] = stats["kinds"].get(kind, 0) + 1
        changed = {p: d for p, d in files.items() if d != fx.files.get(p)}
        if changed and kind != "reorder":
            stats["bad_files"] += 1
            distinct.add(sha256(canonical({p: d.hex() for p, d in changed.items()})))
        stats["violations"].extend(check_case(fx, files, what))

    case()
    stats["distinct_bad_files"] = len(distinct)
    return stats


def test_fuzzed_store_files_load_right_or_fail_named():
    """CASES generated cases (>= 1,000 distinct damaged stores by default), 0 violations."""
    stats = run_cases(CASES, seed=int(os.environ.get("MU2NET_FUZZ_SEED", "0")))
    n_bad, n_distinct = stats["bad_files"], stats["distinct_bad_files"]
    print(f"\nfuzz: {stats['cases']} cases, {n_bad} bad files ({n_distinct} distinct)")
    assert not stats["violations"], stats["violations"][:10]
    assert stats["cases"] == CASES
    assert n_distinct >= BAD_FILES, stats["kinds"]


def test_fixture_is_what_it_claims():
    """The oracle's premises: the store has a previous state and every file kind is fuzzed."""
    fx = fixture()
    assert check_case(fx, {}, "unmutated") == []
    names = [os.path.basename(p) for p in fx.files]
    for prefix in ["manifest-", "index-", "indexed-", "history-", "mu2net-store"]:
        assert any(n.startswith(prefix) for n in names), prefix
    assert any(n.endswith(".safetensors") for n in names)
    assert len(fx.allowed_paths) > len(fx.latest["paths"])  # t:a has a previous path
