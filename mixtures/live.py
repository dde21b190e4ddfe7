"""The live mixture: a system's current task list as a versioned seqio Mixture.

The store (``mu2net.system``) persists the task list; this module holds the pure functions:
:func:`add_task` checks a task before it joins the list, :func:`register_live_mixture` exposes
a list as ``mu2net_live:<system>:v<N>`` for joint evaluation and serving. Versions are
immutable: re-registering the same list under the same version is a no-op, a different list
needs a larger version (:func:`ensure_live_mixture` picks it).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import seqio

from mu2net.tasks import TaskError, validate_task
from mu2net.tasks.registry import normalize_name, task_info

LIVE_PREFIX = "mu2net_live:"
_SYSTEM_RE = re.compile(r"^[\w\d.]+$")
_LIVE: dict[str, dict[int, tuple[str, ...]]] = {}  # system -> version -> task list


def live_mixture_name(system: str, version: int) -> str:
    """``mu2net_live:<system>:v<version>``.

    Raises:
        TaskError: a system name with characters seqio does not allow, or version < 1.
    """
    if not _SYSTEM_RE.match(system or ""):
        raise TaskError(
            f"System name {system!r}: use letters, digits, '_' or '.' (seqio mixture names)"
        )
    if int(version) < 1:
        raise TaskError(f"Live mixture of {system!r}: version={version}, expected >= 1")
    return f"{LIVE_PREFIX}{system}:v{int(version)}"


def latest_live_version(system: str) -> int:
    """Largest version registered in this process for ``system`` (0 if none)."""
    return max(_LIVE.get(system, {}), default=0)


def register_live_mixture(system: str, task_names: Sequence[str], version: int) -> seqio.Mixture:
    """Registers (or returns) version ``version`` of a system's live mixture.

    Args:
        system: System name.
        task_names: The system's tasks, in the order they joined.
        version: Version number, >= 1.

    Returns:
        The seqio Mixture ``live_mixture_name(system, version)``.

    Raises:
        TaskError: empty list, duplicate or unregistered task, or a version that exists with a
        different list / is not newer than the latest one.
    """
    name = live_mixture_name(system, version)
    names = tuple(normalize_name(t) for t in task_names)
    if not names:
        raise TaskError(f"Live mixture {name!r}: empty task list")
    dupes = sorted({t for t in names if names.count(t) > 1})
    if dupes:
        raise TaskError(f"Live mixture {name!r}: duplicate tasks {dupes}")
    for t in names:
        task_info(t)  # unknown -> TaskError with suggestions
    versions = _LIVE.setdefault(system, {})
    if version in versions:
        if versions[version] != names:
            raise TaskError(
                f"Live mixture {name!r} already exists with a different task list; versions "
                f"are immutable, register version {latest_live_version(system) + 1}"
            )
        return seqio.get_mixture_or_task(name)
    if version < latest_live_version(system):
        raise TaskError(
            f"Live mixture {name!r}: version {version} is older than the latest "
            f"(v{latest_live_version(system)})"
        )
    if name in seqio.MixtureRegistry.names():  # registered outside this module
        seqio.MixtureRegistry.remove(name)
    mixture = seqio.MixtureRegistry.add(name, list(names), default_rate=1.0)
    versions[version] = names
    return mixture


def ensure_live_mixture(system: str, task_names: Sequence[str]) -> seqio.Mixture:
    """The latest version if it has exactly ``task_names``, else a new version."""
    latest = latest_live_version(system)
    names = tuple(normalize_name(t) for t in task_names)
    if latest and _LIVE[system][latest] == names:
        return seqio.get_mixture_or_task(live_mixture_name(system, latest))
    return register_live_mixture(system, names, latest + 1)


def expand_task_names(names: Sequence[str]) -> list[str]:
    """Task names with every seqio Mixture name replaced by its tasks (in order, no repeats).

    A name seqio knows as a Mixture (and not as a Task) stands for its sub-tasks, so
    ``mu2net add-task my_mixture`` adds the mixture's tasks.
    """
    out: list[str] = []
    mixtures = set(seqio.MixtureRegistry.names())
    for name in names:
        if name in mixtures and name not in seqio.TaskRegistry.names():
            expanded = [t.name for t in seqio.get_mixture_or_task(name).tasks]
        else:
            expanded = [normalize_name(name)]
        out.extend(t for t in expanded if t not in out)
    return out


def add_task(current_tasks: Sequence[str], task_name: str, *, max_examples: int = 256) -> list[str]:
    """Returns ``current_tasks + [task_name]`` after checking the task can join.

    Runs :func:`mu2net.tasks.validate_task` (registered, every split non-empty, features of
    the declared dtype/shape, labels in ``[0, num_classes)``, finite pixels).

    Raises:
        TaskError: the task is already in the list, or fails validation.
    """
    name = normalize_name(task_name)
    current = [normalize_name(t) for t in current_tasks]
    if name in current:
        raise TaskError(f"Task {name!r} is already in the live task list")
    validate_task(name, max_examples=max_examples)
    return current + [name]
