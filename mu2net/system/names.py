"""Validation of the names that reach file paths and seqio: tasks and agents."""

from __future__ import annotations

import re

from mu2net.errors import Mu2netError

# seqio's own rule for task names (seqio.dataset_providers._VALID_TASK_NAME_REGEX).
_TASK_NAME = re.compile(r"^[\w\.\:#]+$", re.ASCII)
# Agent (shard) names become directory names: no separators, no dots-only names.
_AGENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.~-]{0,127}$")
PRIVATE_PREFIX = "private:"


class NameError_(Mu2netError, ValueError):
    """A task or agent name that cannot be used (path separators, control characters...)."""


def validate_task_name(name: str) -> str:
    """Returns ``name`` if it is a valid seqio task name, else raises naming the culprit.

    Task names travel into seqio (which allows ``[A-Za-z0-9_.:#]``) and into store metadata; a
    separator or control character could escape the store directory, so they are refused here.
    """
    if not isinstance(name, str) or not name:
        raise NameError_(f"task name must be a non-empty string, got {name!r}")
    if not _TASK_NAME.match(name) or ".." in name:
        bad = sorted({c for c in name if not re.match(r"[\w\.\:#]", c, re.ASCII)})
        detail = f" (offending characters: {bad!r})" if bad else ""
        raise NameError_(
            f"invalid task name {name!r}{detail}: use seqio's characters [A-Za-z0-9_.:#], no '..'"
        )
    return name


def validate_agent_name(name: str) -> str:
    """Returns ``name`` if usable as a store shard directory, else raises naming the culprit."""
    if not isinstance(name, str) or not _AGENT_NAME.match(name) or ".." in name:
        raise NameError_(
            f"invalid agent name {name!r}: use [A-Za-z0-9_.~-], start with a letter or digit, "
            "no path separators, no '..', at most 128 characters"
        )
    return name


def agent_for_task(task: str) -> str:
    """Default agent (shard) name for a task: one shard per task, as in the multiagent reference."""
    validate_task_name(task)
    return validate_agent_name(task.replace(":", "~").replace("#", "~"))


def system_name_for(url: str) -> str:
    """Default system name from a store URL's last part.

    The name also names the live seqio mixture, which allows only ``[A-Za-z0-9_.]``.
    """
    return re.sub(r"[^A-Za-z0-9_.]", "_", url.rstrip("/").rsplit("/", 1)[-1]) or "system"


def is_private(task: str) -> bool:
    """Private tasks never offer their paths as parents to other tasks (reference §1.4)."""
    return task.startswith(PRIVATE_PREFIX)
