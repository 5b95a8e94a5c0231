"""Multi-process (multi-host) setup: starting JAX's distributed runtime and feeding it data.

One job: turn a single-host run into a data-parallel one over several processes. Each
process loads its own slice of every global batch (``process_batch_slice``) and the slices
become one batch-sharded global array (``host_local_to_global``); the target table and its
per-row optimizer state stay sharded by rows over *all* devices of *all* processes (the
mesh of ``qdr_jax.sharding.make_mesh`` with ``config.sharding.num_devices = 0``), so a
table too large for one host is spread over the hosts' memory.

FAISS runs on hosts, not devices, so every process must see the same negatives. Two ways:

* Process 0 builds and searches the index: the query embeddings are gathered to every
  host (``global_to_host``), process 0 builds the pool and sends it to the others
  (``broadcast_from_lead``, over ``jax.experimental.multihost_utils.broadcast_one_to_all``).
  One index in memory; the other hosts wait for the search.
* Every host keeps its own replica of the index and searches it: no broadcast, but every
  replica must be built from the same table with the same seed (``build_index`` seeds
  every k-means) and searched with the same query batch, so that the pools agree bit for
  bit; the pool's random filling must use the same seed on every host too.

The training loop (``qdr_jax.train.loop``) takes the first way; the pool's shapes follow
from the config, so it travels in one collective (``broadcast_from_lead``).

Process 0's host work can fail (a FAISS error) while the others wait for its result.
``lead_work`` runs such work: on failure in a multi-process job process 0 keeps the error
and goes on through the same collectives as the others (skipping its later lead work),
and the next broadcast (``broadcast_from_lead``, ``broadcast_arrays``) carries an
ok/error flag and the message, so every process raises the same ``LeadProcessError``
instead of waiting forever for a process that has given up.

Arrays placed with ``jax.device_put(host_array, global_sharding)`` or
``sharding.put_rows`` (as ``init_state`` does) work across processes as long as every
process passes the same value.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, TypeVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qdr_jax import platform, sharding

# Read when the config leaves the coordinator unset; JAX itself reads only the first.
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
# Bytes of process 0's error message that travel with a broadcast (longer ones are cut).
ERROR_BYTES = 400

T = TypeVar("T")


class LeadProcessError(RuntimeError):
  """Process 0's host work (a FAISS search, build or refresh) failed while the other
  processes waited for its result; raised on every process with process 0's message."""


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
  """Where this process stands after ``initialize_distributed``.

  Attributes:
    process_index: this process's id, 0 .. process_count - 1.
    process_count: number of processes in the job.
    source: what configured it: "config", "env", "auto", "already" (JAX's distributed
      runtime was running before the call) or "single" (no distributed runtime).
  """
  process_index: int
  process_count: int
  source: str


def _from_env() -> tuple[str, int, int] | None:
  address = os.environ.get(ENV_COORDINATOR, "")
  count = os.environ.get(ENV_NUM_PROCESSES, "")
  index = os.environ.get(ENV_PROCESS_ID, "")
  if not address:
    return None
  if not count or not index:
    raise ValueError(f"{ENV_COORDINATOR} is set, so {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} "
                     "must be set too.")
  return address, int(count), int(index)


