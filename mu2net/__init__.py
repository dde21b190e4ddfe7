"""mu2net: grow one continually extended, sparsely activated multitask model (µ2Net)."""

from mu2net.version import __version__

__all__ = ["__version__"]
