"""The system store: one directory (local or any fsspec URL) with one shard per agent.

Layout::

    <root>/mu2net-store.json                      marker: format, version, system name
    <root>/shards/<agent>/params/<c>-<u>.safetensors  one file per component, written once
    <root>/shards/<agent>/history-<seq>-<u>.jsonl candidate log of one commit
    <root>/shards/<agent>/manifest-<seq>.json     the commit itself, written last

A commit writes the params of the components that are new since the agent's last commit, then
its history, then the manifest, atomically (temp file + exclusive link/rename). A manifest lists
every component of the shard still in use (with the file and sha256 that hold it), the shard's
published paths and the tasks it added to the live mixture. Nothing is ever overwritten, so a
crash loses at most uncommitted work and concurrent agents never write the same file. Readers
merge the latest manifest of every shard and verify checksums of every file they read.
Params are safetensors; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import fsspec
import ml_dtypes
import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from mu2net.errors import Mu2netError
from mu2net.system import task_index
from mu2net.system.names import validate_agent_name, validate_task_name
from mu2net.system.state import Component, Path, System

FORMAT = "mu2net-store"
VERSION = 1
MARKER = "mu2net-store.json"
_MANIFEST_RE = re.compile(r"^manifest-(\d{8})\.json$")
_MOMENTUM = "momentum::"
_BF16 = "::bf16"
_LEAF = "::leaf"


class StoreError(Mu2netError, RuntimeError):
    """A store that cannot be read or written; the message names the file."""


class StoreConflict(StoreError):
    """Another writer committed the same shard sequence number first."""


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dict of arrays -> ``{"a/b/c": array}``."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "/"))
        else:
            out[key] = np.ascontiguousarray(np.asarray(v))
    return out


def unflatten(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Inverse of :func:`flatten`."""
    out: dict[str, Any] = {}
    for key, v in flat.items():
        node = out
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def encode_component(params: Any, momentum: Any = None) -> bytes:
    """Safetensors bytes of a component's params (and momentum trace, if any)."""
    flat = _flatten_any(params)
    if momentum is not None:
        flat.update({_MOMENTUM + k: v for k, v in _flatten_any(momentum).items()})
    # safetensors' numpy reader has no bfloat16: store the bits as uint16 under a tagged key.
    flat = dict(
        (k + _BF16, v.view(np.uint16)) if v.dtype == ml_dtypes.bfloat16 else (k, v)
        for k, v in flat.items()
    )
    return st_save(flat)


def decode_component(data: bytes) -> tuple[Any, Any]:
    """Inverse of :func:`encode_component` (bit-exact, bfloat16 included)."""
    flat = dict(
        (k[: -len(_BF16)], v.view(ml_dtypes.bfloat16)) if k.endswith(_BF16) else (k, v)
        for k, v in st_load(data).items()
    )
    params = {k: v for k, v in flat.items() if not k.startswith(_MOMENTUM)}
    mom = {k[len(_MOMENTUM) :]: v for k, v in flat.items() if k.startswith(_MOMENTUM)}
    return _unflatten_any(params), (_unflatten_any(mom) if mom else None)


def _flatten_any(tree: Any) -> dict[str, np.ndarray]:
    # A component may be a single array (e.g. ViT's ``cls`` token) rather than a dict.
    if isinstance(tree, Mapping):
        return flatten(tree)
    return {_LEAF: np.ascontiguousarray(np.asarray(tree))}


def _unflatten_any(flat: Mapping[str, np.ndarray]) -> Any:
    return flat[_LEAF] if set(flat) == {_LEAF} else unflatten(flat)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