def initialize_distributed(config: ml_collections.ConfigDict) -> ProcessInfo:
  """Starts JAX's distributed runtime as ``config.distributed`` (or the environment) says.

  Must run before anything touches a JAX device. In order of precedence:

  1. ``config.distributed.coordinator_address`` "host:port" and ``num_processes`` > 1:
     those values with ``process_id``.
  2. The environment: ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
     ``JAX_PROCESS_ID``.
  3. ``config.distributed.coordinator_address == "auto"``: ``jax.distributed.initialize()``
     with no address, which detects SLURM, Open MPI and Cloud TPU jobs.
  4. Otherwise a single process; nothing is started.

  ``config.distributed.timeout_seconds`` bounds the wait for the other processes to start
  and the silence (no heartbeat) after which a peer counts as dead and the job ends. On
  CPU devices the processes then meet at a barrier of that timeout and run one tiny
  collective, so that the CPU collectives (Gloo) connect while every process is there:
  their connect timeout is XLA's own (30 s, not settable through JAX), too short for a
  peer still loading data on a busy host, whereas once connected they wait.

  Args:
    config: the full config (its ``distributed`` section is read) or that section alone.

  Returns:
    This process's index and the process count.
  """
  cfg = config.distributed if "distributed" in config else config
  if cfg.cpu_collectives:
    # Cross-process collectives on CPU devices (tests, CPU clusters); ignored on GPU/TPU.
    jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
  if jax.distributed.is_initialized():
    return ProcessInfo(jax.process_index(), jax.process_count(), "already")
  timeout = int(cfg.timeout_seconds)
  timeouts = {"initialization_timeout": timeout, "heartbeat_timeout_seconds": timeout}
  auto = cfg.coordinator_address == "auto"
  if cfg.coordinator_address and not auto and int(cfg.num_processes) > 1:
    source, args = "config", (cfg.coordinator_address, int(cfg.num_processes),
                              int(cfg.process_id))
  elif (env := _from_env()) is not None:
    source, args = "env", env
  elif auto:
    jax.distributed.initialize(**timeouts)
    _connect_collectives(timeout)
    return ProcessInfo(jax.process_index(), jax.process_count(), "auto")
  else:
    return ProcessInfo(0, 1, "single")
  address, count, index = args
  if not 0 <= index < count:
    raise ValueError(f"process_id={index} is outside 0..{count - 1}.")
  jax.distributed.initialize(coordinator_address=address, num_processes=count,
                             process_id=index, **timeouts)
  _connect_collectives(timeout)
  return ProcessInfo(jax.process_index(), jax.process_count(), source)


def _connect_collectives(timeout_s: int) -> None:
  """On CPU, connects the collectives of all devices while every process waits here."""
  if jax.process_count() == 1 or not platform.is_cpu():
    return
  barrier("collectives", timeout_s)
  multihost_utils.broadcast_one_to_all(np.int32(0))  # each local device with its peers
  mesh = Mesh(np.asarray(jax.devices()), ("all",))  # and all devices together
  ones = jax.make_array_from_process_local_data(
      NamedSharding(mesh, P("all")), np.ones(jax.local_device_count(), np.int32))
  jax.block_until_ready(jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(ones))


def process_batch_slice(batch_indices: np.ndarray, process_index: int,
                        process_count: int) -> np.ndarray:
  """The part of a global batch that ``process_index`` loads (a contiguous block).

  Process ``i`` of ``n`` takes rows ``[i * B / n, (i + 1) * B / n)``: the block that the
  batch-sharded global array keeps on that process's devices when the mesh lists devices
  in process order (as ``sharding.make_mesh`` does), so no data crosses hosts.

  Args:
    batch_indices: (B, ...) the global batch (e.g. query indices from ``batch_indices``),
      identical on every process.
    process_index: this process, ``jax.process_index()``.
    process_count: ``jax.process_count()``; must divide B.
  """
  batch_indices = np.asarray(batch_indices)
  size = batch_indices.shape[0]
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is outside 0..{process_count - 1}.")
  if size % process_count:
    raise ValueError(f"The global batch of {size} does not split evenly over "
                     f"{process_count} processes.")
  per = size // process_count
  return batch_indices[process_index * per:(process_index + 1) * per]


def _local_block(sharding_: NamedSharding, global_shape: tuple[int, ...]) -> tuple[int, int]:
  """[start, stop) of the leading-dim rows this process's devices hold."""
  spans = [idx[0].indices(global_shape[0])[:2]
           for idx in sharding_.addressable_devices_indices_map(global_shape).values()]
  return min(s for s, _ in spans), max(e for _, e in spans)


def host_local_to_global(tree: Any, mesh: Mesh) -> Any:
  """This process's batch slice(s) -> batch-sharded global arrays over ``mesh``.

  Every leaf is this process's block of the batch (leading dim B / process_count, as
  ``process_batch_slice`` cut it); the result has the global batch size, split over the
  mesh's ``data`` axis. On a single process this is a ``device_put``.

  Raises:
    ValueError: the mesh does not give this process a contiguous block of the batch in
      process order, so ``process_batch_slice`` would have loaded the wrong rows.
  """
  batch_sh = sharding.batch_sharding(mesh)
  count, index = jax.process_count(), jax.process_index()

  def convert(leaf):
    leaf = np.asarray(leaf)
    global_shape = (leaf.shape[0] * count,) + leaf.shape[1:]
    start, stop = _local_block(batch_sh, global_shape)
    if (start, stop) != (index * leaf.shape[0], (index + 1) * leaf.shape[0]):
      raise ValueError(
          f"Process {index} holds batch rows [{start}, {stop}) of {global_shape[0]} under "
          "this mesh, not the block process_batch_slice gives it; build the mesh with the "
          "devices in process order (sharding.make_mesh).")
    return jax.make_array_from_process_local_data(batch_sh, leaf, global_shape)

  return jax.tree.map(convert, tree)


