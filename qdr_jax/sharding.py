"""Device mesh and the placement of every array the train step touches.

The batch is split over the ``data`` axis, the target table and its per-row optimizer
state are split by rows over the same devices, and the encoder parameters are
replicated. Axes are ``Auto`` so that the gather of pooled rows and the scatter of
their updates inside the jitted step are partitioned by XLA (an all-reduce) without
``out_sharding`` annotations at every indexing site.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(config: ml_collections.ConfigDict) -> Mesh:
  """A 1-D mesh over ``config.num_devices`` devices (0 = all local+remote devices)."""
  devices = jax.devices()
  num = config.num_devices or len(devices)
  if num > len(devices):
    raise ValueError(
        f"config.sharding.num_devices={num} but only {len(devices)} devices are visible "
        "(on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N).")
  return Mesh(np.asarray(devices[:num]), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def row_sharding(mesh: Mesh, shard_rows: bool) -> NamedSharding:
  """Leading (row) dimension of the table split over the devices, or replicated."""
  return NamedSharding(mesh, P(DATA_AXIS)) if shard_rows else replicated(mesh)


def padded_rows(num_rows: int, mesh: Mesh) -> int:
  """Rows after padding to a multiple of the device count, so row shards are even."""
  devices = mesh.devices.size
  return int(math.ceil(num_rows / devices) * devices)


def param_sharding(shape: tuple[int, ...], mesh: Mesh, fsdp: bool) -> NamedSharding:
  """Placement of one encoder weight (or an optimizer moment of it).

  Replicated, or with ``fsdp`` (FSDP/ZeRO-3 style) split over the data axis along its
  largest dimension that the device count divides; weights with no such dimension (biases
  of odd sizes, scalars) stay replicated. Under the mesh's ``Auto`` axes XLA gathers a
  split weight where a matmul needs it whole, so only memory changes, not the step code.
  """
  devices = mesh.devices.size
  if not fsdp or devices == 1:
    return replicated(mesh)
  candidates = [d for d in range(len(shape)) if shape[d] % devices == 0]
  if not candidates:
    return replicated(mesh)
  axis = max(candidates, key=lambda d: shape[d])
  spec = [None] * len(shape)
  spec[axis] = DATA_AXIS
  return NamedSharding(mesh, P(*spec))


def place(tree, sharding_of) -> object:
  """``tree`` with every array leaf placed by ``sharding_of(leaf)``; typed PRNG keys too."""

  def put(leaf):
    target = sharding_of(leaf)
    if jax.dtypes.issubdtype(jax.numpy.result_type(leaf), jax.dtypes.prng_key):
      # device_put refuses typed keys for a sharding that spans other processes; their
      # raw data (identical on every process) places like any array.
      data = jax.device_put(jax.random.key_data(leaf), target)
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
    return jax.device_put(leaf, target)

  return jax.tree.map(put, tree)


def put_rows(host: np.ndarray, mesh: Mesh, shard_rows: bool, num_rows: int,
             dtype=None) -> jax.Array:
  """A host array with table rows first, as a row-sharded global array of ``num_rows`` rows.

  Rows past ``host``'s own are zero padding. Each device's block is copied from ``host``
  straight into its own buffer: a block of real rows in the right dtype goes as a view
  (of a memory-mapped table: read from the file into the device buffer, never staged in
  a second host copy), only a padded or cast block is assembled on the host first. So
  neither a padded copy of the whole array nor a single-device copy of it is ever made,
  and in a multi-process job each process only places the rows its devices hold (every
  process must pass the same ``host``). A memory-mapped ``host`` gives its pages back
  afterwards (`release_pages`).
  """
  dtype = np.dtype(dtype or host.dtype)
  shape = (num_rows,) + host.shape[1:]
  sharding = row_sharding(mesh, shard_rows)

  def block(index) -> np.ndarray:
    start, stop, _ = index[0].indices(num_rows)
    if stop <= host.shape[0] and host.dtype == dtype:
      return host[start:stop]
    out = np.zeros((stop - start,) + host.shape[1:], dtype)
    real = max(0, min(stop, host.shape[0]) - start)
    out[:real] = host[start:start + real]
    return out

  # On CPU, device_put of a host array may alias its memory instead of copying (even with
  # may_alias=False): a buffer over a read-only file mapping, or over a temporary, that
  # the step would donate. The on-device copy gives each shard a buffer of its own.
  shards = [jnp.copy(jax.device_put(block(index), device))
            for device, index in sharding.addressable_devices_indices_map(shape).items()]
  placed = jax.make_array_from_single_device_arrays(shape, sharding, shards)
  release_pages(host)
  return placed


def release_pages(host: np.ndarray) -> None:
  """Drops the resident pages of a memory-mapped ``host`` (no-op for other arrays).

  Reading a memory-mapped table to place it leaves its pages resident in the process
  (they count in its RSS until the kernel reclaims them); the devices now hold the rows,
  so hand the pages back now. A later read pages them in again from the file.
  """
  import mmap
  base = host
  while isinstance(base, np.ndarray) and not isinstance(base, np.memmap):
    base = base.base
  region = getattr(base, "_mmap", None)
  if region is not None and hasattr(region, "madvise"):
    region.madvise(mmap.MADV_DONTNEED)


# Gathers are padded to a multiple of this many rows so that refreshes of varying size
# reuse a handful of compiled gathers instead of compiling one per size.
_GATHER_BUCKET = 4096


@functools.lru_cache(maxsize=None)
def _row_gather(mesh: Mesh):
  # Pinned replicated output: XLA gathers across devices (and hosts), so every process
  # gets the rows as one local array without a second collective.
  return jax.jit(lambda table, rows: table[rows].astype(jax.numpy.float32),
                 out_shardings=replicated(mesh))


def rows_to_host(table: jax.Array, rows: np.ndarray, mesh: Mesh) -> np.ndarray:
  """Rows ``rows`` of a row-sharded device array as float32 numpy, on every process.

  Only the requested rows travel (padded to a bucket), never the whole table: the way the
  index's owner reads a training table in chunks. A collective in a multi-process job.
  """
  rows = np.asarray(rows, dtype=np.int32).reshape(-1)
  padded = np.zeros(max(_GATHER_BUCKET, -(-rows.size // _GATHER_BUCKET) * _GATHER_BUCKET),
                    np.int32)
  padded[:rows.size] = rows
  ids = jax.make_array_from_process_local_data(replicated(mesh), padded)
  out = _row_gather(mesh)(table, ids)
  return np.asarray(out.addressable_data(0))[:rows.size]


def set_rows(array: jax.Array, rows: np.ndarray, values: np.ndarray, mesh: Mesh) -> jax.Array:
  """``array`` with rows ``rows`` replaced by ``values`` (same on every process), keeping
  its sharding; only those rows are written, so the cost follows their number."""
  rows = np.asarray(rows, dtype=np.int32).reshape(-1)
  if rows.size == 0:
    return array
  size = max(_GATHER_BUCKET, -(-rows.size // _GATHER_BUCKET) * _GATHER_BUCKET)
  # Padding repeats the first row with its own value, so the scatter stays exact.
  pad = size - rows.size
  rows = np.concatenate([rows, np.full(pad, rows[0], np.int32)])
  values = np.concatenate([values, np.repeat(values[:1], pad, axis=0)]).astype(array.dtype)
  put = lambda x: jax.make_array_from_process_local_data(replicated(mesh), x)
  return _row_scatter(array.sharding)(array, put(rows), put(values))


@functools.lru_cache(maxsize=None)
def _row_scatter(sharding: NamedSharding):
  return jax.jit(lambda a, rows, values: a.at[rows].set(values), out_shardings=sharding,
                 donate_argnums=0)


def device_buffer_bytes(arrays=None) -> dict[int, int]:
  """Bytes held on each addressable device by ``arrays`` (default: every live array).

  Counts each device buffer once. Several `jax.Array` objects can alias one buffer (a
  shard's ``.data``, the views Orbax takes when it checkpoints), so summing ``nbytes``
  over `jax.live_arrays()` counts such buffers two or three times.
  """
  buffers: dict[tuple[int, int], int] = {}
  for array in jax.live_arrays() if arrays is None else arrays:
    for shard in array.addressable_shards:
      buffers[(shard.device.id, shard.data.unsafe_buffer_pointer())] = shard.data.nbytes
  totals = {d.id: 0 for d in jax.local_devices()}
  for (device, _), nbytes in buffers.items():
    totals[device] = totals.get(device, 0) + nbytes
  return totals
