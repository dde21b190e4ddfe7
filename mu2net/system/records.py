"""Shape checks of the JSON records a manifest and a task index hold.

The checksum of a document proves that nobody changed its bytes, not that its writer wrote
the right shape; these checks turn any malformed record (a field of the wrong type, a file name
outside the layout, a bad task name) into a :class:`StoreError` that names the file, instead of
a ``KeyError`` or ``TypeError`` deep in the loader.
"""

from __future__ import annotations

import re
from typing import Any

from mu2net.system import layout
from mu2net.system.documents import StoreError
from mu2net.system.names import NameError_, validate_agent_name, validate_task_name
from mu2net.system.state import Path

# Every writer of this format wrote all of these (since the first version): one missing means
# the record was damaged, and defaulting it would load a different system without a word.
PATH_KEYS = (
    "id",
    "task",
    "family",
    "components",
    "hparams",
    "agent",
    "parent",
    "metrics",
    "is_root",
)
_FAMILY = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
MANIFEST_KEYS = ("agent", "seq", "components", "paths", "tasks", "counters", "history_files")


def _is_id(x: Any) -> bool:
    return isinstance(x, str) and layout.ID_RE.match(x) is not None and ".." not in x


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def path_from_record(where: str, record: Any) -> Path:
    """A :class:`Path` from its JSON record; :class:`StoreError` naming ``where`` if malformed."""
    r = record
    ok = (
        isinstance(r, dict)
        and all(k in r for k in PATH_KEYS)
        and _is_id(r.get("id"))
        and all(isinstance(r.get(k), str) for k in ("task", "family", "agent"))
        and _FAMILY.match(r["family"]) is not None
        and isinstance(r.get("components"), dict)
        and all(isinstance(k, str) and _is_id(v) for k, v in r["components"].items())
        and isinstance(r.get("hparams"), dict)
        and isinstance(r["metrics"], dict)
        and (r["parent"] is None or _is_id(r["parent"]))
        and isinstance(r["is_root"], bool)
    )
    if not ok:
        raise StoreError(f"{where}: malformed path record {str(record)[:100]!r}")
    try:
        validate_agent_name(r["agent"])
    except NameError_ as e:
        raise StoreError(f"{where}: path {r['id']!r}: {e}") from None
    if not r["is_root"]:
        _task_name(where, r["task"])
    return Path.from_json(r)


def _task_name(where: str, task: str) -> str:
    try:
        return validate_task_name(task)
    except NameError_ as e:
        raise StoreError(f"{where}: {e}") from None


def check_component_record(where: str, cid: Any, rec: Any) -> None:
    """Raises :class:`StoreError` naming ``where`` unless ``rec`` is a well-formed record."""
    ok = (
        _is_id(cid)
        and isinstance(rec, dict)
        and all(k in rec for k in ("signature", "lineage"))
        and (rec["lineage"] is None or isinstance(rec["lineage"], str))
        and isinstance(rec.get("name"), str)
        and isinstance(rec.get("family"), str)
        and _FAMILY.match(rec["family"]) is not None
        and isinstance(rec.get("num_params"), int)
        and not isinstance(rec.get("num_params"), bool)
        and isinstance(rec.get("file"), str)
        and layout.COMPONENT_RE.match(rec["file"]) is not None
        and ".." not in rec["file"]
        and isinstance(rec.get("sha256"), str)
        and re.fullmatch(r"[0-9a-f]{64}", rec["sha256"]) is not None
        and (rec.get("bytes") is None or _is_int(rec["bytes"]))
        and (rec.get("shard") is None or isinstance(rec["shard"], str))
    )
    if not ok:
        raise StoreError(f"{where}: malformed record of component {str(cid)[:80]!r}")
    if rec.get("shard") is not None:
        try:
            validate_agent_name(rec["shard"])  # it becomes part of a file path
        except NameError_ as e:
            raise StoreError(f"{where}: record of component {cid!r}: {e}") from None


def check_manifest(where: str, body: dict[str, Any]) -> None:
    """Raises :class:`StoreError` naming ``where`` unless every field has the right type."""
    missing = [k for k in MANIFEST_KEYS if k not in body]
    if missing:
        raise StoreError(f"{where}: malformed manifest (missing {missing})")
    comps, paths, tasks = body["components"], body["paths"], body["tasks"]
    counters, history_files, seq = body["counters"], body["history_files"], body["seq"]
    if not (
        _is_int(seq)
        and isinstance(comps, dict)
        and isinstance(paths, list)
        and isinstance(tasks, list)
        and isinstance(counters, dict)
        and isinstance(history_files, list)
    ):
        raise StoreError(f"{where}: malformed manifest (a field has the wrong type)")
    for cid, rec in comps.items():
        check_component_record(where, cid, rec)
    for pd in paths:
        path_from_record(where, pd)
    for t in tasks:
        if not (
            isinstance(t, dict)
            and isinstance(t.get("task"), str)
            and isinstance(t.get("added"), (int, float))
            and not isinstance(t.get("added"), bool)
        ):
            raise StoreError(f"{where}: malformed task entry {str(t)[:80]!r}")
        _task_name(where, t["task"])
    for k, v in counters.items():
        if not _is_int(v):
            raise StoreError(f"{where}: malformed counter {k!r}")
    for name in history_files:
        if not isinstance(name, str) or not layout.HISTORY_RE.match(name):
            raise StoreError(f"{where}: malformed history file name {str(name)[:80]!r}")