def replicate_to_global(tree: Any, mesh: Mesh) -> Any:
  """Host values that every process holds identically -> replicated global arrays."""
  rep = NamedSharding(mesh, P())
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(rep, np.asarray(x)),
                      tree)


def global_to_host(tree: Any) -> Any:
  """Global (possibly not fully addressable) arrays -> full numpy values on every host.

  ``jax.device_get`` refuses arrays with shards on other processes; this gathers them
  (e.g. the batch's query embeddings, for the host's FAISS search).
  """
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)),
                      tree)


_barriers_passed = 0


def barrier(name: str, timeout_s: float = 3600.0) -> None:
  """Waits until every process reaches ``name`` (no-op on a single process).

  Host-side waits can be long here (process 0 converting a corpus or training a
  quantizer while the others wait). A device-collective barrier
  (``multihost_utils.sync_global_devices``) fails when its first use sets up the CPU
  collectives (Gloo) and a peer is more than 30 s late, so this waits on the
  coordination service that ``jax.distributed.initialize`` started, with ``timeout_s``.
  Every process passes the same barriers in the same order; a call counter makes each
  barrier's id unique, as the coordination service requires, even when a name repeats.
  """
  if jax.process_count() == 1:
    return
  global _barriers_passed
  _barriers_passed += 1
  name = f"{name} #{_barriers_passed}"
  # Private module: JAX's public API has no coordination-service barrier yet.
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  client = jax_distributed.global_state.client
  if client is None:  # a runtime started by other means (e.g. a TPU pod's)
    multihost_utils.sync_global_devices(name)
    return
  client.wait_at_barrier(name, int(timeout_s * 1000))


class CompileThenMeet:
  """A jitted function that, in a multi-process job, is compiled for each new input
  signature on every process before any of them runs it, with a barrier in between.

  The CPU collectives (Gloo) give up on a peer that is more than 30 s late, and a process
  still compiling a large program (the training step, on a loaded host) can be that late
  for the first collective inside it; the compiled program is then reused by the call. On
  one process, and on accelerators (whose collectives wait), it only calls ``fn``: no
  per-call flattening of the arguments there.
  """

  def __init__(self, fn: Callable, name: str):
    self.fn, self.name = fn, name
    self._compiled: set = set()

  def __call__(self, *args, **kwargs):
    if jax.process_count() > 1 and platform.is_cpu():
      leaves, structure = jax.tree.flatten((args, kwargs))
      signature = (structure, tuple(
          (x.shape, x.dtype, getattr(x, "sharding", None)) if hasattr(x, "shape") else type(x)
          for x in leaves))
      if signature not in self._compiled:
        self.fn.lower(*args, **kwargs).compile()
        barrier(f"{self.name} compiled")
        self._compiled.add(signature)
    return self.fn(*args, **kwargs)


def is_lead_process() -> bool:
  """Whether this process owns the host-side work: FAISS, files, logs and evaluation."""
  return jax.process_index() == 0


_pending_error: BaseException | None = None


def lead_work(fn: Callable[..., T], *args, **kwargs) -> T | None:
  """``fn(*args, **kwargs)`` on process 0 (None elsewhere), for host work whose result the
  other processes receive in a later broadcast.

  On one process the call is plain. In a multi-process job an exception is kept instead
  of raised (and later lead work is skipped, returning None) so that process 0 still
  joins the collectives in between; the next ``broadcast_from_lead`` or
  ``broadcast_arrays`` raises it on every process as ``LeadProcessError``.
  """
  global _pending_error
  if jax.process_count() == 1:
    return fn(*args, **kwargs)
  if not is_lead_process() or _pending_error is not None:
    return None
  try:
    return fn(*args, **kwargs)
  except Exception as e:  # pylint: disable=broad-except  # sent to every process
    _pending_error = e
    return None


def _error_text(error: BaseException) -> str:
  text = " ".join(str(error).split()) or type(error).__name__
  return f"process 0 failed: {type(error).__name__}: {text}"


