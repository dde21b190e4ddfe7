"""The system store: one directory (local or any fsspec URL) with one shard per agent.

The file layout (names and patterns) is :mod:`mu2net.system.layout`. A commit writes the params
of the components that are new since the agent's last commit, then its history, then the
manifest, each written once (temp file + exclusive link, or a create-only object write). A
manifest lists every component of the shard still in use (with the file and sha256 that hold
it), the shard's published paths and the tasks it added to the live mixture. Nothing is ever
overwritten, so a crash loses at most uncommitted work and concurrent agents never write the
same file. Readers merge the latest manifest of every shard and verify checksums of every file
they read. Params are safetensors; nothing is ever unpickled. A commit is fenced by the shard's
lease (:mod:`mu2net.system.lease`): one writer per shard.
"""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import fsspec
import ml_dtypes
import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from mu2net.models.base import shape_signature
from mu2net.system import documents, layout, lease, records, task_index
from mu2net.system.documents import StoreConflict, StoreError
from mu2net.system.layout import FORMAT, MARKER, VERSION
from mu2net.system.names import validate_agent_name, validate_task_name
from mu2net.system.state import Component, StateError, System

__all__ = [
    "FORMAT",
    "MARKER",
    "VERSION",
    "Store",
    "StoreConflict",
    "StoreError",
    "decode_component",
    "encode_component",
    "flatten",
    "unflatten",
]
_MOMENTUM = "momentum::"
_BF16 = "::bf16"
_LEAF = "::leaf"
# Older names, kept for callers written before the layout module.
_sha256 = documents.sha256
_canonical = documents.canonical
_MANIFEST_RE = layout.MANIFEST_RE


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


