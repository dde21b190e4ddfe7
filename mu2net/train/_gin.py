"""gin-config, with one fix for include lookups; modules import ``gin`` from here.

The repository's top-level ``gin/`` folder (the configs, shipped as ``mu2net.gin`` package
data) has no ``__init__.py``, so it is at most a namespace-package candidate: ``import gin``
from the repository root finds gin-config's regular package later on ``sys.path``. No
``sys.path`` or ``sys.modules`` changes are needed.
"""

from __future__ import annotations

import gin
from gin import config, resource_reader


def _tolerate_namespace_packages() -> None:
    """Makes gin's package-resource lookup skip plain folders instead of crashing.

    For an include such as ``runs/evolve.gin`` gin asks importlib for a package ``runs``; a
    plain ``runs/`` folder in the working directory (where ``mu2net demo`` keeps its store) is a
    namespace package with no origin, and gin-config 0.5 then raises TypeError instead of trying
    the next search path.
    """

    def exists(path: str) -> bool:
        try:
            return resource_reader.system_path_file_exists(path)
        except TypeError:
            return False

    config._FILE_READERS[:] = [
        (reader, exists if check is resource_reader.system_path_file_exists else check)
        for reader, check in config._FILE_READERS
    ]


_tolerate_namespace_packages()

__all__ = ["gin"]
