"""``mu2net verify``: scrub every file the latest state of a store references.

Loading checks what it reads, but a task that nobody loads can rot unseen (``mu2net status``
reads manifests only). :func:`verify_store` reads the marker, the latest manifest of every
shard, every component file those manifests list (size, sha256, safetensors header, finite
values), every history file, and the task index a reader would use for each published task;
it checks that every component a path references exists in some shard and that each task index
agrees with the manifests. Each fault names the file, says what is wrong and which tasks it
affects. With ``repair=True`` it rewrites what can be derived from the manifests -- task
indexes and their markers -- and never touches params or manifests.

Each run records its result under ``verify/`` (:func:`record_result`), so ``mu2net status``
can say when the store was last verified and with what result (:func:`last_result`).
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from collections.abc import Mapping
from typing import Any

from mu2net.system import layout, task_index
from mu2net.system.documents import StoreError
from mu2net.system.store import Store, check_component_data

KINDS = ("corrupt", "truncated", "missing", "dangling", "stale-index", "unreadable")


@dataclasses.dataclass
class Fault:
    """One thing wrong with one file.

    Attributes:
      file: the file (absolute path in the store).
      kind: one of :data:`KINDS`.
      detail: what is wrong, one line.
      tasks: the tasks whose published path it affects.
      repairable: whether ``--repair`` can rewrite it (task indexes only).
    """

    file: str
    kind: str
    detail: str
    tasks: list[str]
    repairable: bool = False

    def line(self) -> str:
        """The fault as one printable line."""
        tasks = ", ".join(self.tasks) if self.tasks else "none"
        fix = " [repairable: --repair]" if self.repairable else ""
        return f"{self.kind}: {self.file}: {self.detail} (tasks affected: {tasks}){fix}"


@dataclasses.dataclass
class Report:
    """What one verify run found."""

    faults: list[Fault] = dataclasses.field(default_factory=list)
    files: int = 0
    bytes: int = 0
    shards: int = 0
    tasks: int = 0
    components: int = 0
    seconds: float = 0.0
    repaired: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no fault was found."""
        return not self.faults

    def summary(self) -> str:
        """One line: counts, time and result."""
        result = "OK" if self.ok else f"{len(self.faults)} fault(s)"
        return (
            f"verified {self.shards} shard(s), {self.tasks} task(s), {self.components} "
            f"component(s): {self.files} file(s), {self.bytes:,} bytes in {self.seconds:.2f} s: "
            f"{result}"
        )


def _kind(err: StoreError) -> str:
    msg = str(err)
    if "missing" in msg:
        return "missing"
    if "checksum" in msg or "corrupt" in msg:
        return "corrupt"
    if "truncated" in msg:
        return "truncated"
    return "unreadable"


