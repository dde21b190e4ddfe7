"""Version of the mu2net distribution."""

__version__ = "0.1.0"
