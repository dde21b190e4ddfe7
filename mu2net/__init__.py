"""mu2net: grow one continually extended, sparsely activated multitask model (µ2Net)."""

from mu2net.system.state import System
from mu2net.system.store import Store
from mu2net.version import __version__

__all__ = ["Store", "System", "__version__"]
