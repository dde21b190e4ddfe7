"""The Ray Serve application: every task of a live system behind one HTTP JSON API.

One deployment, ``TaskServer``, a FastAPI ingress that Serve's HTTP proxy calls directly. The
client names the task in the ``serve-multiplexed-model-id`` header as well as in the route, so
Ray routes a task's requests to replicas that already hold its path (Serve model
multiplexing); a request without the header is answered by any replica, which loads the path.
Each replica holds a :class:`~mu2net.serve.predictor.PredictorPool` (one component cache per
replica, LRU bounds on paths and bytes), batches requests per task (``serve.batch`` splits
batches by model id) and refreshes loaded tasks every ``refresh_s`` seconds, so a newly
published path answers within ``refresh_s`` plus its load time, without a restart.

Routes: ``POST /v1/tasks/{task}:predict`` (body: :mod:`mu2net.serve.inputs`), ``GET /v1/tasks``,
``GET /v1/stats`` (one replica's cache), ``GET /healthz``.
"""

import asyncio
import dataclasses
import importlib
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from mu2net.errors import Mu2netError
from mu2net.serve.errors import PayloadTooLarge, ServeError, UnknownTaskError
from mu2net.serve.inputs import parse_body
from mu2net.serve.predictor import PredictorPool, TaskPredictor, softmax
from mu2net.system.names import NameError_
from mu2net.system.store import Store

