"""The state of a multitask system and its store on disk."""

from mu2net.system.names import NameError_, agent_for_task, validate_agent_name, validate_task_name
from mu2net.system.state import Component, Path, StateError, System
from mu2net.system.store import Store, StoreConflict, StoreError

__all__ = [
    "Component",
    "NameError_",
    "Path",
    "StateError",
    "Store",
    "StoreConflict",
    "StoreError",
    "System",
    "agent_for_task",
    "validate_agent_name",
    "validate_task_name",
]
