"""Device mesh and shardings for the trainer: one CPU, a GPU, or a TPU slice with the same code.

A :class:`Partitioner` owns a ``jax.sharding.Mesh`` with a ``data`` axis (batch sharded along it)
and a ``model`` axis (size 1 by default). Parameters are replicated, except that with a model axis
of size m > 1 every parameter with at least :attr:`Partitioner.min_shard_size` scalars and a last
dimension divisible by m is sharded along that last dimension (a simple Megatron-free rule that
keeps large roots' weights split). Momentum traces follow their parameters (same shapes, same
rule). The rule depends on shapes only, so input and output shardings of a step always agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mu2net.errors import Mu2netError
from mu2net.train._gin import gin

DATA_AXIS = "data"
MODEL_AXIS = "model"


class PartitioningError(Mu2netError, ValueError):
    """A batch or mesh that does not fit the devices (names the offending size)."""


def make_mesh(
    data_axis_size: int = -1,
    model_axis_size: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A ``(data, model)`` mesh; ``data_axis_size=-1`` uses every device not on the model axis."""
    devices = list(devices if devices is not None else jax.devices())
    if model_axis_size < 1 or len(devices) % model_axis_size:
        raise PartitioningError(
            f"model_axis_size={model_axis_size} does not divide {len(devices)} devices"
        )
    if data_axis_size == -1:
        data_axis_size = len(devices) // model_axis_size
    need = data_axis_size * model_axis_size
    if data_axis_size < 1 or need > len(devices):
        raise PartitioningError(
            f"mesh data_axis_size={data_axis_size} x model_axis_size={model_axis_size} needs "
            f"{need} devices, {len(devices)} available"
        )
    grid = np.asarray(devices[:need], dtype=object).reshape(data_axis_size, model_axis_size)
    return Mesh(grid, (DATA_AXIS, MODEL_AXIS))


@dataclasses.dataclass(frozen=True)
class Partitioner:
    """Shardings of params, optimizer state and batches on one mesh."""

    mesh: Mesh
    min_shard_size: int = 2**18

    @property
    def num_data(self) -> int:
        """Size of the data axis (the batch must be divisible by it)."""
        return int(self.mesh.shape[DATA_AXIS])

    @property
    def num_model(self) -> int:
        """Size of the model axis."""
        return int(self.mesh.shape[MODEL_AXIS])

    @property
    def key(self) -> tuple:
        """Hashable identity of the mesh (part of compile-cache keys)."""
        ids = tuple(int(d.id) for d in self.mesh.devices.flat)
        return (tuple(self.mesh.shape.items()), ids, self.min_shard_size)

    @property
    def replicated(self) -> NamedSharding:
        """Sharding of a replicated value."""
        return NamedSharding(self.mesh, P())

    @property
    def batch(self) -> NamedSharding:
        """Sharding of a batch array: leading axis split along ``data``."""
        return NamedSharding(self.mesh, P(DATA_AXIS))

    def leaf_sharding(self, shape: Sequence[int]) -> NamedSharding:
        """Sharding of one parameter (or momentum) leaf, from its shape alone."""
        m = self.num_model
        if (
            m > 1
            and len(shape) >= 2
            and shape[-1] % m == 0
            and int(np.prod(shape)) >= self.min_shard_size
        ):
            return NamedSharding(self.mesh, P(*([None] * (len(shape) - 1)), MODEL_AXIS))
        return self.replicated

    def tree_shardings(self, tree: Any) -> Any:
        """Shardings mirroring ``tree`` (params, optimizer state, ...)."""
        return jax.tree_util.tree_map(lambda x: self.leaf_sharding(np.shape(x)), tree)

    def put(self, tree: Any, copy: bool = True) -> Any:
        """Places a pytree on the mesh with :meth:`tree_shardings`.

        ``copy=True`` always makes fresh buffers, so donating them to a step can never
        invalidate an array the caller still holds.
        """
        return jax.tree_util.tree_map(
            lambda x: jax.device_put(x, self.leaf_sharding(np.shape(x)), may_alias=not copy),
            tree,
        )

    def check_batch_size(self, batch_size: int, what: str = "batch") -> None:
        """Raises when ``batch_size`` cannot be split over the data axis."""
        if batch_size % self.num_data:
            raise PartitioningError(
                f"{what} size {batch_size} is not divisible by the mesh data axis "
                f"({self.num_data} devices); pick a multiple of {self.num_data}"
            )

    def shard_batch(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """Puts a batch (dict of arrays with a leading batch axis) on the mesh, split along data."""
        return {k: jax.device_put(v, self.batch) for k, v in batch.items()}


@gin.configurable
def default_partitioner(
    data_axis_size: int = -1, model_axis_size: int = 1, min_shard_size: int = 2**18
) -> Partitioner:
    """The partitioner the trainer uses unless one is passed (gin-configurable)."""
    return Partitioner(make_mesh(data_axis_size, model_axis_size), min_shard_size)
