"""A tiny MLP family whose hidden width defines its agent class (for tests/test_launch.py).

Agents of different classes never use each other's paths as parents, so each agent's result
is independent of when the others commit: a killed-and-retried launch must end in exactly the
system of an uninterrupted one. Shipped to the Ray workers with ``--module`` (``py_modules``).
"""

from mu2net.models.base import register_family
from mu2net.train.testing import MLPFamily


class LaunchMLPFamily(MLPFamily):
    """``test_mlp`` with ``hidden_dim`` as its root (agent-class) key."""

    name = "launch_mlp"
    root_keys = ("hidden_dim",)


FAMILY = register_family(LaunchMLPFamily())
