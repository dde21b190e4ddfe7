"""Imports the real ``gin`` (gin-config) even when a source checkout's ``gin/`` folder shadows it.

The repository keeps its gin configs in a top-level ``gin/`` folder (installed as ``mu2net.gin``).
Running ``python -m ...`` from the repository root puts the root on ``sys.path`` first, and
``import gin`` would then find that folder instead of gin-config. Import gin through this module.
"""

from __future__ import annotations

import importlib
import os
import sys


def _import_real_gin():
    mod = sys.modules.get("gin")
    if mod is not None and hasattr(mod, "configurable"):
        return mod
    sys.modules.pop("gin", None)
    saved = list(sys.path)
    try:
        # Drop entries whose gin/ is our config folder (it has no config.py, gin-config does).
        sys.path[:] = [
            p
            for p in saved
            if not (
                os.path.isfile(os.path.join(p or ".", "gin", "__init__.py"))
                and not os.path.isfile(os.path.join(p or ".", "gin", "config.py"))
            )
        ]
        return importlib.import_module("gin")
    finally:
        sys.path[:] = saved


def _tolerate_namespace_packages() -> None:
    """Makes gin's package-resource lookup skip plain folders instead of crashing.

    For an include such as ``runs/evolve.gin`` gin asks importlib for a package ``runs``; a
    plain ``runs/`` folder in the working directory (where ``mu2net demo`` keeps its store) is a
    namespace package with no origin, and gin-config 0.5 then raises TypeError instead of trying
    the next search path.
    """
    from gin import config, resource_reader

    def exists(path: str) -> bool:
        try:
            return resource_reader.system_path_file_exists(path)
        except TypeError:
            return False

    config._FILE_READERS[:] = [
        (reader, exists if check is resource_reader.system_path_file_exists else check)
        for reader, check in config._FILE_READERS
    ]


gin = _import_real_gin()
_tolerate_namespace_packages()

__all__ = ["gin"]
