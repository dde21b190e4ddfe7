"""The state of a multitask system: components, paths and the system that holds them.

Semantics follow reference §1 (µ2Net) with the multiagent generalisation of §7.2:

* A :class:`Component` is an immutable parameter block once published. It carries *locks*: the
  tasks (and roots) whose published paths use it. It is trainable only while it has no locks and
  belongs to the agent that is evolving it.
* A :class:`Path` is one task's model: an ordered mapping component name -> component id plus the
  hyperparameters (gin-style keys) and metrics.
* A :class:`System` holds every published path (the best per task, plus the roots) and the
  components they reference. Accounted params charge a component shared by k tasks 1/k to each.

A path may be *composite* (a multipath path, reference §7.3): its hparams name its sub-paths
(other published paths, frozen) and its components hold theirs under ``<slot>/<name>`` next to
its own. Everything that follows a path's components (locks, accounted params, unpublishing,
dropping unpublished components, task indexes, loading) therefore follows its sub-paths too: a
sub-path's components stay locked, loaded and stored while any composite path uses them.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from mu2net.errors import Mu2netError
from mu2net.models.base import num_params as count_params
from mu2net.models.base import shape_signature
from mu2net.models.multipath import SubPath, decode_subpaths
from mu2net.system.names import is_private, validate_agent_name, validate_task_name

ROOT_LOCK_PREFIX = "@root/"


class StateError(Mu2netError, ValueError):
    """An inconsistent system state (unknown component, lock violation, ...)."""


@dataclasses.dataclass
class Component:
    """A named parameter block of one model family.

    Attributes:
      id: globally unique id ``"<agent>/<n>"`` (agents never collide: each numbers its own).
      name: the family's component name (``encoderblock_3``, ``head``, ...).
      family: registered family name.
      signature: shape signature of the params (equal iff interchangeable).
      num_params: number of scalars.
      agent: the agent that created it (the only one that may ever train it).
      lineage: id of the component it was cloned from, if any.
      locks: tasks/roots whose published paths use it; trainable only while empty.
    """

    id: str
    name: str
    family: str
    signature: str
    num_params: int
    agent: str
    lineage: str | None = None
    locks: set[str] = dataclasses.field(default_factory=set)
    committed: bool = False
    # The store's record of a committed component (shard, file, sha256): task indexes copy it.
    record: dict[str, Any] | None = dataclasses.field(default=None, repr=False)
    _params: Any = dataclasses.field(default=None, repr=False)
    _momentum: Any = dataclasses.field(default=None, repr=False)
    _loader: Callable[[Component], tuple[Any, Any]] | None = dataclasses.field(
        default=None, repr=False
    )

    @classmethod
    def create(
        cls,
        cid: str,
        name: str,
        family: str,
        params: Any,
        agent: str,
        lineage: str | None = None,
        momentum: Any = None,
    ) -> Component:
        """A new, unlocked, uncommitted component holding ``params`` (host numpy)."""
        params = _to_numpy(params)
        return cls(
            id=cid,
            name=name,
            family=family,
            signature=shape_signature(params),
            num_params=count_params(params),
            agent=agent,
            lineage=lineage,
            _params=params,
            _momentum=_to_numpy(momentum) if momentum is not None else None,
        )

    @property
    def params(self) -> Any:
        """The parameter pytree (read from the store on first access)."""
        self._ensure_loaded()
        return self._params

    @property
    def momentum(self) -> Any:
        """The optimizer momentum trace carried to clones (reference §3.5), or None."""
        self._ensure_loaded()
        return self._momentum

    @property
    def loaded(self) -> bool:
        """Whether the params are in memory."""
        return self._params is not None

    def _ensure_loaded(self) -> None:
        if self._params is None and self._loader is not None:
            self._params, self._momentum = self._loader(self)

    @property
    def trainable(self) -> bool:
        """Trainable iff unlocked (reference §1.2)."""
        return not self.locks

    def detached(self) -> Component:
        """A copy sharing params and record, with its own set of locks."""
        other = copy.copy(self)
        other.locks = set(self.locks)
        return other

    def set_trained(self, params: Any, momentum: Any = None) -> None:
        """Replaces the params of an unlocked, uncommitted component (after training)."""
        if self.locks or self.committed:
            raise StateError(
                f"component {self.id} ({self.name}) is published/locked by {sorted(self.locks)}: "
                "its parameters can never change"
            )
        params = _to_numpy(params)
        if shape_signature(params) != self.signature:
            raise StateError(f"component {self.id} ({self.name}): trained params change shapes")
        self._params = params
        self._momentum = _to_numpy(momentum) if momentum is not None else None


@dataclasses.dataclass
class Path:
    """One task's model: ordered component ids by name, hyperparameters and metrics."""

    id: str
    task: str
    family: str
    components: dict[str, str]
    hparams: dict[str, Any]
    agent: str
    parent: str | None = None
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    is_root: bool = False

    @property
    def generation(self) -> int:
        """Number of ancestors (children record parent generation + 1)."""
        return int(self.metrics.get("generation", 0))

    @property
    def private(self) -> bool:
        """Whether this path may not be offered as a parent to other tasks.

        Composite paths never are: no single-path mutation applies to them.
        """
        return is_private(self.task) or self.is_composite

    @property
    def subpaths(self) -> list[SubPath]:
        """The sub-paths of a composite path, ``path_0`` first ([] for a single path)."""
        return decode_subpaths(self.hparams)

    @property
    def is_composite(self) -> bool:
        """Whether this path is made of other paths (a multipath path)."""
        return bool(self.subpaths)

    def subpath(self, slot: str) -> Path:
        """Sub-path ``slot`` of a composite path as a path of its own (components unprefixed)."""
        for sub in self.subpaths:
            if sub.slot == slot:
                prefix = slot + "/"
                comps = {
                    n[len(prefix) :]: cid
                    for n, cid in self.components.items()
                    if n.startswith(prefix)
                }
                return Path(sub.path, sub.task, sub.family, comps, dict(sub.hparams), sub.agent)
        raise StateError(f"path {self.id} (task {self.task!r}) has no sub-path {slot!r}")

    @property
    def lock(self) -> str:
        """The lock this path puts on its components when published."""
        return f"{ROOT_LOCK_PREFIX}{self.task}" if self.is_root else self.task

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the manifest's record of this path)."""
        return {
            "id": self.id,
            "task": self.task,
            "family": self.family,
            "components": dict(self.components),
            "hparams": _jsonable(self.hparams),
            "agent": self.agent,
            "parent": self.parent,
            "metrics": _jsonable(self.metrics),
            "is_root": self.is_root,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Path:
        """Inverse of :meth:`to_json`."""
        return cls(
            id=d["id"],
            task=d["task"],
            family=d["family"],
            components=dict(d["components"]),
            hparams=dict(d["hparams"]),
            agent=d["agent"],
            parent=d.get("parent"),
            metrics=dict(d.get("metrics", {})),
            is_root=bool(d.get("is_root", False)),
        )


class System:
    """All published paths (best per task + roots) and the components they reference."""

    def __init__(self) -> None:
        self.components: dict[str, Component] = {}
        self.paths: dict[str, Path] = {}
        self.tasks: list[str] = []  # the live mixture, in order of addition
        self.task_agents: dict[str, str] = {}  # which agent's shard records each task
        self.counters: dict[str, int] = {}  # next component/path number per agent

    # ----------------------------------------------------------------- ids and building
    def new_id(self, agent: str, kind: str = "c") -> str:
        """A fresh id for a component (``kind='c'``) or path (``'p'``) of ``agent``."""
        validate_agent_name(agent)
        key = f"{agent}:{kind}"
        n = self.counters.get(key, 0)
        self.counters[key] = n + 1
        return f"{agent}/{kind}{n}"

    def add_component(self, component: Component) -> Component:
        """Adds a component (ids are unique forever)."""
        if component.id in self.components:
            raise StateError(f"duplicate component id {component.id}")
        self.components[component.id] = component
        return component

    def new_component(
        self,
        name: str,
        family: str,
        params: Any,
        agent: str,
        lineage: str | None = None,
        momentum: Any = None,
    ) -> Component:
        """Creates and adds an unlocked component owned by ``agent``."""
        c = Component.create(self.new_id(agent), name, family, params, agent, lineage, momentum)
        return self.add_component(c)

    def clone_component(self, cid: str, agent: str) -> Component:
        """A trainable copy of component ``cid`` (new id, same params, no locks)."""
        src = self.component(cid)
        return self.new_component(
            src.name,
            src.family,
            copy.deepcopy(src.params),
            agent,
            lineage=src.id,
            momentum=copy.deepcopy(src.momentum),
        )

    def add_task(self, task: str, agent: str) -> None:
        """Adds ``task`` to the live mixture, recorded in ``agent``'s shard.

        Validating the task's data is the caller's job (``mu2net.mixtures.add_task``).
        """
        validate_task_name(task)
        validate_agent_name(agent)
        if task in self.tasks:
            raise StateError(f"task {task!r} is already in the system")
        self.tasks.append(task)
        self.task_agents[task] = agent

    def add_root(
        self,
        name: str,
        family: str,
        params_by_name: Mapping[str, Any],
        hparams: Mapping,
        agent: str,
    ) -> Path:
        """Adds a root path (a pretrained or random model) whose components are locked as root."""
        comps = {n: self.new_component(n, family, p, agent).id for n, p in params_by_name.items()}
        path = Path(
            id=self.new_id(agent, "p"),
            task=name,
            family=family,
            components=comps,
            hparams=dict(hparams),
            agent=agent,
            is_root=True,
        )
        self.publish(path)
        return path

    # ----------------------------------------------------------------- queries
    def component(self, cid: str) -> Component:
        """The component ``cid``; raises naming it when missing."""
        try:
            return self.components[cid]
        except KeyError:
            raise StateError(f"unknown component id {cid!r}") from None

    def path_components(self, path: Path) -> dict[str, Component]:
        """Component objects of ``path`` by name (raises on a dangling reference)."""
        out = {}
        for name, cid in path.components.items():
            if cid not in self.components:
                raise StateError(
                    f"path {path.id} (task {path.task!r}) references unknown "
                    f"component {cid!r} for {name!r}"
                )
            out[name] = self.components[cid]
        return out

    def params_of(self, path: Path) -> dict[str, Any]:
        """Parameters by component name (reads only this path's components)."""
        return {n: c.params for n, c in self.path_components(path).items()}

    def roots(self) -> list[Path]:
        """Root paths, oldest first."""
        return [p for p in self.paths.values() if p.is_root]

    def best_path(self, task: str) -> Path | None:
        """The published path of ``task``, or None."""
        for p in self.paths.values():
            if p.task == task and not p.is_root:
                return p
        return None

    def task_paths(self) -> list[Path]:
        """Published non-root paths in live-mixture order."""
        order = {t: i for i, t in enumerate(self.tasks)}
        paths = [p for p in self.paths.values() if not p.is_root]
        return sorted(paths, key=lambda p: (order.get(p.task, len(order)), p.task))

    # ----------------------------------------------------------------- locks and publishing
    def publish(self, path: Path) -> None:
        """Makes ``path`` the published path of its task and locks its components."""
        comps = self.path_components(path)  # fails before any change on a dangling id
        if not path.is_root:
            old = self.best_path(path.task)
            if old is not None and old.id != path.id:
                self.unpublish(old, keep=set(path.components.values()))
        for c in comps.values():
            c.locks.add(path.lock)
        self.paths[path.id] = path

    def unpublish(self, path: Path, keep: set[str] = frozenset()) -> None:
        """Removes a path and its locks (used when a task's best path is replaced).

        Uncommitted components no other path (nor ``keep``) uses are dropped from memory.
        """
        self.paths.pop(path.id, None)
        still = {cid for p in self.paths.values() for cid in p.components.values()} | set(keep)
        for cid in path.components.values():
            c = self.components.get(cid)
            if c is not None:
                c.locks.discard(path.lock)
                if not c.committed and cid not in still and not c.locks:
                    del self.components[cid]

    def recompute_locks(self) -> None:
        """Every component gets the lock of every published path using it (reference §1.5)."""
        for c in self.components.values():
            c.locks = set()
        for p in self.paths.values():
            for c in self.path_components(p).values():
                c.locks.add(p.lock)

    def unlock_task(self, task: str, agent: str) -> list[str]:
        """Start of a task iteration: remove ``task``'s lock from its own components.

        Components shared with other tasks stay locked. Returns the ids of ``agent``'s components
        that became unlocked: evolution always clones those (reference §2.2), so even a committed
        one is never modified.
        """
        unlocked = []
        for c in self.components.values():
            if task in c.locks:
                c.locks.discard(task)
                if not c.locks and c.agent == agent:
                    unlocked.append(c.id)
        return unlocked

    def is_trainable(self, cid: str, agent: str) -> bool:
        """Trainable for ``agent``: unlocked, created by ``agent`` and never committed."""
        c = self.component(cid)
        return not c.locks and c.agent == agent and not c.committed

    # ----------------------------------------------------------------- accounting and score
    def accounted_params(self, path: Path) -> float:
        """Params charged to ``path``: each component's size / number of tasks sharing it.

        Root locks do not count as sharers (reference §1.3); a root path itself is NaN.
        """
        if path.is_root:
            return math.nan
        total = 0.0
        for c in self.path_components(path).values():
            sharers = {lk for lk in c.locks if not lk.startswith(ROOT_LOCK_PREFIX)}
            sharers.add(path.task)
            total += c.num_params / len(sharers)
        return total

    def path_params(self, path: Path) -> int:
        """Total params activated by ``path`` (what inference reads)."""
        return sum(c.num_params for c in self.path_components(path).values())

    def score(
        self,
        path: Path,
        quality: float | None = None,
        scale: float = 1.0,
        params_base: float | None = None,
        flops: float | None = None,
        flops_base: float | None = None,
    ) -> float:
        """Score = quality x s^(accounted/P_base) [x s^(flops/F_base)] (reference §4.7).

        With ``scale == 1`` (the reference default) the score is the validation quality.
        """
        q = path.metrics.get("quality") if quality is None else quality
        if q is None:
            return -math.inf
        out = float(q)
        if scale != 1.0:
            if not params_base:
                raise StateError("score: scale != 1 needs params_base (P_base)")
            out *= scale ** (self.accounted_params(path) / params_base)
            if flops is not None and flops_base:
                out *= scale ** (flops / flops_base)
        return out

    def total_params(self) -> int:
        """Params of every component referenced by a published non-root path or a root."""
        used = {cid for p in self.paths.values() for cid in p.components.values()}
        return sum(self.components[cid].num_params for cid in used)

    def validate(self) -> None:
        """Raises :class:`StateError` naming the first inconsistency."""
        for p in self.paths.values():
            comps = self.path_components(p)
            families = {sub.slot: sub.family for sub in p.subpaths}
            for n, c in comps.items():
                slot, _, name = n.rpartition("/")
                if c.family != families.get(slot, p.family) or slot and slot not in families:
                    raise StateError(
                        f"path {p.id}: component {c.id} ({c.family}) in {n!r} is not of family "
                        f"{families.get(slot, p.family)!r}"
                    )
                if c.name != name:
                    raise StateError(f"path {p.id}: slot {n!r} holds component named {c.name!r}")
        heads: dict[str, str] = {}
        for p in self.paths.values():
            if "head" in p.components and not p.is_root:
                hid = p.components["head"]
                if hid in heads and heads[hid] != p.task:
                    raise StateError(f"head {hid} shared by tasks {heads[hid]!r} and {p.task!r}")
                heads[hid] = p.task

    def unreferenced(self) -> Iterable[str]:
        """Ids of components no published path uses (history only)."""
        used = {cid for p in self.paths.values() for cid in p.components.values()}
        return [cid for cid in self.components if cid not in used]

    def discard_components(self, ids: Iterable[str]) -> None:
        """Drops uncommitted, unlocked components (a rejected candidate's new ones)."""
        for cid in list(ids):
            c = self.components.get(cid)
            if c is None:
                continue
            if c.committed or c.locks:
                raise StateError(f"component {cid} is committed or locked: it cannot be dropped")
            del self.components[cid]

    def drop_unpublished_except(self, keep: set[str]) -> list[str]:
        """Drops uncommitted components no published path (nor ``keep``) uses; returns them.

        Locks are recomputed afterwards, so they match the published paths exactly.
        """
        dropped = [
            cid
            for cid in self.unreferenced()
            if not self.components[cid].committed and cid not in keep
        ]
        for cid in dropped:
            del self.components[cid]
        self.recompute_locks()
        return dropped

    def scratch(self) -> System:
        """A system sharing this one's components and id counters, with no paths or tasks.

        Children built in it (baselines) never show up in this system, while every component
        they share keeps its identity and params.
        """
        other = System()
        # Copies share params but not lock sets: locking in the scratch changes nothing here.
        other.components = {cid: c.detached() for cid, c in self.components.items()}
        other.counters = dict(self.counters)
        return other


def _to_numpy(tree: Any) -> Any:
    import jax

    return jax.tree_util.tree_map(lambda x: np.array(x, copy=True), tree)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
