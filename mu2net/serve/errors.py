"""Errors of the inference layer, each with the HTTP status the server answers with."""

from __future__ import annotations

from typing import ClassVar

from mu2net.errors import Mu2netError


class ServeError(Mu2netError):
    """An error while answering a request (a server-side fault: HTTP 500)."""

    status: ClassVar[int] = 500


class InputError(ServeError, ValueError):
    """A request whose inputs cannot be used: malformed body, wrong shape, modality or NaN."""

    status: ClassVar[int] = 400


class PayloadTooLarge(InputError):
    """A request body or batch over the configured limit."""

    status: ClassVar[int] = 413


class UnknownTaskError(ServeError, LookupError):
    """A task with no published path (the message lists the tasks that have one)."""

    status: ClassVar[int] = 404

    def __str__(self) -> str:  # LookupError would quote the message like a KeyError
        return str(self.args[0]) if self.args else ""
