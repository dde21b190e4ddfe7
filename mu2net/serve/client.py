"""Python client of ``mu2net serve`` (standard library HTTP, one keep-alive connection per thread).

Example::

    from mu2net.serve.client import Client

    client = Client("http://127.0.0.1:8000")
    print(client.tasks())
    answer = client.predict("mu2net:digits", images=["three.png"])
    print(answer.path_id, answer.classes, answer.probabilities.max(-1))
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import json
import os
import threading
import urllib.parse
from collections.abc import Sequence
from typing import Any

import numpy as np

from mu2net.serve.errors import ServeError
from mu2net.serve.inputs import NPY_CONTENT_TYPE, npy_bytes


class ServeClientError(ServeError):
    """An error answer of the server (``status`` holds the HTTP status)."""

    def __init__(self, status: int, message: str, body: dict[str, Any] | None = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.body = body or {}


@dataclasses.dataclass
class Prediction:
    """One answer: the path that answered, labels, class names and probabilities."""

    task: str
    path_id: str
    labels: np.ndarray
    classes: list[str]
    probabilities: np.ndarray


class Client:
    """Talks to one server; safe to share between threads.

    Args:
        url: the server, e.g. ``http://127.0.0.1:8000`` (or an application's prefix under it,
            ``http://127.0.0.1:8000/other``).
        timeout: seconds per request.
    """

    def __init__(self, url: str = "http://127.0.0.1:8000", timeout: float = 60.0):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ServeError(f"server URL {url!r}: expected http://HOST:PORT")
        self.url = url.rstrip("/")
        self._host, self._port = parts.hostname, parts.port or 80
        self._prefix = parts.path.rstrip("/")
        self.timeout = timeout
        self._local = threading.local()

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
            self._local.conn = conn
        return conn

    def request(
        self,
        method: str,
        route: str,
        body: bytes | None = None,
        task: str | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        """The JSON answer of ``method route``; raises :class:`ServeClientError` on non-200.

        ``task`` is sent as Serve's multiplexed model id, so the proxy routes the request
        straight to a replica that holds the task's path.
        """
        headers = {"Content-Type": content_type} if body is not None else {}
        if task is not None:
            headers["serve-multiplexed-model-id"] = task
        for attempt in (0, 1):  # a keep-alive connection the server closed: reconnect once
            conn = self._conn()
            try:
                conn.request(method, self._prefix + route, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                conn.close()
                self._local.conn = None
                if attempt:
                    raise
        try:
            doc = json.loads(data) if data else {}
        except json.JSONDecodeError:
            doc = {"error": data[:200].decode("utf-8", "replace")}
        if resp.status != 200:
            msg = doc.get("error") or doc.get("detail") or str(doc)[:200]
            raise ServeClientError(resp.status, str(msg), doc)
        return doc

    def healthz(self) -> bool:
        """Whether the server answers."""
        return self.request("GET", "/healthz").get("status") == "ok"

    def tasks(self) -> list[dict[str, Any]]:
        """Tasks with a published path (path id, family, quality, params)."""
        return self.request("GET", "/v1/tasks")["tasks"]

    def stats(self) -> dict[str, Any]:
        """One replica's component cache and loaded paths."""
        return self.request("GET", "/v1/stats")

    def predict(
        self,
        task: str,
        *,
        images: Sequence[bytes | str] | None = None,
        texts: Sequence[str] | None = None,
        inputs: np.ndarray | None = None,
    ) -> Prediction:
        """Predicts with ``task``'s path on images (bytes or file names), texts or a batch."""
        given = [k for k, v in (("images", images), ("texts", texts), ("inputs", inputs))
                 if v is not None]  # fmt: skip
        if len(given) != 1:
            raise ServeError(f"give exactly one of images, texts, inputs (got {given})")
        if inputs is not None:
            return self.predict_body(task, npy_bytes(np.asarray(inputs)), NPY_CONTENT_TYPE)
        if images is not None:
            body = {"images": [base64.b64encode(_bytes(i)).decode("ascii") for i in images]}
        else:
            body = {"texts": list(texts)}
        return self.predict_body(task, json.dumps(body).encode())

    def predict_body(
        self, task: str, body: bytes, content_type: str = "application/json"
    ) -> Prediction:
        """Sends a ready body: JSON, or ``.npy`` bytes as ``application/x-npy``.

        See :mod:`mu2net.serve.inputs` for what a body holds.
        """
        route = f"/v1/tasks/{urllib.parse.quote(task, safe=':')}:predict"
        doc = self.request("POST", route, body, task=task, content_type=content_type)
        return Prediction(
            task=doc["task"],
            path_id=doc["path_id"],
            labels=np.asarray(doc["labels"], np.int64),
            classes=list(doc["classes"]),
            probabilities=np.asarray(doc["probabilities"], np.float32),
        )

    def close(self) -> None:
        """Closes this thread's connection."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def _bytes(image: bytes | str) -> bytes:
    if isinstance(image, bytes):
        return image
    if not os.path.exists(image):
        raise ServeError(f"{image}: no such image file")
    with open(image, "rb") as f:
        return f.read()
