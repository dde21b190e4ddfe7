"""Store errors and the JSON document format shared by manifests, indexes, leases and records.

A document is ``{"format", "version", "sha256", "body"}`` where ``sha256`` is the digest of the
canonical JSON of ``body``; readers check all four. This module sits below the store, the task
indexes, the leases and verify, so each of them can raise the same errors without importing
the others.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from mu2net.errors import Mu2netError
from mu2net.system.layout import FORMAT, VERSION


class StoreError(Mu2netError, RuntimeError):
    """A store that cannot be read or written; the message names the file."""


class StoreConflict(StoreError):
    """Another writer published the same file first (a write-once name already exists)."""


def sha256(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def canonical(body: Mapping[str, Any]) -> bytes:
    """The canonical JSON bytes of ``body`` (sorted keys, no spaces) that checksums cover."""
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def encode(body: Mapping[str, Any]) -> bytes:
    """``body`` wrapped with the store's header and its checksum."""
    doc = {"format": FORMAT, "version": VERSION, "sha256": sha256(canonical(body))}
    return json.dumps({**doc, "body": body}, indent=1).encode()


def parse_json(path: str, data: bytes) -> dict[str, Any]:
    """The JSON object in ``data``; :class:`StoreError` naming ``path`` otherwise."""
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise StoreError(f"{path}: corrupt or truncated JSON ({e})") from None
    if not isinstance(doc, dict):
        raise StoreError(f"{path}: not a mu2net document (top level is not an object)")
    return doc


def check_header(path: str, doc: Mapping[str, Any]) -> dict[str, Any]:
    """``doc`` if its format is ours and its version one this code reads."""
    if doc.get("format") != FORMAT:
        raise StoreError(
            f"{path}: foreign file (format {doc.get('format')!r}, expected {FORMAT!r})"
        )
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version > VERSION:
        raise StoreError(
            f"{path}: format version {version!r} is newer than this mu2net "
            f"reads (<= {VERSION}); upgrade mu2net"
        )
    return dict(doc)


def decode(path: str, data: bytes, kind: str) -> dict[str, Any]:
    """The verified body of a document read from ``path`` (``kind`` names it in errors)."""
    doc = check_header(path, parse_json(path, data))
    body = doc.get("body")
    if not isinstance(body, dict) or doc.get("sha256") != sha256(canonical(body)):
        raise StoreError(f"{path}: {kind} checksum mismatch (file corrupted)")
    return body