log = logging.getLogger("mu2net.serve")
APP_NAME = "mu2net"


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Settings of one serving application (flags of ``mu2net serve``).

    Attributes:
        store: the store URL (local path, ``file://``, ``gs://``...).
        host: address the HTTP proxy binds (127.0.0.1 by default: local only).
        port: HTTP port.
        replicas: ``TaskServer`` replicas.
        max_paths: paths held per replica (LRU; also Ray's models per replica).
        max_bytes: bytes of cached components per replica before paths are dropped (None: no
            bound besides ``max_paths``).
        max_batch_size: requests batched together per task.
        batch_wait_s: how long a batch waits for more requests.
        chunk_size: examples per compiled forward pass (batches are padded to a multiple).
        refresh_s: how often loaded tasks are checked for a newly published path.
        max_body_bytes: larger request bodies get 413.
        max_examples: more examples in one request get 413.
        modules: Python modules each replica imports first (user families, tasks).
    """

    store: str
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    max_paths: int = 64
    max_bytes: int | None = None
    max_batch_size: int = 16
    batch_wait_s: float = 0.002
    chunk_size: int = 16
    refresh_s: float = 2.0
    max_body_bytes: int = 16 << 20
    max_examples: int = 1024
    modules: tuple[str, ...] = ()


def status_of(error: BaseException) -> int:
    """The HTTP status of an error raised while answering."""
    if isinstance(error, ServeError):
        return error.status
    if isinstance(error, NameError_):
        return 404  # no task of that name can exist
    return 500


def _error(error: BaseException) -> dict[str, Any]:
    if not isinstance(error, Mu2netError):
        log.exception("bug while answering a request", exc_info=error)
    return {"status": status_of(error), "error": f"{type(error).__name__}: {error}"}


def _answer(pred: TaskPredictor, labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    names = pred.class_names
    return {
        "status": 200,
        "task": pred.task,
        "path_id": pred.path_id,
        "labels": [int(k) for k in labels],
        "classes": [names[k] if k < len(names) else str(int(k)) for k in labels],
        "probabilities": probs.tolist(),
    }


def _inputs(pred: TaskPredictor, raw: Mapping[str, Any]) -> np.ndarray:
    if "inputs" in raw:
        return pred.check(raw["inputs"])
    return pred.check(pred.prepare(raw.get("images") or raw.get("texts")))


def _run_groups(
    preds: Sequence[TaskPredictor], xs: Sequence[np.ndarray]
) -> list[tuple[np.ndarray, np.ndarray]]:
    out: list[Any] = [None] * len(preds)
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(preds):  # a path swap mid-batch: each request keeps its snapshot
        groups.setdefault(id(p), []).append(i)
    for idx in groups.values():
        pred = preds[idx[0]]
        logits = pred.predict_logits(np.concatenate([xs[i] for i in idx]))
        probs = softmax(logits)
        start = 0
        for i in idx:
            n = len(xs[i])
            p = probs[start : start + n]
            out[i] = (p.argmax(-1), p)
            start += n
    return out


def _json(doc: dict[str, Any]) -> JSONResponse:
    return JSONResponse(doc, status_code=int(doc.get("status", 200)))


def _describe_tasks(store: Store) -> dict[str, dict[str, Any]]:
    system = store.load()
    out = {}
    for path in system.task_paths():
        out[path.task] = {
            "task": path.task,
            "path_id": path.id,
            "family": path.family,
            "quality": path.metrics.get("quality"),
            "params": system.path_params(path),
            "accounted_params": system.accounted_params(path),
            "class_names": list(path.metrics.get("class_names") or []),
        }
    return out


class TaskListing:
    """The tasks with a published path, reread from the store when older than asked for."""

    def __init__(self, store: Store):
        self.store = store
        self._tasks: dict[str, dict[str, Any]] = {}
        self._loaded_at = -1e9
        self._lock = asyncio.Lock()
        self._refresh: asyncio.Future | None = None

    async def _reload(self, max_age: float) -> dict[str, dict[str, Any]]:
        async with self._lock:
            if time.monotonic() - self._loaded_at > max_age:
                self._tasks = await asyncio.to_thread(_describe_tasks, self.store)
                self._loaded_at = time.monotonic()
            return self._tasks

    async def get(self, max_age: float, wait: bool = False) -> dict[str, dict[str, Any]]:
        """The listing, at most ``max_age`` old when ``wait`` (or on the first call).

        Otherwise a stale listing is returned at once and reloaded in the background: the
        reload reads every shard's manifest, which must not stall the requests waiting on it.
        """
        if time.monotonic() - self._loaded_at <= max_age:
            return self._tasks
        if wait or self._loaded_at < 0:
            return await self._reload(max_age)
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.ensure_future(self._reload(max_age))
        return self._tasks


class TaskServerBase:
    """A replica's work behind the routes that :func:`_ingress_class` adds.

    It holds the predictors of the tasks it was asked for, refreshed in the background, and
    the task listing.
    """

    def __init__(self, config: Mapping[str, Any]):
        self.config = ServeConfig(**config)
        for module in self.config.modules:
            importlib.import_module(module)
        import jax

        self.pool = PredictorPool(
            self.config.store,
            max_paths=self.config.max_paths,
            max_bytes=self.config.max_bytes,
            chunk_size=self.config.chunk_size,
            to_device=jax.device_put,
        )
        self.listing = TaskListing(Store.open(self.config.store))
        self._stop = threading.Event()
        threading.Thread(target=self._refresh_loop, daemon=True, name="mu2net-refresh").start()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.config.refresh_s):
            try:
                changed = self.pool.refresh()
                if changed:
                    log.info("new published paths for %s", changed)
            except Exception as e:  # noqa: BLE001 - the current paths keep answering
                log.warning("refresh failed (current paths keep answering): %s", e)

    async def get_task(self, task: str) -> str:
        """Loads ``task``'s path into this replica (wrapped by ``serve.multiplexed``)."""
        await asyncio.to_thread(self.pool.get, task)
        return task

    async def run_batch(
        self, preds: list[TaskPredictor], xs: list[np.ndarray]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """One forward pass per predictor snapshot over the batched requests of one task."""
        return await asyncio.to_thread(_run_groups, preds, xs)

    async def answer(
        self, task: str, body: bytes, content_type: str | None = None
    ) -> dict[str, Any]:
        """The answer (or error) of one request, as a dict with an HTTP ``status``."""
        try:
            tasks = await self.listing.get(self.config.refresh_s)
            if task not in tasks:
                tasks = await self.listing.get(0.5, wait=True)  # a task added since the listing
            if task not in tasks:
                known = sorted(tasks)
                msg = f"task {task!r} has no published path in {self.config.store}; known: {known}"
                return {**_error(UnknownTaskError(msg)), "known_tasks": known}
            await self.get_task(task)
            pred = await asyncio.to_thread(self.pool.get, task)  # one snapshot per request
            raw = parse_body(body, self.config.max_examples, content_type)
            x = await asyncio.to_thread(_inputs, pred, raw)
            labels, probs = await self.run_batch(pred, x)
            return _answer(pred, labels, probs)
        except Exception as e:  # noqa: BLE001 - every error becomes an HTTP answer
            return _error(e)

    async def predict_request(self, task: str, request: Request) -> JSONResponse:
        """The HTTP answer of ``POST /v1/tasks/{task}:predict`` (body size checked first)."""
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            return _json(_error(PayloadTooLarge(f"body of {declared} bytes; limit {limit}")))
        body = await request.body()
        if len(body) > limit:
            return _json(_error(PayloadTooLarge(f"body of {len(body)} bytes; limit {limit}")))
        return _json(await self.answer(task, body, request.headers.get("content-type")))

    def __del__(self) -> None:
        self._stop.set()


def _ingress_class(config: ServeConfig) -> type:
    """The replica class of one application, with its own FastAPI routes.

    Built per application: ``serve.ingress`` rewrites the routes of the FastAPI app it is
    given, so two applications (``deploy`` beside ``start``) must not share one.
    """
    api = FastAPI(title="mu2net", description="Every task of one live mu2net system.")

    class TaskServer(TaskServerBase):
        get_task = serve.multiplexed(max_num_models_per_replica=config.max_paths)(
            TaskServerBase.get_task
        )
        run_batch = serve.batch(
            max_batch_size=config.max_batch_size, batch_wait_timeout_s=config.batch_wait_s
        )(TaskServerBase.run_batch)

        @api.get("/healthz")
        async def healthz(self) -> dict[str, str]:
            """Liveness: the replica answers."""
            return {"status": "ok"}

        @api.get("/v1/tasks")
        async def tasks(self) -> dict[str, Any]:
            """Tasks with a published path: path id, family, quality, params."""
            tasks = await self.listing.get(self.config.refresh_s, wait=True)
            return {"tasks": list(tasks.values())}

        @api.get("/v1/stats")
        async def replica_stats(self) -> dict[str, Any]:
            """One replica's component cache and loaded paths."""
            return self.pool.stats()

        @api.post("/v1/tasks/{task}:predict")
        async def predict(self, task: str, request: Request) -> JSONResponse:
            """Labels, class names and probabilities of ``task``'s path, and the path id."""
            return await self.predict_request(task, request)

    return serve.ingress(api)(TaskServer)


def build_app(config: ServeConfig) -> Any:
    """The bound Ray Serve application for ``config`` (run it with ``serve.run``)."""
    server = serve.deployment(
        _ingress_class(config),
        name="TaskServer",
        num_replicas=config.replicas,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=max(256, 4 * config.max_batch_size),
    )
    return server.bind(dataclasses.asdict(config))


def start(config: ServeConfig, ray_address: str | None = None, timeout_s: float = 300.0) -> str:
    """Starts (local) Ray and Serve bound to ``config.host`` and runs the app; returns its URL.

    Without ``ray_address`` a local Ray is started on 127.0.0.1 with no dashboard.
    """
    import ray

    Store.open(config.store).info()  # a wrong URL fails here, in one line
    if not ray.is_initialized():
        if ray_address:
            ray.init(address=ray_address, include_dashboard=False, log_to_driver=False)
        else:
            _init_local_ray()
    serve.start(http_options={"host": config.host, "port": config.port})
    return deploy(config, timeout_s=timeout_s)


def deploy(
    config: ServeConfig, name: str = APP_NAME, route_prefix: str = "/", timeout_s: float = 300.0
) -> str:
    """Runs the app for ``config`` on the running Serve under ``route_prefix``; returns its URL.

    Several stores can be served side by side, each as its own application (``name``) under
    its own prefix; :class:`~mu2net.serve.client.Client` takes the prefixed URL.
    """
    serve.run(build_app(config), name=name, route_prefix=route_prefix, blocking=False)
    url = f"http://{config.host}:{config.port}{route_prefix.rstrip('/')}"
    _wait_healthy(url, timeout_s)
    return url


def _init_local_ray(attempts: int = 3) -> None:
    """A local Ray on 127.0.0.1 without dashboard; retried (a loaded machine can time out)."""
    import ray

    os.environ.setdefault("RAY_worker_niceness", "0")  # nice'd replicas starve under load
    os.environ.setdefault("RAY_agent_register_timeout_ms", "120000")
    for attempt in range(attempts):
        try:
            ray.init(
                address="local",
                include_dashboard=False,
                log_to_driver=False,
                logging_level="WARNING",
                _node_ip_address="127.0.0.1",
                num_cpus=max(4, os.cpu_count() or 1),
                object_store_memory=256 * 2**20,
            )
            return
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception on a slow start
            ray.shutdown()
            if attempt == attempts - 1 or "timed out during startup" not in str(e):
                raise ServeError(f"local Ray did not start: {e}") from e
            log.warning("local Ray start timed out (attempt %d); retrying", attempt + 1)


def _wait_healthy(url: str, timeout_s: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise ServeError(f"{url}/healthz did not answer within {timeout_s:.0f} s")
        time.sleep(0.2)


def stop() -> None:
    """Shuts down the Serve application and the Ray this process started."""
    import ray

    try:
        serve.shutdown()
    finally:
        ray.shutdown()
