"""One writer per shard: a lease object in the store, renewed while its holder runs.

A lease is a sequence of write-once objects ``leases/<agent>/lease-<gen>.json`` (see
:mod:`mu2net.system.layout`); the one with the highest generation is current. Its body names the
holder (owner, host, pid, a random token) and its expiry. Every state change creates the *next*
generation with the store's create-exclusive primitive (:meth:`Store.put_bytes`):

* **acquire**: the current generation is absent, released or expired -> create ``gen + 1``;
* **renew** (a daemon thread, every ``ttl/3``): the holder creates ``gen + 1`` with a new expiry;
* **take over**: another process creates ``gen + 1`` once the holder's expiry has passed;
* **release**: the holder creates ``gen + 1`` marked released.

Why numbered write-once objects rather than one lease file rewritten in place: the only
primitive that is atomic on a local disk (``os.link`` of a temp file: fails if the name
exists) and on object stores (a create-only write, e.g. GCS ``ifGenerationMatch=0`` or S3
``If-None-Match``, which fsspec exposes as mode ``"xb"``) is "create this name unless it
exists". With it, a renewal and a takeover that race both try to create the same next
generation and exactly one wins, so the loser learns at once that it lost (a rewrite in place
would let both believe they hold the lease). Old generations are deleted by the holder (it
keeps the last two), so a listing stays small.

Fencing: :func:`fence` runs inside ``Store.commit`` before any file is written and again just
before the manifest: a holder whose lease was taken over gets :class:`LeaseLostError`; a process
that holds no lease for a shard with a live lease gets :class:`LeaseHeldError`; with no lease
anywhere a commit goes ahead as before leases existed. Expiry uses the holder's wall clock, so
hosts sharing a store need clocks within a fraction of the TTL (NTP is enough for the 30 s
default). A holder paused for longer than the TTL between its last check and its manifest write
can still land that one manifest (no storage offers fencing tokens); it is refused from the next
commit on, and the taker, which reloads the store, sees it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from mu2net.system import documents, layout
from mu2net.system.documents import StoreConflict, StoreError
from mu2net.system.names import validate_agent_name

log = logging.getLogger(__name__)

_HELD: dict[tuple[str, str], ShardLease] = {}  # (store location, agent) -> lease held here
_AUTO: dict[str, tuple[float, list[ShardLease]]] = {}  # store location -> auto-lease policy
_HELD_LOCK = threading.Lock()
_MAX_RACES = 100  # consecutive lost creates before giving up (each means progress by another)


class LeaseHeldError(StoreError):
    """Another live process holds the shard's lease (the message names it)."""


class LeaseLostError(StoreError):
    """The lease of this process was taken over (it expired while the process was stalled)."""


def current(store: Any, agent: str) -> tuple[int, dict[str, Any] | None]:
    """The current lease generation of ``agent``'s shard and its body (-1, None: never leased).

    An unreadable current object (only outside damage can cause one: every write is atomic)
    counts as expired, so a shard can never be locked forever by a broken file.
    """
    for _ in range(_MAX_RACES):
        names = store.list_dir(store.path_of(layout.lease_dir(agent)))
        gens = sorted(int(m.group(1)) for m in map(layout.LEASE_RE.match, names) if m)
        if not gens:
            return -1, None
        path = store.path_of(layout.lease_path(agent, gens[-1]))
        try:
            return gens[-1], documents.decode(path, store.get_bytes(path), "lease")
        except FileNotFoundError:
            continue  # deleted by its holder's clean-up after our listing: list again
        except StoreError as e:
            if "file missing" in str(e):
                continue
            log.warning("treating an unreadable lease as expired: %s", e)
            return gens[-1], None
    raise StoreError(f"{store.path_of(layout.lease_dir(agent))}: lease keeps changing; retry")


def is_live(body: dict[str, Any] | None, now: float | None = None) -> bool:
    """Whether a lease body still binds (not released, not expired)."""
    if not body or body.get("released"):
        return False
    try:
        return float(body["expires"]) > (time.time() if now is None else now)
    except (KeyError, TypeError, ValueError):
        return False


def describe(body: dict[str, Any]) -> str:
    """The holder of a lease as one phrase: owner, host, pid, expiry."""
    left = float(body.get("expires", 0)) - time.time()
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(body.get("expires", 0))))
    return (
        f"owner {body.get('owner')!r} (host {body.get('host')}, pid {body.get('pid')}), "
        f"lease expires {when} ({left:.0f} s from now unless renewed)"
    )


def _held_message(store: Any, agent: str, body: dict[str, Any]) -> str:
    return (
        f"shard {agent!r} of store {store.url} is held by {describe(body)}; run another agent "
        f"(--agent=OTHER_NAME, other tasks), wait for this one with --wait_for_lease, or stop "
        f"that process (a crashed holder's lease expires after {body.get('ttl_s')} s)"
    )