class Store:
    """A system store at ``url`` (a local directory or any fsspec URL such as ``gs://``).

    Attributes:
      url: the URL it was opened with.
      leases: the shard leases this Store object holds, by agent (see :mod:`~.lease`).
      bytes_read: bytes read so far (every read is counted: tests and benchmarks use it).
      files_read: files read so far.
    """

    def __init__(self, url: str):
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.leases: dict[str, lease.ShardLease] = {}
        self.bytes_read = 0
        self.files_read = 0

    @property
    def location(self) -> str:
        """The store root as a full URL (the same for every Store opened on it)."""
        return self.fs.unstrip_protocol(self.root.rstrip("/"))

    # ------------------------------------------------------------------ file primitives
    def path_of(self, *parts: str) -> str:
        """The absolute path of a layout path (``layout.manifest_path(...)``, parts joined)."""
        return "/".join([self.root.rstrip("/"), *parts])

    def put_bytes(self, path: str, data: bytes) -> None:
        """Writes ``data`` to ``path`` once (create-exclusive).

        Raises:
          StoreConflict: ``path`` exists already (another writer got there first).
        """
        self._put(path, data)  # the one write path (tests hook it to inject crashes)

    def _put(self, path: str, data: bytes) -> None:
        self.fs.makedirs(os.path.dirname(path), exist_ok=True)
        if _is_local(self.fs):
            tmp = layout.tmp_name(path)
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
            try:
                os.link(tmp, path)  # fails if ``path`` exists: exclusive and atomic
            except FileExistsError:
                raise StoreConflict(f"{path} already exists (a concurrent writer?)") from None
            finally:
                os.unlink(tmp)
            return
        try:
            # A create-only object write: atomic on object stores (visible at close).
            with self.fs.open(path, "xb") as f:
                f.write(data)
        except FileExistsError:
            raise StoreConflict(f"{path} already exists (a concurrent writer?)") from None
        except (ValueError, NotImplementedError):  # this filesystem has no "xb" mode
            if self.fs.exists(path):
                raise StoreConflict(f"{path} already exists (a concurrent writer?)") from None
            tmp = layout.tmp_name(path)
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
            self.fs.mv(tmp, path)

    def get_bytes(self, path: str) -> bytes:
        """The bytes of ``path``; :class:`StoreError` naming it when it is missing."""
        try:
            with self.fs.open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise StoreError(f"{path}: file missing from the store") from None
        self.bytes_read += len(data)
        self.files_read += 1
        return data

    def exists(self, path: str) -> bool:
        """Whether ``path`` exists."""
        return self.fs.exists(path)

    def list_dir(self, path: str) -> list[str]:
        """Names (not paths) in folder ``path``, sorted; [] for a missing folder."""
        if not self.fs.exists(path):
            return []
        try:
            return sorted(os.path.basename(p.rstrip("/")) for p in self.fs.ls(path, detail=False))
        except FileNotFoundError:  # removed between the two calls
            return []

    def delete(self, path: str) -> None:
        """Removes ``path`` (only lease clean-up and tests remove anything)."""
        self.fs.rm(path)

    def document(self, body: Mapping[str, Any]) -> bytes:
        """``body`` as a store document (header + checksum): manifests, indexes, records."""
        return documents.encode(body)

    def read_document(self, path: str, kind: str) -> dict[str, Any]:
        """The verified body of the document at ``path`` (``kind`` names it in errors)."""
        return documents.decode(path, self.get_bytes(path), kind)

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(cls, url: str, system_name: str) -> Store:
        """Creates an empty store (refuses a directory that holds something else)."""
        validate_agent_name(system_name)
        store = cls(url)
        marker = store.path_of(MARKER)
        if store.exists(marker):
            raise StoreError(f"{marker}: a store already exists here")
        if [n for n in store.list_dir(store.root) if not layout.is_tmp(n)]:
            # (a temp file is what a run killed inside ``create`` leaves behind)
            raise StoreError(f"{store.root}: directory is not empty and is not a mu2net store")
        body = {"format": FORMAT, "version": VERSION, "system": system_name, "created": time.time()}
        store.put_bytes(marker, json.dumps(body, indent=1).encode())
        return store

    @classmethod
    def open(cls, url: str) -> Store:
        """Opens an existing store; a foreign or newer directory gives a clear error."""
        store = cls(url)
        store.info()
        return store

    def info(self) -> dict[str, Any]:
        """The store marker (format, version, system name)."""
        path = self.path_of(MARKER)
        if not self.exists(path):
            raise StoreError(
                f"{path}: not a mu2net store (marker missing); create it with `mu2net init`"
            )
        doc = documents.check_header(path, documents.parse_json(path, self.get_bytes(path)))
        if not isinstance(doc.get("system"), str):
            raise StoreError(f"{path}: store marker has no system name")
        return doc

    @property
    def system_name(self) -> str:
        """Name of the system held in this store."""
        return self.info()["system"]

    # ------------------------------------------------------------------ reading
    def shards(self) -> list[str]:
        """Agent names that have a shard directory."""
        return self.list_dir(self.path_of(layout.SHARDS))

    def manifest_seqs(self, agent: str) -> list[int]:
        """Committed sequence numbers of ``agent``'s shard, ascending."""
        names = self.list_dir(self.path_of(layout.shard_dir(agent)))
        return sorted(int(m.group(1)) for m in map(layout.MANIFEST_RE.match, names) if m)

    def manifest_path(self, agent: str, seq: int) -> str:
        """Absolute path of ``agent``'s manifest ``seq``."""
        return self.path_of(layout.manifest_path(agent, seq))

    _manifest_path = manifest_path  # older name, kept for existing callers

    def read_manifest(self, agent: str, seq: int) -> dict[str, Any]:
        """Reads and verifies one manifest (header, version, checksum, shape)."""
        path = self.manifest_path(agent, seq)
        body = self.read_document(path, "manifest")
        if body.get("agent") != agent:
            raise StoreError(f"{path}: manifest of agent {body.get('agent')!r} in shard {agent!r}")
        records.check_manifest(path, body)
        return body

    def latest_manifest(self, agent: str, on_corrupt: str = "raise") -> dict[str, Any] | None:
        """The newest readable manifest of ``agent`` (None for an empty shard).

        Args:
          agent: shard name.
          on_corrupt: "raise" (default) raises :class:`StoreError` naming the broken file;
            "previous" warns and falls back to the newest earlier manifest that verifies.
        """
        body, skipped = self._latest_readable(agent, on_corrupt)
        for err in skipped:
            warnings.warn(f"skipping broken state: {err}", stacklevel=2)
        return body

    def _latest_readable(
        self, agent: str, on_corrupt: str
    ) -> tuple[dict[str, Any] | None, list[StoreError]]:
        skipped = []
        for seq in reversed(self.manifest_seqs(agent)):
            try:
                return self.read_manifest(agent, seq), skipped
            except StoreError as e:
                if on_corrupt != "previous":
                    raise
                skipped.append(e)
        return None, skipped

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
        sources: dict[str, str] = {}  # path id -> the manifest that holds it
        skipped: list[StoreError] = []  # broken states "previous" fell back from
        loaded_seqs: dict[str, int] = {}  # agent -> the manifest seq this load read
        for agent in agents if agents is not None else self.shards():
            body, errors = self._latest_readable(agent, on_corrupt)
            for err in errors:
                warnings.warn(f"skipping broken state: {err}", stacklevel=2)
            skipped.extend(errors)
            if body is None:
                continue
            where = self.manifest_path(agent, body["seq"])
            loaded_seqs[agent] = int(body["seq"])
            for cid, rec in body["components"].items():
                if not cid.startswith(agent + "/"):
                    raise StoreError(
                        f"{where}: component {cid!r} does not belong to shard {agent!r}"
                    )
                system.add_component(self.component_from_record(agent, cid, rec))
            for pd in body["paths"]:
                path = records.path_from_record(where, pd)
                system.paths[path.id] = path
                sources[path.id] = where
            task_entries.extend((t["added"], t["task"], agent) for t in body["tasks"])
            for k, v in body["counters"].items():
                system.counters[k] = max(system.counters.get(k, 0), int(v))
        for _, task, agent in sorted(task_entries):
            if task not in system.tasks:
                system.tasks.append(validate_task_name(task))
                system.task_agents[task] = agent
        why = f"; skipped broken state(s): {'; '.join(map(str, skipped))}" if skipped else ""
        for p in system.paths.values():
            missing = [c for c in p.components.values() if c not in system.components]
            if missing:
                raise StoreError(
                    f"{sources[p.id]}: path {p.id} of task {p.task!r} references component(s) "
                    f"{missing} that no shard holds (missing or foreign shard){why}"
                )
            if agents is None and not p.is_root and p.task not in system.tasks:
                # Dropping the path would silently shrink the live mixture.
                raise StoreError(
                    f"{sources[p.id]}: path {p.id} is of task {p.task!r}, which no shard lists "
                    f"in the live mixture (a manifest lost its task entry){why}"
                )
        system.recompute_locks()
        _check_consistent(system, sources)
        if agents is None:
            self._check_indexed_tasks_have_paths(system, loaded_seqs)
        if not lazy:
            for c in system.components.values():
                c.params  # noqa: B018  (forces the read and checksum verification)
        return system

    def _check_indexed_tasks_have_paths(self, system: System, loaded_seqs: dict[str, int]) -> None:
        """A task with a task index had a published path, and paths are only ever replaced.

        Only indexes of commits this load read count: a concurrent agent may have committed
        the task's first path (and its index) after its manifest was read.
        """
        published = {p.task for p in system.task_paths()}
        for task in system.tasks:
            if task in published:
                continue
            names = self.list_dir(self.path_of(layout.task_dir(task)))
            matches = [m for m in map(layout.INDEX_RE.match, names) if m]
            owners = sorted(
                {m.group(1) for m in matches if int(m.group(2)) <= loaded_seqs.get(m.group(1), -1)}
            )
            if owners:
                files = [
                    self.manifest_path(a, max(self.manifest_seqs(a), default=0)) for a in owners
                ]
                raise StoreError(
                    f"{', '.join(files)}: inconsistent committed state: task {task!r} has task "
                    "indexes but no published path (a manifest lost its path)"
                )

    def load_task(self, task: str, on_corrupt: str = "raise", lazy: bool = True) -> System:
        """A system holding ``task``'s published path, for inference.

        Reads the task's index (one small file, whatever the number of tasks) instead of every
        shard's manifest; falls back to :meth:`load` for stores or commits without one. Params
        are read on first use unless ``lazy=False``. Raises :class:`StoreError` if the task has
        no published path.
        """
        system = task_index.load_task(self, task, on_corrupt=on_corrupt)
        where = task_index.find_index(self, task) or self.path_of(layout.SHARDS)
        _check_consistent(system, {p: where for p in system.paths})
        if not lazy:
            system.params_of(system.best_path(task))  # forces the reads and checksum checks
        return system

    def component_from_record(self, agent: str, cid: str, rec: Mapping[str, Any]) -> Component:
        """A committed component whose params are read (and verified) on first access.

        Args:
          agent: the shard holding its file.
          cid: the component id.
          rec: its store record (name, family, signature, num_params, file, sha256, ...).
        """
        file = self.path_of(layout.shard_file(agent, rec["file"]))

        def loader(c: Component, file=file, digest=rec["sha256"]) -> tuple[Any, Any]:
            what = f"component {c.id} ({c.name})"
            return self.read_component_file(file, digest, what, c.signature)

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

    def read_component_file(
        self, file: str, digest: str, what: str, signature: str | None = None
    ) -> tuple[Any, Any]:
        """Params and momentum of a component file, checked (see :func:`check_component_data`).

        Raises:
          StoreError: naming ``file``: missing, checksum mismatch, unreadable, non-finite, or
            shapes/dtypes other than ``signature``.
        """
        return check_component_data(file, self.get_bytes(file), digest, what, signature)

    def history(self, agents: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Candidate records of every committed state (in commit order per shard)."""
        out = []
        for agent in agents if agents is not None else self.shards():
            body = self.latest_manifest(agent, on_corrupt="previous")
            for name in (body or {}).get("history_files", []):
                path = self.path_of(layout.shard_file(agent, name))
                try:
                    out.extend(
                        json.loads(line) for line in self.get_bytes(path).splitlines() if line
                    )
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise StoreError(f"{path}: corrupt history ({e})") from None
        return out

    def verify(self) -> int:
        """Reads every component file of every shard and checks its checksum; returns the count.

        ``mu2net verify`` (:mod:`mu2net.system.verify`) does the full scrub.
        """
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

        Raises:
          LeaseLostError: this process held the shard's lease and another took it over.
          LeaseHeldError: another live process holds the shard's lease.
        """
        validate_agent_name(agent)
        self.info()
        lease.fence(self, agent)  # before writing anything: a refused commit leaves no files
        prev = self.latest_manifest(agent)
        if prev and not self.exists(self.path_of(layout.indexed_marker(agent, prev["seq"]))):
            # The last commit crashed before its task indexes: write them now (readers fall
            # back to the full load until then).
            all_tasks = {p["task"] for p in prev["paths"]}
            task_index.write_indexes(self, agent, prev, all_tasks, _records(system))
        seq = (prev["seq"] + 1) if prev else 0
        prev_components = dict(prev["components"]) if prev else {}
        comp_records, written = self._write_components(system, agent, seq, prev_components)
        history_files = list(prev.get("history_files", [])) if prev else []
        history = list(history)
        if history:
            name = layout.history_name(seq)
            lines = b"".join(documents.canonical(dict(h)) + b"\n" for h in history)
            self.put_bytes(self.path_of(layout.shard_file(agent, name)), lines)
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
            "components": comp_records,
            "paths": [p.to_json() for p in system.paths.values() if p.agent == agent],
            "tasks": tasks,
            "counters": {k: v for k, v in system.counters.items() if k.startswith(agent + ":")},
            "history_files": history_files,
        }
        lease.fence(self, agent)  # again: the lease may have been lost while params were written
        self.put_bytes(self.manifest_path(agent, seq), documents.encode(body))
        for c in written:
            c.committed = True
            c.record = {**comp_records[c.id], "shard": agent}
        task_index.write_indexes(
            self, agent, body, task_index.changed_tasks(prev, body), _records(system)
        )
        return seq

    def _write_components(
        self, system: System, agent: str, seq: int, prev_components: Mapping[str, Any]
    ) -> tuple[dict[str, Any], list[Component]]:
        """Writes the params of ``agent``'s newly used components; returns all records."""
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
            fname = layout.component_name(cid)
            self.put_bytes(self.path_of(layout.shard_file(agent, fname)), data)
            written.append(c)
            records[cid] = {
                "name": c.name,
                "family": c.family,
                "signature": c.signature,
                "num_params": c.num_params,
                "lineage": c.lineage,
                "file": fname,
                "sha256": documents.sha256(data),
                "bytes": len(data),
                "seq": seq,
            }
        for cid, rec in prev_components.items():
            # A committed component stays listed: another shard may share it even if this
            # agent no longer uses it (its params never change, so keeping it is free).
            records.setdefault(cid, rec)
        return records, written