class Store:
    """A system store at ``url`` (a local directory or any fsspec URL such as ``gs://``)."""

    def __init__(self, url: str):
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.bytes_read = 0
        self.files_read = 0

    # ------------------------------------------------------------------ low-level I/O
    def _p(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def _put(self, path: str, data: bytes) -> None:
        """Writes ``data`` to ``path`` once: temp file, then an exclusive atomic publish."""
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        self.fs.makedirs(os.path.dirname(path), exist_ok=True)
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
        if _is_local(self.fs):
            try:
                os.link(tmp, path)  # fails if ``path`` exists: exclusive and atomic
            except FileExistsError:
                raise StoreConflict(f"{path} already exists (a concurrent writer?)") from None
            finally:
                os.unlink(tmp)
        else:
            if self.fs.exists(path):
                self.fs.rm(tmp)
                raise StoreConflict(f"{path} already exists (a concurrent writer?)")
            self.fs.mv(tmp, path)

    def _get(self, path: str) -> bytes:
        try:
            with self.fs.open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise StoreError(f"{path}: file missing from the store") from None
        self.bytes_read += len(data)
        self.files_read += 1
        return data

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(cls, url: str, system_name: str) -> Store:
        """Creates an empty store (refuses a directory that holds something else)."""
        validate_agent_name(system_name)
        store = cls(url)
        marker = store._p(MARKER)
        if store.fs.exists(marker):
            raise StoreError(f"{marker}: a store already exists here")
        if store.fs.exists(store.root) and [
            p for p in store.fs.ls(store.root, detail=False) if ".tmp-" not in p
        ]:  # a temp file is what a run killed inside ``create`` leaves behind
            raise StoreError(f"{store.root}: directory is not empty and is not a mu2net store")
        body = {"format": FORMAT, "version": VERSION, "system": system_name, "created": time.time()}
        store._put(marker, json.dumps(body, indent=1).encode())
        return store

    @classmethod
    def open(cls, url: str) -> Store:
        """Opens an existing store; a foreign or newer directory gives a clear error."""
        store = cls(url)
        store.info()
        return store

    def info(self) -> dict[str, Any]:
        """The store marker (format, version, system name)."""
        path = self._p(MARKER)
        if not self.fs.exists(path):
            raise StoreError(
                f"{path}: not a mu2net store (marker missing); create it with `mu2net init`"
            )
        return self._check_header(path, self._parse_json(path, self._get(path)))

    @property
    def system_name(self) -> str:
        """Name of the system held in this store."""
        return self.info()["system"]

    # ------------------------------------------------------------------ reading
    def shards(self) -> list[str]:
        """Agent names that have a shard directory."""
        base = self._p("shards")
        if not self.fs.exists(base):
            return []
        return sorted(os.path.basename(p.rstrip("/")) for p in self.fs.ls(base, detail=False))

    def manifest_seqs(self, agent: str) -> list[int]:
        """Committed sequence numbers of ``agent``'s shard, ascending."""
        d = self._p("shards", agent)
        if not self.fs.exists(d):
            return []
        seqs = []
        for p in self.fs.ls(d, detail=False):
            m = _MANIFEST_RE.match(os.path.basename(p))
            if m:
                seqs.append(int(m.group(1)))
        return sorted(seqs)

    def _manifest_path(self, agent: str, seq: int) -> str:
        return self._p("shards", agent, f"manifest-{seq:08d}.json")

    def _parse_json(self, path: str, data: bytes) -> dict[str, Any]:
        try:
            doc = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StoreError(f"{path}: corrupt or truncated JSON ({e})") from None
        if not isinstance(doc, dict):
            raise StoreError(f"{path}: not a mu2net manifest (top level is not an object)")
        return doc

    def _check_header(self, path: str, doc: Mapping[str, Any]) -> dict[str, Any]:
        if doc.get("format") != FORMAT:
            raise StoreError(
                f"{path}: foreign file (format {doc.get('format')!r}, expected {FORMAT!r})"
            )
        version = doc.get("version")
        if not isinstance(version, int) or version > VERSION:
            raise StoreError(
                f"{path}: format version {version!r} is newer than this mu2net "
                f"reads (<= {VERSION}); upgrade mu2net"
            )
        return dict(doc)

    def _document(self, body: Mapping[str, Any]) -> bytes:
        """``body`` wrapped with the store's header and its checksum (manifests, indexes)."""
        doc = {"format": FORMAT, "version": VERSION, "sha256": _sha256(_canonical(body))}
        return json.dumps({**doc, "body": body}, indent=1).encode()

    def _read_document(self, path: str, kind: str) -> dict[str, Any]:
        """The verified body of a file written by :meth:`_document` (``kind`` names it)."""
        doc = self._check_header(path, self._parse_json(path, self._get(path)))
        body = doc.get("body")
        if not isinstance(body, dict) or doc.get("sha256") != _sha256(_canonical(body)):
            raise StoreError(f"{path}: {kind} checksum mismatch (file corrupted)")
        return body

    def read_manifest(self, agent: str, seq: int) -> dict[str, Any]:
        """Reads and verifies one manifest (header, version, checksum)."""
        path = self._manifest_path(agent, seq)
        body = self._read_document(path, "manifest")
        if body.get("agent") != agent:
            raise StoreError(f"{path}: manifest of agent {body.get('agent')!r} in shard {agent!r}")
        return body

    def latest_manifest(self, agent: str, on_corrupt: str = "raise") -> dict[str, Any] | None:
        """The newest readable manifest of ``agent`` (None for an empty shard).

        Args:
          agent: shard name.
          on_corrupt: "raise" (default) raises :class:`StoreError` naming the broken file;
            "previous" warns and falls back to the newest earlier manifest that verifies.
        """
        for seq in reversed(self.manifest_seqs(agent)):
            try:
                return self.read_manifest(agent, seq)
            except StoreError as e:
                if on_corrupt != "previous":
                    raise
                warnings.warn(f"skipping broken state: {e}", stacklevel=2)
        return None

    def load(
        self,
        agents: Iterable[str] | None = None,
        on_corrupt: str = "raise",
        lazy: bool = True,
    ) -> System:
        """Merges the latest committed manifest of every shard into a :class:`System`.

        Params are read lazily (on first access of a component) unless ``lazy=False``, so a
        system loaded for inference reads only the components of the path it runs.
        """
        self.info()
        system = System()
        task_entries = []
        for agent in agents if agents is not None else self.shards():
            body = self.latest_manifest(agent, on_corrupt=on_corrupt)
            if body is None:
                continue
            for cid, rec in body["components"].items():
                if not cid.startswith(agent + "/"):
                    raise StoreError(
                        f"{self._manifest_path(agent, body['seq'])}: component "
                        f"{cid!r} does not belong to shard {agent!r}"
                    )
                system.add_component(self._component_from_record(agent, cid, rec))
            for pd in body["paths"]:
                system.paths[pd["id"]] = Path.from_json(pd)
            task_entries.extend((t["added"], t["task"], agent) for t in body.get("tasks", []))
            for k, v in body.get("counters", {}).items():
                system.counters[k] = max(system.counters.get(k, 0), int(v))
        for _, task, agent in sorted(task_entries):
            if task not in system.tasks:
                system.tasks.append(validate_task_name(task))
                system.task_agents[task] = agent
        for p in system.paths.values():
            missing = [c for c in p.components.values() if c not in system.components]
            if missing:
                raise StoreError(
                    f"path {p.id} of task {p.task!r} references component(s) "
                    f"{missing} that no shard holds (missing or foreign shard)"
                )
        system.recompute_locks()
        if not lazy:
            for c in system.components.values():
                c.params  # noqa: B018  (forces the read and checksum verification)
        return system

    def load_task(self, task: str, on_corrupt: str = "raise", lazy: bool = True) -> System:
        """A system holding ``task``'s published path, for inference.

        Reads the task's index (one small file, whatever the number of tasks) instead of every
        shard's manifest; falls back to :meth:`load` for stores or commits without one. Params
        are read on first use unless ``lazy=False``. Raises :class:`StoreError` if the task has
        no published path.
        """
        system = task_index.load_task(self, task, on_corrupt=on_corrupt)
        if not lazy:
            system.params_of(system.best_path(task))  # forces the reads and checksum checks
        return system

    def _component_from_record(self, agent: str, cid: str, rec: Mapping[str, Any]) -> Component:
        file = self._p("shards", agent, rec["file"])

        def loader(c: Component, file=file, digest=rec["sha256"]) -> tuple[Any, Any]:
            data = self._get(file)
            if _sha256(data) != digest:
                raise StoreError(f"{file}: checksum mismatch for component {c.id} ({c.name})")
            try:
                params, mom = decode_component(data)
            except Exception as e:  # safetensors raises its own error types
                raise StoreError(f"{file}: unreadable params for component {c.id} ({e})") from e
            return params, mom

        return Component(
            id=cid,
            name=rec["name"],
            family=rec["family"],
            signature=rec["signature"],
            num_params=int(rec["num_params"]),
            agent=agent,
            lineage=rec.get("lineage"),
            committed=True,
            record={**rec, "shard": agent},
            _loader=loader,
        )

    def history(self, agents: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Candidate records of every committed state (in commit order per shard)."""
        out = []
        for agent in agents if agents is not None else self.shards():
            body = self.latest_manifest(agent, on_corrupt="previous")
            for name in (body or {}).get("history_files", []):
                path = self._p("shards", agent, name)
                out.extend(json.loads(line) for line in self._get(path).splitlines() if line)
        return out

    def verify(self) -> int:
        """Reads every component file of every shard and checks its checksum; returns the count."""
        system = self.load(lazy=True)
        for c in system.components.values():
            c.params  # noqa: B018
        return len(system.components)

    # ------------------------------------------------------------------ writing
    def commit(
        self,
        system: System,
        agent: str,
        history: Iterable[Mapping[str, Any]] = (),
        note: str = "",
    ) -> int:
        """Commits ``agent``'s part of ``system``: new components, its paths, its tasks.

        Returns the new sequence number. The manifest lists every component ``agent`` ever
        committed plus its new ones referenced by a published path; only the new are written.
        """
        validate_agent_name(agent)
        self.info()
        prev = self.latest_manifest(agent)
        if prev and not self.fs.exists(task_index.indexed_marker(self, agent, prev["seq"])):
            # The last commit crashed before its task indexes: write them now (readers fall
            # back to the full load until then).
            all_tasks = {p["task"] for p in prev["paths"]}
            task_index.write_indexes(self, agent, prev, all_tasks, _records(system))
        seq = (prev["seq"] + 1) if prev else 0
        prev_components = dict(prev["components"]) if prev else {}
        used = {cid for p in system.paths.values() for cid in p.components.values()}
        records: dict[str, Any] = {}
        written = []
        for cid in sorted(used):
            c = system.component(cid)
            if c.agent != agent:
                continue
            if cid in prev_components:
                records[cid] = prev_components[cid]
                continue
            if c.committed:
                raise StoreError(
                    f"component {cid} is marked committed but shard {agent!r} has no record of it"
                )
            data = encode_component(c.params, c.momentum)
            # A unique suffix: a restarted agent reuses ids of uncommitted components, and must
            # never collide with the orphan files a killed run left behind.
            fname = f"params/{cid.split('/', 1)[1]}-{uuid.uuid4().hex[:8]}.safetensors"
            self._put(self._p("shards", agent, fname), data)
            written.append(c)
            records[cid] = {
                "name": c.name,
                "family": c.family,
                "signature": c.signature,
                "num_params": c.num_params,
                "lineage": c.lineage,
                "file": fname,
                "sha256": _sha256(data),
                "bytes": len(data),
                "seq": seq,
            }
        for cid, rec in prev_components.items():
            # A committed component stays listed: another shard may share it even if this
            # agent no longer uses it (its params never change, so keeping it is free).
            records.setdefault(cid, rec)
        history_files = list(prev.get("history_files", [])) if prev else []
        history = list(history)
        if history:
            name = f"history-{seq:08d}-{uuid.uuid4().hex[:8]}.jsonl"
            lines = b"".join(_canonical(dict(h)) + b"\n" for h in history)
            self._put(self._p("shards", agent, name), lines)
            history_files.append(name)
        prev_tasks = {t["task"]: t for t in (prev or {}).get("tasks", [])}
        tasks = [
            prev_tasks.get(t, {"task": t, "added": time.time()})
            for t in system.tasks
            if system.task_agents.get(t) == agent
        ]
        body = {
            "agent": agent,
            "seq": seq,
            "created": time.time(),
            "note": note,
            "components": records,
            "paths": [p.to_json() for p in system.paths.values() if p.agent == agent],
            "tasks": tasks,
            "counters": {k: v for k, v in system.counters.items() if k.startswith(agent + ":")},
            "history_files": history_files,
        }
        self._put(self._manifest_path(agent, seq), self._document(body))
        for c in written:
            c.committed = True
            c.record = {**records[c.id], "shard": agent}
        task_index.write_indexes(
            self, agent, body, task_index.changed_tasks(prev, body), _records(system)
        )
        return seq


def _records(system: System) -> dict[str, dict[str, Any]]:
    """Store records (file, sha256, shard) of the system's committed components, by id."""
    return {cid: c.record for cid, c in system.components.items() if c.record is not None}


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")