def held_by_process(store: Any, agent: str) -> ShardLease | None:
    """The lease this process holds on ``agent``'s shard of ``store`` (any Store object)."""
    own = getattr(store, "leases", {}).get(agent)
    if own is not None:
        return own
    with _HELD_LOCK:
        return _HELD.get((store.location, agent))


def fence(store: Any, agent: str) -> None:
    """Refuses a commit to ``agent``'s shard that the lease does not allow.

    Raises:
      LeaseLostError: this Store (or process) held the shard's lease and lost it.
      LeaseHeldError: another live holder's lease exists and this process holds none.
    """
    held = held_by_process(store, agent)
    if held is not None:
        held.check()
        return
    _, body = current(store, agent)
    if is_live(body):
        raise LeaseHeldError(_held_message(store, agent, body))
    with _HELD_LOCK:
        auto = _AUTO.get(store.location)
    if auto is not None:  # inside hold(..., auto=True): take every shard this process writes
        ttl_s, leases = auto
        leases.append(ShardLease(store, agent, ttl_s=ttl_s).acquire())


@contextlib.contextmanager
def hold(
    store: Any,
    agents: Iterable[str],
    ttl_s: float = 30.0,
    wait: bool = False,
    wait_timeout_s: float | None = None,
    auto: bool = False,
) -> Iterator[list[ShardLease]]:
    """Holds the leases of ``agents``' shards (sorted order, so two holders never deadlock).

    Args:
      store: the store.
      agents: shards to lease now.
      ttl_s: lease time to live.
      wait: wait for live holders instead of raising :class:`LeaseHeldError`.
      wait_timeout_s: give up waiting after this long.
      auto: also lease, at its first commit, every other shard this process commits to in
        this store (a continuous run that picks up tasks added later writes their shards).

    Yields:
      The held leases (auto-acquired ones are appended as they are taken).
    """
    leases: list[ShardLease] = []
    try:
        for agent in sorted(set(agents)):
            leases.append(ShardLease(store, agent, ttl_s, wait, wait_timeout_s).acquire())
        if auto:
            with _HELD_LOCK:
                _AUTO[store.location] = (ttl_s, leases)
        yield leases
    finally:
        if auto:
            with _HELD_LOCK:
                _AUTO.pop(store.location, None)
        for held in reversed(leases):
            held.release()


