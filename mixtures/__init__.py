"""mu2net mixtures: benchmark suites and the versioned live mixture of a system.

``import mu2net.mixtures`` registers every task (via :mod:`mu2net.tasks`) and the suite
mixtures (:mod:`mu2net.mixtures.suites`); :mod:`mu2net.mixtures.live` holds the live-mixture
functions.
"""

from mu2net.mixtures import suites
from mu2net.mixtures.live import (
    add_task,
    ensure_live_mixture,
    expand_task_names,
    latest_live_version,
    live_mixture_name,
    register_live_mixture,
)
from mu2net.mixtures.suites import SUITE_MIXTURES, suite_tasks

suites.register_all()

__all__ = [
    "SUITE_MIXTURES",
    "add_task",
    "ensure_live_mixture",
    "expand_task_names",
    "latest_live_version",
    "live_mixture_name",
    "register_live_mixture",
    "suite_tasks",
]