def check_component_data(
    file: str, data: bytes, digest: str, what: str, signature: str | None = None
) -> tuple[Any, Any]:
    """Params and momentum decoded from ``data`` (the bytes of ``file``), checked.

    Args:
      file: the file ``data`` was read from (named in errors).
      data: its bytes.
      digest: the sha256 its record holds.
      what: the component, for messages.
      signature: the record's shape signature; the decoded params must have it.

    Raises:
      StoreError: naming ``file``: checksum mismatch, unreadable params, non-finite values, or
        shapes/dtypes other than the record's.
    """
    if documents.sha256(data) != digest:
        raise StoreError(f"{file}: checksum mismatch for {what}")
    try:
        params, mom = decode_component(data)
    except Exception as e:  # safetensors and numpy raise their own error types
        raise StoreError(f"{file}: unreadable params for {what} ({e})") from e
    for key, v in _flatten_any(params).items():
        # A published component never holds NaN/Inf (training refuses them): a file that
        # does is damaged even if its checksum was recomputed.
        if v.dtype.kind == "f" and not np.isfinite(v.astype(np.float32)).all():
            raise StoreError(f"{file}: non-finite values in {key!r} of {what}")
    if signature is not None and shape_signature(params) != signature:
        raise StoreError(f"{file}: params of {what} have other shapes/dtypes than its record")
    return params, mom