def _raise_lead_error(message: str) -> None:
  """Raises process 0's error everywhere (on process 0, chained to the original)."""
  global _pending_error
  cause, _pending_error = _pending_error, None
  raise LeadProcessError(message) from cause


def _encode_error(error: BaseException | None) -> np.ndarray:
  buffer = np.zeros(ERROR_BYTES, np.uint8)
  if error is not None:
    data = _error_text(error).encode()[:ERROR_BYTES]
    buffer[:len(data)] = np.frombuffer(data, np.uint8)
  return buffer


def broadcast_from_lead(make: Callable[[], Any], like: Any) -> Any:
  """``make()`` run on process 0 and its result on every process, in one collective.

  ``like``: a pytree of arrays (or ``jax.ShapeDtypeStruct``) with the result's shapes and
  dtypes, which every process computes alike (from the config), so no header has to
  travel first. The collective carries an ok flag and ``ERROR_BYTES`` of message too:
  when ``make`` raises on process 0 (or earlier ``lead_work`` failed), every process
  raises the same ``LeadProcessError``. On one process this is ``make()``.
  """
  global _pending_error
  if jax.process_count() == 1:
    return make()
  value = None
  if is_lead_process() and _pending_error is None:
    try:
      value = make()
      if [(np.shape(a), np.asarray(a).dtype) for a in jax.tree.leaves(value)] != [
          (tuple(b.shape), np.dtype(b.dtype)) for b in jax.tree.leaves(like)]:
        raise ValueError("broadcast_from_lead: the value's shapes or dtypes are not "
                         "those every process expects.")
    except Exception as e:  # pylint: disable=broad-except  # sent to every process
      _pending_error, value = e, None
  if value is None:
    value = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), like)
  error = _pending_error if is_lead_process() else None
  sent = {"ok": np.int32(error is None), "error": _encode_error(error), "value": value}
  received = multihost_utils.broadcast_one_to_all(sent)
  if not int(received["ok"]):
    _raise_lead_error(bytes(np.asarray(received["error"], np.uint8)).rstrip(b"\0").decode(
        errors="replace"))
  return jax.tree.map(lambda x, l: np.asarray(x).astype(l.dtype, copy=False),
                      received["value"], like)


def broadcast_arrays(arrays: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
  """Process 0's named arrays on every process, whatever their shapes.

  ``broadcast_one_to_all`` needs every process to pass a tree of the same shapes, which
  only process 0 knows here (the codes of an index it built); so the names, shapes and
  dtypes go first as a small JSON header (``broadcast_from_lead`` saves those two
  collectives where the shapes are known). Other processes pass None. On a single
  process the input is returned as is. A pending ``lead_work`` error on process 0 goes
  instead of the header: every process raises it as ``LeadProcessError``.

  Values keep their dtype except 64-bit ones, which travel as 32-bit when JAX runs
  without x64 (row ids and list ids fit).
  """
  if jax.process_count() == 1:
    if arrays is None:
      raise ValueError("broadcast_arrays needs the arrays on process 0.")
    return arrays
  lead = is_lead_process()
  if lead:
    if arrays is None and _pending_error is None:
      raise ValueError("broadcast_arrays needs the arrays on process 0.")
    if _pending_error is not None:  # a negative size: the header is the error message
      header_bytes = np.frombuffer(_error_text(_pending_error).encode(), np.uint8)
    else:
      arrays = {name: np.asarray(value) for name, value in arrays.items()}
      header = json.dumps([[name, list(a.shape), a.dtype.str] for name, a in arrays.items()])
      header_bytes = np.frombuffer(header.encode(), np.uint8)
  else:
    header_bytes = np.zeros(0, np.uint8)
  failed = lead and _pending_error is not None
  size = int(multihost_utils.broadcast_one_to_all(
      np.int32(-header_bytes.size if failed else header_bytes.size)))
  if not lead:
    header_bytes = np.zeros(abs(size), np.uint8)
  text = bytes(np.asarray(multihost_utils.broadcast_one_to_all(header_bytes),
                          np.uint8)).decode(errors="replace")
  if size < 0:
    _raise_lead_error(text)
  layout = json.loads(text)
  if not lead:
    arrays = {name: np.zeros(shape, np.dtype(dtype)) for name, shape, dtype in layout}
  received = multihost_utils.broadcast_one_to_all(arrays)
  return {name: np.asarray(received[name]).astype(np.dtype(dtype), copy=False)
          for name, _, dtype in layout}
