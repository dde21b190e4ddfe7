"""Per-task index files: load one task for inference without reading every shard's manifest.

A manifest lists every component and path of its shard, so :meth:`Store.load` reads O(tasks)
bytes. A commit therefore also writes, after its manifest, one small index per task whose
published path it changed, holding that path and the store records (file, sha256) of every
component it uses, from whichever shard::

    tasks/<sha256(task)[:16]>/index-<agent>-<seq>.json   the task's path as of <seq>
    shards/<agent>/indexed-<seq>.json                    commit <seq>'s indexes all exist

(names from :mod:`mu2net.system.layout`)
Reading ``task`` lists its index folder and its shard's file names (no manifest content) and
reads one index: O(1) bytes in the number of tasks. The newest index at or below the shard's
latest manifest is current unless a commit after it lacks its ``indexed`` marker (a crash
between a manifest and its indexes): then the reader falls back to the full load, and the
agent's next commit writes the missing indexes. Index files are never overwritten either.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from typing import Any

from mu2net.system import layout
from mu2net.system.documents import StoreError
from mu2net.system.names import validate_task_name
from mu2net.system.records import check_component_record, path_from_record
from mu2net.system.state import System

# ``store`` below is a :class:`mu2net.system.store.Store`; this module only uses its public
# file methods, and the store imports this module (never the other way round).


def task_dir(store: Any, task: str) -> str:
    """The folder of ``task``'s index files (hashed: task names hold ':' and '#')."""
    return store.path_of(layout.task_dir(task))


def index_path(store: Any, task: str, agent: str, seq: int) -> str:
    """The index file of ``task`` written by ``agent``'s commit ``seq``."""
    return store.path_of(layout.index_path(task, agent, seq))


def indexed_marker(store: Any, agent: str, seq: int) -> str:
    """The marker that says every index of ``agent``'s commit ``seq`` is written."""
    return store.path_of(layout.indexed_marker(agent, seq))


def write_indexes(
    store: Any,
    agent: str,
    body: Mapping[str, Any],
    tasks: set[str],
    foreign: Mapping[str, Mapping[str, Any]],
) -> bool:
    """Writes the indexes of ``tasks`` (paths of manifest ``body``), then its marker.

    Args:
      store: the store.
      agent: the shard that committed ``body``.
      body: the committed manifest body.
      tasks: tasks whose index to write (the paths the commit changed; all when repairing).
      foreign: store records of the other shards' components, by id (with their ``shard``).

    Returns:
      Whether the marker was written (False if a path uses a component with no known record).
    """
    seq = int(body["seq"])
    for pd in body["paths"]:
        if pd["is_root"] or pd["task"] not in tasks:
            continue
        comps = {}
        for cid in pd["components"].values():
            if cid in body["components"]:
                comps[cid] = {**body["components"][cid], "shard": agent}
            elif cid in foreign:
                comps[cid] = dict(foreign[cid])
            else:
                return False
        path = index_path(store, pd["task"], agent, seq)
        if store.exists(path):  # written before a crash that lost only the marker
            continue
        entry = {"task": pd["task"], "agent": agent, "seq": seq, "path": pd, "components": comps}
        store.put_bytes(path, store.document(entry))
    marker = indexed_marker(store, agent, seq)
    if not store.exists(marker):
        store.put_bytes(marker, store.document({"agent": agent, "seq": seq}))
    return True


def changed_tasks(prev: Mapping[str, Any] | None, body: Mapping[str, Any]) -> set[str]:
    """Tasks whose published path in ``body`` differs from the one in ``prev``."""
    before = {p["task"]: p for p in (prev or {}).get("paths", []) if not p["is_root"]}
    return {p["task"] for p in body["paths"] if not p["is_root"] and before.get(p["task"]) != p}


def _matching(names: list[str], pattern: re.Pattern) -> list[tuple[str, ...]]:
    return [m.groups() for m in map(pattern.match, names) if m]


def find_index(store: Any, task: str) -> str | None:
    """The current index file of ``task``, or None when only the full load can tell."""
    entries = _matching(store.list_dir(task_dir(store, task)), layout.INDEX_RE)
    agents = {agent for agent, _ in entries}
    if len(agents) != 1:  # no index (older store, no commit yet) or a task that changed hands
        return None
    (agent,) = agents
    shard = store.list_dir(store.path_of(layout.shard_dir(agent)))
    # Listed again after the shard: an index of any commit whose marker was just seen is in it.
    entries = _matching(store.list_dir(task_dir(store, task)), layout.INDEX_RE)
    if {a for a, _ in entries} != {agent}:
        return None
    manifests = {int(s) for (s,) in _matching(shard, layout.MANIFEST_RE)}
    markers = {int(s) for (s,) in _matching(shard, layout.INDEXED_RE)}
    if not manifests:
        return None
    latest = max(manifests)
    seqs = [int(s) for _, s in entries if int(s) <= latest]  # above: landed after the listing
    if not seqs:
        return None
    newest = max(seqs)
    if any(q not in markers for q in manifests if newest < q <= latest):
        return None  # a later commit may have changed the path and lost its index in a crash
    return index_path(store, task, agent, newest)


def read_index(store: Any, path: str, task: str) -> System:
    """A :class:`System` holding only ``task``'s path and its components (params lazy)."""
    entry = store.read_document(path, "task index")
    pd = entry.get("path")
    comps = entry.get("components")
    if (
        entry.get("task") != task
        or not isinstance(pd, dict)
        or pd.get("task") != task
        or not isinstance(comps, dict)
        or not isinstance(entry.get("agent"), str)
    ):
        raise StoreError(f"{path}: index of task {entry.get('task')!r}, expected {task!r}")
    system = System()
    for cid, rec in comps.items():
        check_component_record(path, cid, rec)
        if not isinstance(rec.get("shard"), str):
            raise StoreError(f"{path}: record of component {cid!r} names no shard")
        system.add_component(store.component_from_record(rec["shard"], cid, rec))
    path_obj = path_from_record(path, pd)
    missing = [c for c in path_obj.components.values() if c not in system.components]
    if missing:
        raise StoreError(f"{path}: path {path_obj.id} uses components {missing} with no record")
    system.paths[path_obj.id] = path_obj
    system.tasks.append(task)
    system.task_agents[task] = entry["agent"]
    system.recompute_locks()
    return system


def load_task(store: Any, task: str, on_corrupt: str = "raise") -> System:
    """``task``'s published path from its index, else from the full load (same result)."""
    validate_task_name(task)
    store.info()
    path = find_index(store, task)
    if path is not None:
        try:
            return read_index(store, path, task)
        except StoreError as e:
            if on_corrupt != "previous":
                raise
            warnings.warn(f"skipping broken task index: {e}", stacklevel=2)
    system = store.load(on_corrupt=on_corrupt)
    if system.best_path(task) is None:
        known = sorted(p.task for p in system.task_paths())
        raise StoreError(
            f"task {task!r} has no published path in store {store.url}; tasks with paths: {known}"
        )
    return system