def _check_consistent(system: System, sources: Mapping[str, str]) -> None:
    """Raises :class:`StoreError` naming the files whose paths make ``system`` inconsistent.

    Each document verifies on its own, but together they may not agree (a path whose family is
    not its components', a head shared by two tasks): only a writer bug makes such a state,
    and loading it would silently change what a task runs (the fuzzer found one).
    """
    try:
        system.validate()
    except StateError as e:
        msg = str(e)

        def named(ids) -> set[str]:
            return {src for pid, src in sources.items() if any(_mentions(msg, i) for i in ids(pid))}

        culprits = sorted(
            named(lambda pid: [pid])  # the path the message names
            or named(lambda pid: system.paths[pid].components.values())  # e.g. a shared head
            or set(sources.values())
        )
        raise StoreError(f"{', '.join(culprits)}: inconsistent committed state: {msg}") from None


def _mentions(text: str, ident: str) -> bool:
    """Whether ``text`` names the id ``ident`` (not merely a longer id it prefixes)."""
    return re.search(re.escape(ident) + r"(?![0-9])", text) is not None


def _records(system: System) -> dict[str, dict[str, Any]]:
    """Store records (file, sha256, shard) of the system's committed components, by id."""
    return {cid: c.record for cid, c in system.components.items() if c.record is not None}


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")
