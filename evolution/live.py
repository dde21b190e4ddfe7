"""The live mixture of a stored system: adding tasks while agents run.

Each added task is recorded in a shard of its own (``task~<name>``) that nobody else writes,
so ``mu2net add-task`` never races with a running ``evolve`` (which reloads the published
state before every task iteration and picks the task up there).
"""

from __future__ import annotations

from collections.abc import Sequence

from mu2net.system.names import validate_agent_name, validate_task_name
from mu2net.system.state import System
from mu2net.system.store import Store


def task_shard(task: str) -> str:
    """The shard that records ``task``'s membership in the live mixture."""
    validate_task_name(task)
    return validate_agent_name("task~" + task.replace(":", "~").replace("#", "~"))


def add_tasks_to_store(store: Store, tasks: Sequence[str], validate: bool = True) -> System:
    """Validates ``tasks`` and commits them to the live mixture (skipping ones already in).

    Args:
      store: the system store.
      tasks: seqio task names.
      validate: run the data checks (registered, splits non-empty, labels in range, ...).

    Returns:
      The reloaded system.
    """
    from mu2net import mixtures

    system = store.load()
    for task in tasks:
        if task in system.tasks:
            continue
        if validate:
            mixtures.add_task(list(system.tasks), task)
        system.add_task(task, task_shard(task))
        store.commit(system, task_shard(task), note=f"add-task {task}")
    return store.load()
