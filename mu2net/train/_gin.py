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


gin = _import_real_gin()

__all__ = ["gin"]
