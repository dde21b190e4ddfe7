"""One error base for everything a user can cause.

Every error that bad input, a bad config or a broken store can raise derives from
:class:`Mu2netError` and prints as one line naming the culprit (task, file, key). The CLI prints
these as ``error: ...`` and exits non-zero; any other exception is a bug and keeps its traceback.
Each room keeps its own subclasses (``StoreError``, ``ConfigError``, ``TaskError``, ...) and
also derives from the matching builtin (``ValueError``, ``RuntimeError``) so callers that catch
those keep working.
"""

from __future__ import annotations


class Mu2netError(Exception):
    """Base of every error a user can cause; ``str(err)`` is one line naming the culprit."""

    def __str__(self) -> str:
        # One line, whatever the message was built from.
        return " ".join(super().__str__().split())
