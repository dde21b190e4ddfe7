"""The store's file layout: every file and folder name, and the patterns that recognise them.

One module so that the store, the per-task indexes, the leases, ``mu2net verify`` and tools
(benchmarks, tests) agree on names without reaching into each other. Every function returns a
path *relative to the store root*, with ``/`` separators; ``Store.path_of`` makes it absolute::

    mu2net-store.json                                marker: format, version, system name
    shards/<agent>/params/<c>-<u>.safetensors        one file per component, written once
    shards/<agent>/history-<seq>-<u>.jsonl           candidate log of one commit
    shards/<agent>/manifest-<seq>.json               the commit itself, written last
    shards/<agent>/indexed-<seq>.json                every task index of commit <seq> exists
    tasks/<sha256(task)[:16]>/index-<agent>-<seq>.json   one task's path as of <seq>
    leases/<agent>/lease-<gen>.json                  the shard's lease, one object per renewal
    verify/verify-<ms>-<u>.json                      the result of one ``mu2net verify`` run

``<seq>`` and ``<gen>`` are zero-padded to 8 digits so that names sort in commit order;
``<u>`` is a random suffix that keeps a restarted writer clear of a killed one's orphans. A
file being written is ``<name>.tmp-<hex>`` until its exclusive publish; readers skip those.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid

FORMAT = "mu2net-store"
VERSION = 1
MARKER = "mu2net-store.json"
SHARDS = "shards"
PARAMS = "params"
TASKS = "tasks"
LEASES = "leases"
VERIFY = "verify"
TMP_INFIX = ".tmp-"

MANIFEST_RE = re.compile(r"^manifest-(\d{8})\.json$")
HISTORY_RE = re.compile(r"^history-(\d{8})-([0-9a-f]{8})\.jsonl$")
COMPONENT_RE = re.compile(r"^params/(.+)-([0-9a-f]{8})\.safetensors$")
INDEXED_RE = re.compile(r"^indexed-(\d{8})\.json$")
INDEX_RE = re.compile(r"^index-(.+)-(\d{8})\.json$")
LEASE_RE = re.compile(r"^lease-(\d{8})\.json$")
# Component and path ids: ``<agent>/<kind><n>`` (ASCII; the agent part is a shard name).
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.~-]{0,127}/[A-Za-z0-9_.~-]{1,128}$")
VERIFY_RE = re.compile(r"^verify-(\d{13})-([0-9a-f]{8})\.json$")


def _seq(n: int) -> str:
    return f"{int(n):08d}"


def shard_dir(agent: str) -> str:
    """The folder of ``agent``'s shard."""
    return f"{SHARDS}/{agent}"


def manifest_path(agent: str, seq: int) -> str:
    """Manifest of ``agent``'s commit ``seq``."""
    return f"{shard_dir(agent)}/manifest-{_seq(seq)}.json"


def history_name(seq: int) -> str:
    """A fresh name (relative to the shard) for commit ``seq``'s candidate log."""
    return f"history-{_seq(seq)}-{uuid.uuid4().hex[:8]}.jsonl"


def component_name(component_id: str) -> str:
    """A fresh name (relative to the shard) for a component's params file.

    The random suffix matters: a restarted agent reuses the ids of components it never
    committed, and must never collide with the files a killed run left behind.
    """
    return f"{PARAMS}/{component_id.split('/', 1)[1]}-{uuid.uuid4().hex[:8]}.safetensors"


def shard_file(agent: str, name: str) -> str:
    """A file of ``agent``'s shard named as in its manifest (``params/...``, ``history-...``)."""
    return f"{shard_dir(agent)}/{name}"


def indexed_marker(agent: str, seq: int) -> str:
    """The marker saying every task index of ``agent``'s commit ``seq`` is written."""
    return f"{shard_dir(agent)}/indexed-{_seq(seq)}.json"


def task_dir(task: str) -> str:
    """The folder of ``task``'s index files (hashed: task names hold ':' and '#')."""
    return f"{TASKS}/{hashlib.sha256(task.encode()).hexdigest()[:16]}"


def index_path(task: str, agent: str, seq: int) -> str:
    """The index file of ``task`` written by ``agent``'s commit ``seq``."""
    return f"{task_dir(task)}/index-{agent}-{_seq(seq)}.json"


def lease_dir(agent: str) -> str:
    """The folder of ``agent``'s lease objects."""
    return f"{LEASES}/{agent}"


def lease_path(agent: str, generation: int) -> str:
    """Lease object number ``generation`` of ``agent``'s shard."""
    return f"{lease_dir(agent)}/lease-{_seq(generation)}.json"


def verify_record(now: float | None = None) -> str:
    """A fresh name for one verify result; names sort by time (milliseconds)."""
    ms = int((time.time() if now is None else now) * 1000)
    return f"{VERIFY}/verify-{ms:013d}-{uuid.uuid4().hex[:8]}.json"


def tmp_name(path: str) -> str:
    """The temp name a file is written under before its exclusive publish."""
    return f"{path}{TMP_INFIX}{uuid.uuid4().hex}"


def is_tmp(name: str) -> bool:
    """Whether ``name`` is a temp file (an unfinished write, possibly a killed one)."""
    return TMP_INFIX in name