class _Scrub:
    """The state of one verify run (one job per method)."""

    def __init__(self, store: Store):
        self.store = store
        self.report = Report()
        self.bodies: dict[str, dict[str, Any]] = {}  # agent -> latest readable manifest body
        self.users: dict[str, set[str]] = {}  # component id -> tasks whose path uses it

    def fault(self, file: str, kind: str, detail: str, tasks, repairable=False) -> None:
        self.report.faults.append(Fault(file, kind, detail, sorted(set(tasks)), repairable))

    def read(self, path: str) -> bytes:
        return self.store.get_bytes(path)  # the store counts files and bytes read

    def manifests(self) -> None:
        for agent in self.store.shards():
            seqs = self.store.manifest_seqs(agent)
            if not seqs:
                continue
            self.report.shards += 1
            path = self.store.manifest_path(agent, seqs[-1])
            try:
                self.bodies[agent] = self.store.read_manifest(agent, seqs[-1])
                continue
            except StoreError as e:
                err = e
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the fault below says it, once
                body = self.store.latest_manifest(agent, on_corrupt="previous")
            tasks = [p["task"] for p in (body or {}).get("paths", []) if not p["is_root"]]
            self.fault(path, _kind(err), str(err).replace(f"{path}: ", ""), tasks)
            if body is not None:
                self.bodies[agent] = body  # go on scrubbing what readers fall back to

    def references(self) -> None:
        known = {cid for body in self.bodies.values() for cid in body["components"]}
        listed = {t["task"] for body in self.bodies.values() for t in body["tasks"]}
        for agent, body in self.bodies.items():
            where = self.store.manifest_path(agent, body["seq"])
            for pd in body["paths"]:
                if not pd["is_root"]:
                    self.report.tasks += 1
                    if pd["task"] not in listed:
                        detail = f"path {pd['id']} is of task {pd['task']!r}, which no shard lists"
                        self.fault(where, "dangling", detail, [pd["task"]])
                for cid in pd["components"].values():
                    self.users.setdefault(cid, set()).add(pd["task"])
                    if cid not in known:
                        self.fault(
                            where,
                            "dangling",
                            f"path {pd['id']} references component {cid!r} that no shard holds",
                            [pd["task"]],
                        )

    def consistency(self) -> None:
        """Documents that verify one by one but disagree (a writer bug): what load refuses."""
        if self.report.faults:
            return  # the merged load would stop at the broken file reported already
        try:
            self.store.load()
        except StoreError as e:
            files, sep, detail = str(e).partition(": inconsistent committed state: ")
            if not sep:  # any other refusal of the merged load: still a fault, never a crash
                file, _, detail = str(e).partition(": ")
                self.fault(file, "unreadable", detail, [])
                return
            by_file = {self.store.manifest_path(a, b["seq"]): b for a, b in self.bodies.items()}
            for file in files.split(", "):
                paths = by_file.get(file, {}).get("paths", [])
                tasks = [pd["task"] for pd in paths if not pd["is_root"] and pd["id"] in detail]
                self.fault(file, "dangling", f"inconsistent with the other files: {detail}", tasks)

    def components(self) -> None:
        for agent, body in self.bodies.items():
            for cid, rec in body["components"].items():
                self.report.components += 1
                file = self.store.path_of(layout.shard_file(agent, rec["file"]))
                tasks = self.users.get(cid, set())
                try:
                    data = self.read(file)
                except StoreError:
                    self.fault(file, "missing", f"file of component {cid} is missing", tasks)
                    continue
                size = rec.get("bytes")
                if isinstance(size, int) and len(data) != size:
                    kind = "truncated" if len(data) < size else "corrupt"
                    detail = f"{len(data)} bytes, its manifest says {size} (component {cid})"
                    self.fault(file, kind, detail, tasks)
                    continue
                try:
                    check_component_data(
                        file, data, rec["sha256"], f"component {cid}", rec.get("signature")
                    )
                except StoreError as e:
                    self.fault(file, _kind(e), str(e).replace(f"{file}: ", ""), tasks)

    def histories(self) -> None:
        for agent, body in self.bodies.items():
            for name in body["history_files"]:
                path = self.store.path_of(layout.shard_file(agent, name))
                try:
                    for line in self.read(path).splitlines():
                        if line:
                            json.loads(line)
                except StoreError:
                    self.fault(path, "missing", "history file is missing", [])
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    self.fault(path, "corrupt", f"history is not JSON lines ({e})", [])


def _expected_index(
    bodies: Mapping[str, Mapping[str, Any]], agent: str, pd: Mapping[str, Any]
) -> dict[str, Any]:
    """The components part of the index a commit writes for path ``pd`` of ``agent``."""
    comps = {}
    for cid in pd["components"].values():
        shard = cid.split("/", 1)[0]
        rec = bodies.get(shard, {}).get("components", {}).get(cid)
        if rec is not None:
            comps[cid] = {**rec, "shard": shard}
    return comps