class ShardLease:
    """The lease of one agent's shard; use as a context manager around the agent's run.

    Args:
      store: the :class:`~mu2net.system.store.Store`.
      agent: the shard's agent name.
      ttl_s: seconds a lease binds without renewal (renewed every ``ttl_s / 3``).
      wait: wait for a live holder to release or expire instead of raising.
      wait_timeout_s: give up waiting after this long (None: wait as long as it takes).
      owner: a label for messages (default ``user@host``).
    """

    def __init__(
        self,
        store: Any,
        agent: str,
        ttl_s: float = 30.0,
        wait: bool = False,
        wait_timeout_s: float | None = None,
        owner: str | None = None,
    ):
        if not ttl_s > 0:
            raise StoreError(f"lease of shard {agent!r}: ttl_s must be > 0, got {ttl_s!r}")
        self.store = store
        self.agent = validate_agent_name(agent)
        self.ttl_s = float(ttl_s)
        self.wait = wait
        self.wait_timeout_s = wait_timeout_s
        host = socket.gethostname()
        self.owner = owner or f"{os.environ.get('USER', 'user')}@{host}"
        self.host, self.pid, self.token = host, os.getpid(), uuid.uuid4().hex
        self.generation = -1
        self.expires = 0.0
        self.lost: str | None = None  # why, once lost
        self.renewals = 0
        self._lock = threading.RLock()  # renewal thread vs check(): one generation at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ state changes
    def _body(self, generation: int, released: bool = False) -> dict[str, Any]:
        now = time.time()
        return {
            "agent": self.agent,
            "generation": generation,
            "owner": self.owner,
            "host": self.host,
            "pid": self.pid,
            "token": self.token,
            "ttl_s": self.ttl_s,
            "written": now,
            "expires": 0.0 if released else now + self.ttl_s,
            "released": released,
        }

    def _create(self, generation: int, released: bool = False) -> dict[str, Any]:
        """Creates lease object ``generation`` (StoreConflict if another process did first)."""
        body = self._body(generation, released)
        path = self.store.path_of(layout.lease_path(self.agent, generation))
        self.store.put_bytes(path, documents.encode(body))
        return body

    def acquire(self) -> ShardLease:
        """Takes the lease (a free, released or expired one) and starts renewing it.

        Raises:
          LeaseHeldError: a live holder has it and ``wait`` is off, or the wait timed out.
        """
        start = time.time()
        races = 0
        while True:
            gen, body = current(self.store, self.agent)
            if is_live(body) and body.get("token") != self.token:
                waited = time.time() - start
                if not self.wait or (
                    self.wait_timeout_s is not None and waited >= self.wait_timeout_s
                ):
                    extra = f" (waited {waited:.0f} s)" if self.wait else ""
                    raise LeaseHeldError(_held_message(self.store, self.agent, body) + extra)
                left = float(body["expires"]) - time.time()
                time.sleep(max(0.05, min(left + 0.05, self.ttl_s / 6, 1.0)))
                continue
            try:
                mine = self._create(gen + 1)
            except StoreConflict:
                races += 1  # another process created that generation first: look again
                if races >= _MAX_RACES:
                    raise
                continue
            break
        with self._lock:
            self.generation, self.expires, self.lost = gen + 1, mine["expires"], None
        self.store.leases[self.agent] = self
        with _HELD_LOCK:
            _HELD[(self.store.location, self.agent)] = self
        self._collect()
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._renew_loop, name=f"lease-{self.agent}", daemon=True
        )
        self._thread.start()
        return self

    def renew(self) -> None:
        """Extends the lease by ``ttl_s`` (the renewal thread calls it every ``ttl_s / 3``).

        Raises:
          LeaseLostError: another process took the lease over.
        """
        with self._lock:
            if self.lost:
                raise LeaseLostError(self.lost)
            gen, body = current(self.store, self.agent)
            if gen != self.generation or (body or {}).get("token") != self.token:
                self._mark_lost(body)
            try:
                mine = self._create(gen + 1)
            except StoreConflict:
                self._mark_lost(current(self.store, self.agent)[1])
            self.generation, self.expires = gen + 1, mine["expires"]
            self.renewals += 1
        self._collect()

    def _mark_lost(self, body: dict[str, Any] | None) -> None:
        who = describe(body) if body else "an unreadable lease object"
        self.lost = (
            f"lease of shard {self.agent!r} in store {self.store.url} was taken over by {who} "
            f"(this process, pid {self.pid}, stalled past its {self.ttl_s:.0f} s lease); it "
            "must not commit: restart it to resume from the store"
        )
        raise LeaseLostError(self.lost)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except LeaseLostError as e:
                log.error("%s", e)
                return
            except Exception as e:  # noqa: BLE001  (any filesystem's transient error: retry;
                # a dead renewal thread would silently let the lease expire)
                log.warning("lease renewal of shard %r failed: %s", self.agent, e, exc_info=True)

    def _collect(self) -> None:
        """Deletes generations older than the last two (only the holder does)."""
        names = self.store.list_dir(self.store.path_of(layout.lease_dir(self.agent)))
        for m in map(layout.LEASE_RE.match, names):
            if m and int(m.group(1)) < self.generation - 1:
                try:
                    self.store.delete(self.store.path_of(layout.lease_dir(self.agent), m.group(0)))
                except (OSError, StoreError):
                    pass  # another holder's clean-up got there first; harmless

    # ------------------------------------------------------------------ checks
    def check(self) -> None:
        """Raises :class:`LeaseLostError` unless this process still holds the lease.

        A lease that expired while nobody took it over (the renewal thread was starved) is
        renewed here, so a slow but unchallenged holder keeps its shard.
        """
        with self._lock:
            if self.lost:
                raise LeaseLostError(self.lost)
            if self.generation < 0:
                raise LeaseLostError(f"lease of shard {self.agent!r} was never acquired")
            gen, body = current(self.store, self.agent)
            if gen != self.generation or (body or {}).get("token") != self.token:
                self._mark_lost(body)
            if time.time() > self.expires - self.ttl_s / 3:
                self.renew()

    @property
    def held(self) -> bool:
        """Whether the lease is acquired and not known to be lost."""
        return self.generation >= 0 and not self.lost

    def release(self) -> None:
        """Stops renewing and marks the lease released (no-op if it was lost)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(5.0, self.ttl_s))
        with self._lock:
            if self.generation >= 0 and not self.lost:
                gen, body = current(self.store, self.agent)
                if gen == self.generation and (body or {}).get("token") == self.token:
                    try:
                        self._create(gen + 1, released=True)
                    except StoreConflict:
                        pass  # taken over in the last instant: nothing of ours to release
            self.lost = self.lost or f"lease of shard {self.agent!r} was released"
        if self.store.leases.get(self.agent) is self:
            del self.store.leases[self.agent]
        with _HELD_LOCK:
            if _HELD.get((self.store.location, self.agent)) is self:
                del _HELD[(self.store.location, self.agent)]

    def __enter__(self) -> ShardLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
