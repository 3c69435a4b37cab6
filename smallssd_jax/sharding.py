"""The device mesh and how arrays are laid out on it (docs/design.md §7).

One mesh axis, `data`, over every device of every process: batches are
sharded on it, parameters replicated. Each process contributes its own rows
of a global batch; results come back to the host by gathering every
process's rows.
"""

from __future__ import annotations

import json
from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np

DATA_AXIS = 'data'


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh over `devices` (default: every device of every process), axis `data`."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return jax.sharding.Mesh(devices.reshape(-1), (DATA_AXIS,),
                           axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Leading (batch) axis split over the mesh."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DATA_AXIS))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def to_global_batch(local_batch: dict[str, np.ndarray],
                    mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Each process contributes its own rows; the result is one global array per field."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def to_host(x: jax.Array) -> np.ndarray:
  """A global array on every process's host (the rows of all processes, in order)."""
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def broadcast_from_process_0(value: Any) -> Any:
  """Process 0's JSON-serialisable `value` on every process (the others pass anything)."""
  if jax.process_count() == 1:
    return value
  payload = np.zeros(0, np.uint8)
  if jax.process_index() == 0:
    payload = np.frombuffer(json.dumps(value, default=float).encode(), np.uint8)
  size = int(multihost_utils.broadcast_one_to_all(np.int32(payload.size)))
  buffer = np.zeros(size, np.uint8)
  buffer[:payload.size] = payload
  buffer = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
  return json.loads(buffer.tobytes().decode())