def _check_indexes(scrub: _Scrub) -> list[tuple[str, Mapping[str, Any], str | None]]:
    """Faults of the task indexes readers would use; returns (agent, path, bad file) to fix."""
    store, todo = scrub.store, []
    for agent, body in scrub.bodies.items():
        marker = store.path_of(layout.indexed_marker(agent, body["seq"]))
        for pd in body["paths"]:
            if pd["is_root"]:
                continue
            task = pd["task"]
            known = {c for b in scrub.bodies.values() for c in b["components"]}
            if not set(pd["components"].values()) <= known:
                continue  # a dangling reference, reported as such: no index can be right
            path = task_index.find_index(store, task)
            if path is None:
                if store.exists(marker):  # the commit says its indexes exist: one is lost
                    detail = "no usable task index although the commit's marker says it exists"
                    scrub.fault(store.path_of(layout.task_dir(task)), "stale-index", detail,
                                [task], True)  # fmt: skip
                    todo.append((agent, pd, None))
                continue
            try:
                entry = store.read_document(path, "task index")
            except StoreError as e:
                scrub.fault(path, _kind(e), str(e).replace(f"{path}: ", ""), [task], True)
                todo.append((agent, pd, path))
                continue
            want = _expected_index(scrub.bodies, agent, pd)
            if entry.get("path") != pd or entry.get("components") != want:
                detail = "task index disagrees with the manifest (readers would serve it)"
                scrub.fault(path, "stale-index", detail, [task], True)
                todo.append((agent, pd, path))
    return todo


def _repair(scrub: _Scrub, todo) -> list[str]:
    """Rewrites the indexes in ``todo`` at their shard's latest commit; returns the files."""
    store, done = scrub.store, []
    foreign = {
        cid: {**rec, "shard": agent}
        for agent, body in scrub.bodies.items()
        for cid, rec in body["components"].items()
    }
    for agent, pd, bad in todo:
        body = scrub.bodies[agent]
        target = task_index.index_path(store, pd["task"], agent, body["seq"])
        for stale in {bad, target} - {None}:
            if store.exists(stale):
                store.delete(stale)  # derived data: the manifest holds the truth
        task_index.write_indexes(store, agent, body, {pd["task"]}, foreign)
        done.append(target)
    return done


def verify_store(store: Store, repair: bool = False) -> Report:
    """Scrubs every file the latest state of ``store`` references.

    Args:
      store: an opened store.
      repair: rewrite broken, stale or lost task indexes (nothing else), then verify again.

    Returns:
      The :class:`Report`; ``report.ok`` is False on any fault (after repair: any left).
    """
    t0, files0, bytes0 = time.time(), store.files_read, store.bytes_read
    scrub = _Scrub(store)
    try:
        scrub.read(store.path_of(layout.MARKER))
        store.info()
    except StoreError as e:
        scrub.fault(store.path_of(layout.MARKER), _kind(e), str(e), [])
        scrub.report.seconds = time.time() - t0
        return scrub.report
    scrub.manifests()
    scrub.references()
    scrub.consistency()
    scrub.components()
    scrub.histories()
    todo = _check_indexes(scrub)
    if repair and todo:
        repaired = _repair(scrub, todo)
        report = verify_store(store, repair=False)
        report.repaired = repaired
        report.seconds = time.time() - t0
        return report
    scrub.report.seconds = time.time() - t0
    scrub.report.files = store.files_read - files0
    scrub.report.bytes = store.bytes_read - bytes0
    return scrub.report


def record_result(store: Store, report: Report) -> str:
    """Writes ``report``'s summary under ``verify/`` (write-once); returns the file."""
    body = {
        "finished": time.time(),
        "seconds": report.seconds,
        "ok": report.ok,
        "faults": len(report.faults),
        "by_kind": {k: sum(f.kind == k for f in report.faults) for k in KINDS},
        "files": report.files,
        "bytes": report.bytes,
        "tasks": report.tasks,
        "repaired": len(report.repaired),
        "first_faults": [f.line() for f in report.faults[:20]],
    }
    path = store.path_of(layout.verify_record(body["finished"]))
    store.put_bytes(path, store.document(body))
    return path


def last_result(store: Store) -> dict[str, Any] | None:
    """The newest recorded verify result (None if the store was never verified)."""
    folder = store.path_of(layout.VERIFY)
    for name in reversed(store.list_dir(folder)):
        if layout.VERIFY_RE.match(name):
            try:
                return store.read_document(f"{folder}/{name}", "verify record")
            except StoreError:
                continue  # a damaged record says nothing about the store: try the one before
    return None
