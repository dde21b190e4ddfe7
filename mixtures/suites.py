"""Benchmark suites as seqio Mixtures (equal rates; evaluation iterates their tasks).

Registered at ``import mu2net.mixtures``:

* ``mu2net:bundled_images`` -- the bundled real and derived image tasks;
* ``mu2net:bundled_text`` -- Rotten Tomatoes and the 2016 debates;
* ``mu2net:bundled_pairs`` -- the 135 class-pair tasks (scale benchmarks);
* ``mu2net:tfds.vit``, ``mu2net:tfds.vtab``, ``mu2net:tfds.vdd``, ``mu2net:tfds.chars``,
  ``mu2net:tfds.vtab1k`` -- the paper's five TFDS suites (method.md §6.1), in the reference's
  task order.
"""

from __future__ import annotations

import seqio

from mu2net import tasks

SUITE_MIXTURES: dict[str, list[str]] = {}


def _add(name: str, task_names: list[str]) -> None:
    if name not in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.add(name, list(task_names), default_rate=1.0)
    SUITE_MIXTURES[name] = list(task_names)


def register_all() -> None:
    """Registers the suite mixtures (idempotent)."""
    _add("mu2net:bundled_images", tasks.BUNDLED_IMAGE_TASKS)
    _add("mu2net:bundled_text", tasks.BUNDLED_TEXT_TASKS)
    _add("mu2net:bundled_pairs", tasks.PAIR_TASKS)
    for suite, names in tasks.TFDS_SUITES.items():
        _add(f"mu2net:tfds.{suite}", names)


def suite_tasks(mixture_name: str) -> list[str]:
    """Task names of a registered suite mixture, in order."""
    if mixture_name not in SUITE_MIXTURES:
        raise tasks.TaskError(
            f"Unknown suite mixture {mixture_name!r}; known: {sorted(SUITE_MIXTURES)}"
        )
    return list(SUITE_MIXTURES[mixture_name])
