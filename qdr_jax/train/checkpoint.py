"""Saves and restores the whole train state with Orbax, so that a run resumes exactly.

A checkpoint is one Orbax step directory ``{workdir}/checkpoints/{step}/`` with three
items:

* ``state``: the `TrainState` pytree (encoder params and optimizer state, the padded
  target table and its per-row optimizer state, learned codebooks, step, PRNG key).
  Typed PRNG keys are stored as their raw ``key_data`` and re-wrapped on restore.
* ``index``: the FAISS index the loop was searching at that step, serialized to bytes,
  and the rows moved since its last refresh (a packed bit mask). Between two scheduled
  rebuilds that index was built from an *older* table, so it cannot be rebuilt from the
  saved one, and its learned parts (codebooks written in, or centroids and a rotation that
  only FAISS trained) cannot be retrained alike; storing it is what makes a resume
  bit-exact. In a multi-process job only process 0 holds the index: it alone writes these
  bytes (Orbax writes a NumPy leaf from process 0 only), and every process reads them back
  on restore, so that a damaged index makes all of them fall back alike.
* ``meta``: JSON (config, dataset, corpus size, table shape, model, index factory, step
  = data-iterator position, the corpus and encoder fingerprints) plus the path, shape and
  dtype and a fingerprint of every array. The structure is compared with the restore
  target before any array is read (a changed setting is a mismatch, not corruption); the
  fingerprints are checked after: Orbax/tensorstore detect truncated files, but a flipped
  byte inside an array chunk restores silently otherwise.

Orbax writes a step into ``{step}.orbax-checkpoint-tmp-*`` and renames it when complete,
so a save killed part way leaves the previous steps untouched and is ignored (and cleaned
up) by the next manager. A checkpoint that fails to restore or verify is reported and,
when restoring "the latest", set aside to ``corrupt/`` (process 0, writable managers) and
the previous one is tried; a mismatch with the config stops at once and moves nothing.
The metadata, the array fingerprints and the rules they are checked by live in
`qdr_jax.train.resume`; this module is the Orbax I/O and the manager.
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import time
import warnings
import zlib
from typing import Any, Callable, Mapping, Sequence

import faiss
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from qdr_jax import distributed
from qdr_jax.train.resume import (FORMAT_VERSION, MetadataMismatchError, fingerprints,
                                  is_prng_key, path_name, structure, structure_mismatches,
                                  validate_metadata)

CHECKPOINT_SUBDIR = "checkpoints"
CORRUPT_SUBDIR = "corrupt"
_STATE, _INDEX, _META = "state", "index", "meta"
# Checkpoints are ranked by eval.primary_metric, and every measure it may name (nDCG,
# recall, top-k answer accuracy, ...) is higher-is-better.
BEST_MODE = "max"
# Saves write files in a background thread after the device-to-host copy, so training
# continues while they are written.
ASYNC_SAVE = True
# Host memory a restore may stage at once (at least the largest shard it reads); without
# a bound, all of a process's table rows and their optimizer state are staged at once.
RESTORE_BUFFER_MIB = 256


class CheckpointError(RuntimeError):
  """No readable checkpoint (missing, corrupt, truncated or failing verification)."""


class CorruptCheckpointWarning(RuntimeWarning):
  """A checkpoint could not be restored; an older one was used instead."""


def checkpoint_dir(workdir: str | pathlib.Path) -> pathlib.Path:
  return pathlib.Path(workdir) / CHECKPOINT_SUBDIR


def has_checkpoint(workdir: str | pathlib.Path) -> bool:
  """True when ``workdir`` holds at least one finalized checkpoint step."""
  directory = checkpoint_dir(workdir)
  return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


# ----------------------------------------------------------------------------- resume


def check_resumable(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                    corpus_size: int, dim: int, inputs: Mapping[str, str]) -> None:
  """Refuses, before any work, to resume ``workdir``'s latest checkpoint with ``config``
  (see `validate_metadata` with ``resume=True``); nothing to do without a checkpoint.

  The loop checks again when it resumes; this early check spares the corpus embedding
  and the "before" evaluation a run that would be refused, and writes nothing.
  """
  if not has_checkpoint(workdir):
    return
  with Checkpointer(checkpoint_dir(workdir), read_only=True) as ckpt:
    try:
      saved = ckpt.read_metadata()
    except CheckpointError:
      return  # nothing readable: the loop's writable manager sets the steps aside
  validate_metadata(saved, config, corpus_size, dim, inputs=inputs, resume=True)


# ----------------------------------------------------------------------------- arrays


def _to_saveable(tree):
  return jax.tree.map(lambda x: jax.random.key_data(x) if is_prng_key(x) else x, tree)


def _key_impls(tree) -> dict[str, str]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {path_name(p): str(jax.random.key_impl(x)) for p, x in flat if is_prng_key(x)}


def _abstract(leaf, default_sharding) -> jax.ShapeDtypeStruct:
  """A restore target for ``leaf`` (array or ShapeDtypeStruct), key data for keys."""
  sharding = getattr(leaf, "sharding", None) or default_sharding
  if is_prng_key(leaf):
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
  return jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype, sharding=sharding)


def _largest_shard_bytes(abstract) -> int:
  """Bytes of the largest single-device shard among ``abstract``'s leaves."""
  largest = 0
  for leaf in jax.tree.leaves(abstract):
    shape = leaf.sharding.shard_shape(leaf.shape)
    largest = max(largest, int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize)
  return largest


# ----------------------------------------------------------------------------- manager


@dataclasses.dataclass(frozen=True)
class Restored:
  """A restored checkpoint.

  Attributes:
    step: the checkpoint's step (= updates applied = data-iterator position).
    state: the restored tree, in the target's structure and shardings.
    metadata: the checkpoint's JSON metadata.
    index: the FAISS index saved with it, or None (not requested, not saved, or a
      process other than 0 of a multi-process job).
    changed_rows: the (rows,) bool mask of the rows moved since that index's last
      refresh, or None (not saved: all rows count as moved).
  """
  step: int
  state: Any
  metadata: dict
  index: faiss.Index | None
  changed_rows: np.ndarray | None = None


class Checkpointer:
  """Async Orbax checkpoints of a `TrainState`: the last ``keep`` plus the best ``keep_best``.

  Args:
    directory: the checkpoint root (usually ``checkpoint_dir(workdir)``).
    keep: most recent checkpoints kept.
    keep_best: checkpoints kept for the best ``best_metric`` (0 = none); only saves that
      were given ``metrics`` compete.
    best_metric: key of the ``metrics`` dict passed to `save` that ranks checkpoints
      (higher is better: ``BEST_MODE``).
    async_save: write in a background thread after the device-to-host copy. Meanwhile a
      second copy of the local state exists: the host copy on accelerators; on CPU, where
      the "copy" is the device buffer itself, the next step cannot donate buffers that are
      still being written and allocates new ones.
    compress: zstd-compress the saved arrays. Compression encodes every array from a host
      copy, which on CPU costs about the local state's size in extra memory during a
      save; float tables gain little from it (optimizer moments of untouched rows do).
    restore_buffer_bytes: host memory a restore may stage at once (raised to the largest
      shard it reads): arrays are read into host buffers before they go to their devices,
      and a row-sharded state read all at once would stage all of its local rows.
    read_only: never write, clean up or move anything (evaluation, export).
  """

  def __init__(self, directory: str | pathlib.Path, *, keep: int = 2, keep_best: int = 0,
               best_metric: str = "", async_save: bool = True,
               compress: bool = False, restore_buffer_bytes: int = RESTORE_BUFFER_MIB << 20,
               read_only: bool = False):
    self.directory = pathlib.Path(directory).absolute()
    self.read_only = read_only
    self.compress, self.restore_buffer_bytes = bool(compress), int(restore_buffer_bytes)
    self.best_metric = best_metric if keep_best else ""
    policy = None
    if not read_only:
      cp = ocp.checkpoint_managers
      policies = [cp.LatestN(n=max(int(keep), 1))]
      if self.best_metric:
        policies.append(cp.BestN(get_metric_fn=self._metric, reverse=BEST_MODE == "min",
                                 n=int(keep_best), keep_checkpoints_without_metrics=False))
      policy = cp.AnyPreservationPolicy(policies)
    # Orbax's main-thread barriers default to device collectives: on CPU those are Gloo's,
    # which give up on a process more than 30 s late (one still writing or compiling on
    # a loaded host). Naming the processes makes every Orbax barrier wait on the
    # coordination service instead, with Orbax's own timeout, as its background-thread
    # barriers already do; Orbax then leaves the root directory to us.
    multiprocess = jax.process_count() > 1
    processes = ocp.options.MultiprocessingOptions(
        active_processes=set(range(jax.process_count())) if multiprocess else None)
    if multiprocess and not read_only:
      if distributed.is_lead_process():
        self.directory.mkdir(parents=True, exist_ok=True)
      distributed.barrier("checkpoint directory")
    options = ocp.CheckpointManagerOptions(
        read_only=read_only, create=not read_only and not multiprocess,
        preservation_policy=policy,
        best_fn=self._metric if self.best_metric else None, best_mode=BEST_MODE,
        enable_async_checkpointing=async_save, multiprocessing_options=processes,
        # Leftovers of a killed save are never valid; remove them when we may write.
        cleanup_tmp_directories=not read_only)
    if read_only and not self.directory.is_dir():
      raise FileNotFoundError(f"no checkpoint directory {self.directory}")
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={_STATE: ocp.PyTreeCheckpointHandler(use_compression=self.compress),
                       _INDEX: ocp.PyTreeCheckpointHandler(),
                       _META: ocp.JsonCheckpointHandler()})

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                  read_only: bool = False) -> "Checkpointer":
    ck = config.checkpoint
    return cls(checkpoint_dir(workdir), keep=ck.keep, keep_best=ck.get("keep_best", 0),
               best_metric=config.eval.primary_metric, async_save=ASYNC_SAVE,
               compress=ck.get("compress", False),
               restore_buffer_bytes=RESTORE_BUFFER_MIB << 20,
               read_only=read_only)

  def _metric(self, metrics: Mapping[str, Any]) -> float:
    return float(metrics[self.best_metric])

  # --------------------------------------------------------------------------- queries

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The best step by ``best_metric``, or the latest when nothing is ranked."""
    return self._manager.best_step()

  def step_path(self, step: int) -> pathlib.Path:
    return self.directory / str(step)

  # --------------------------------------------------------------------------- saving

  def save(self, state, metadata: Mapping[str, Any], *, index: faiss.Index | None = None,
           changed_rows: np.ndarray | None = None,
           metrics: Mapping[str, float] | None = None) -> bool:
    """Starts saving ``state`` (and ``index``) at step ``metadata["step"]``.

    Returns after the device-to-host copy; the files are written in the background
    (call `wait_until_finished` before reading them). The state may be donated to the
    next step right away: Orbax holds host copies. Returns False when that step is
    already saved.

    ``index`` is process 0's: in a multi-process job the others pass None and the index
    is saved when process 0 has one. ``changed_rows``: a boolean mask of the rows moved
    since the index's last refresh, saved with it (the same on every process).
    """
    if self.read_only:
      raise CheckpointError(f"{self.directory} was opened read-only")
    step = int(metadata["step"])
    if step in self._manager.all_steps():
      return False
    tree = _to_saveable(state)
    meta = dict(metadata, fingerprints=fingerprints(tree), structure=structure(tree),
                prng_impls=_key_impls(state), saved_at=time.time())
    items = {_STATE: ocp.args.PyTreeSave(tree)}
    saved_index = _index_item(index, changed_rows)
    if saved_index is not None:
      item, meta["index_crc32"], meta["index_changed_rows"] = saved_index
      items[_INDEX] = ocp.args.PyTreeSave(item)
    items[_META] = ocp.args.JsonSave(meta)
    ranked = None
    if self.best_metric and metrics and self.best_metric in metrics:
      ranked = {self.best_metric: float(metrics[self.best_metric])}
    return bool(self._manager.save(step, args=ocp.args.Composite(**items), metrics=ranked,
                                   force=True))

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # --------------------------------------------------------------------------- restoring

  def read_metadata(self, step: int | None = None) -> dict:
    """The JSON metadata of ``step`` (default: the latest readable checkpoint)."""
    return self._with_fallback(step, self._read_meta, verb="read the metadata of")[1]

  def restore(self, target, step: int | None = None, *, with_index: bool = True
              ) -> Restored:
    """Restores a whole state into ``target``'s structure, shapes and shardings.

    Args:
      target: a `TrainState` (concrete, or of ``jax.ShapeDtypeStruct`` leaves with
        ``sharding=``) laid out for the current mesh; it may have another device count
        than the saving run (the padded table rows are padded or truncated).
      step: the step to restore; None restores the latest readable checkpoint, falling
        back to older ones (with a `CorruptCheckpointWarning`) when it is corrupt.
      with_index: also load the saved FAISS index.

    Raises:
      FileNotFoundError: no checkpoint at all.
      CheckpointError: ``step`` (or every checkpoint) is unreadable or fails verification.
    """
    return self._with_fallback(
        step, lambda s: self._restore(s, target, partial=False, with_index=with_index),
        verb="restore")[1]

  def restore_arrays(self, targets: Mapping[str, Any], step: int | None = None, *,
                     with_index: bool = False) -> Restored:
    """Restores only the named fields of the saved state (e.g. ``params`` and ``table``).

    Args:
      targets: field name -> subtree of arrays or ``jax.ShapeDtypeStruct`` (default:
        the first device) to restore into.
      step, with_index: as for `restore`.

    Returns:
      `Restored` whose ``state`` is a dict with the keys of ``targets``.
    """
    return self._with_fallback(
        step, lambda s: self._restore(s, dict(targets), partial=True, with_index=with_index),
        verb="restore")[1]

  def _with_fallback(self, step: int | None, fn: Callable[[int], Any], *, verb: str):
    steps = self.all_steps()
    if step is not None:
      if step not in steps:
        raise CheckpointError(f"no checkpoint for step {step} in {self.directory} "
                              f"(steps: {steps or 'none'})")
      candidates = [step]
    elif not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    else:
      candidates = steps[::-1]
    failures = []
    for s in candidates:
      try:
        return s, fn(s)
      except MetadataMismatchError:
        raise  # a good checkpoint of another run: never set aside, never skipped
      except Exception as e:  # pylint: disable=broad-except
        # Orbax and tensorstore raise ValueError, KeyError, OSError, ... for damaged
        # files; a state structure that differs was refused above (MetadataMismatchError)
        # before any array was read, so what fails here is the files themselves.
        detail = (str(e).strip().splitlines() or [""])[0][:300]
        message = (f"could not {verb} checkpoint {self.step_path(s)}: "
                   f"{type(e).__name__}: {detail}")
        if step is not None:
          raise CheckpointError(message) from e
        failures.append(message)
        moved = self._set_aside(s)
        older = [c for c in candidates if c < s]
        warnings.warn(message + (f"; moved to {moved}" if moved else "")
                      + (f"; falling back to step {older[0]}" if older else ""),
                      CorruptCheckpointWarning, stacklevel=3)
        logging.warning("%s", failures[-1])
    raise CheckpointError(f"no readable checkpoint in {self.directory}:\n  "
                          + "\n  ".join(failures))

  def _set_aside(self, step: int) -> pathlib.Path | None:
    """Moves an unreadable step out of the way (writable managers on process 0 only), so
    that the resumed run can save that step again; nothing is deleted."""
    if self.read_only or jax.process_index() != 0:
      return None  # other processes read the same files and fall back the same way
    dest = self.directory / CORRUPT_SUBDIR / f"{step}-{time.time_ns()}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(self.step_path(step)), str(dest))
    self._manager.reload()
    return dest

  def _read_meta(self, step: int) -> dict:
    meta = self._manager.restore(step, args=ocp.args.Composite(
        **{_META: ocp.args.JsonRestore()}))[_META]
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
      raise CheckpointError(f"metadata of step {step} is missing or has an unknown format")
    return meta

  def _restore(self, step: int, target, *, partial: bool, with_index: bool) -> Restored:
    meta = self._read_meta(step)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: _abstract(x, default), target)
    table = target.get("table") if partial else getattr(target, "table", None)
    rows_now = None if table is None else np.shape(table)[0]
    resize = rows_now is not None and rows_now != meta.get("table_rows")

    def row_leaf(shape: Sequence[int]) -> bool:
      # Only the table-row leaves may change length: padding for another device count.
      return resize and len(shape) >= 1 and shape[0] == rows_now

    if "structure" in meta:  # compared before any array is read
      problems = structure_mismatches(meta["structure"], structure(abstract),
                                      partial=partial, row_leaf=row_leaf)
      if problems:
        raise MetadataMismatchError(
            f"checkpoint {self.step_path(step)} holds another state structure than the "
            f"config builds (a changed setting such as table.dtype or optim.row_optimizer, "
            f"not corruption): " + "; ".join(problems[:8])
            + (f"; and {len(problems) - 8} more" if len(problems) > 8 else ""))

    def restore_args(a: jax.ShapeDtypeStruct):
      return ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype,
                                  strict=not row_leaf(a.shape))

    # The state is read by its own handler, whose staging budget fits this target: Orbax
    # refuses a single read larger than the budget, and reading a row-sharded state with
    # no budget stages all of this process's rows in host memory at once.
    budget = max(self.restore_buffer_bytes, _largest_shard_bytes(abstract) + 1)  # > a read
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(restore_concurrent_gb=budget / 1e9)
                          ) as reader:
      tree = reader.restore(self.step_path(step) / _STATE, args=ocp.args.PyTreeRestore(
          item=abstract, restore_args=jax.tree.map(restore_args, abstract),
          partial_restore=partial))
    load_index = with_index and meta.get("index_crc32") is not None
    if load_index:  # by every process (Orbax restores are collective): all check it alike
      names = ("faiss", "changed") if meta.get("index_changed_rows") else ("faiss",)
      out = self._manager.restore(step, args=ocp.args.Composite(**{
          _INDEX: ocp.args.PyTreeRestore(restore_args={
              name: ocp.RestoreArgs(restore_type=np.ndarray) for name in names})}))
    saved = meta.get("fingerprints", {})
    for path, value in fingerprints(tree).items():
      if path not in saved:
        raise CheckpointError(f"array {path!r} has no recorded fingerprint")
      if saved[path] != value:
        raise CheckpointError(f"array {path!r} does not match its fingerprint (corrupt data)")
    impls = meta.get("prng_impls", {})
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    targets = jax.tree.leaves(target)
    leaves = [jax.random.wrap_key_data(x, impl=impls.get(path_name(p), "threefry2x32"))
              if is_prng_key(t) else x for (p, x), t in zip(flat, targets)]
    index = changed = None
    if load_index:
      saved_index = {name: np.asarray(v, np.uint8) for name, v in out[_INDEX].items()}
      if _index_crc32(saved_index) != meta["index_crc32"]:
        raise CheckpointError("the saved FAISS index does not match its checksum")
      if distributed.is_lead_process():  # the others hold no index
        index = faiss.deserialize_index(saved_index["faiss"])
      if "changed" in saved_index:
        changed = np.unpackbits(saved_index["changed"],
                                count=int(meta["index_changed_rows"])).astype(bool)
    return Restored(step=step, state=jax.tree.unflatten(treedef, leaves), metadata=meta,
                    index=index, changed_rows=changed)


def _index_crc32(item: Mapping[str, np.ndarray]) -> int:
  """CRC-32 of the index bytes, then of the changed-rows mask when there is one."""
  crc = zlib.crc32(item["faiss"].tobytes())
  return zlib.crc32(item["changed"].tobytes(), crc) if "changed" in item else crc


def _index_item(index: faiss.Index | None, changed_rows: np.ndarray | None
                ) -> tuple[dict[str, np.ndarray], int, int] | None:
  """(the ``index`` item, its CRC-32, the mask's length or 0) to save, or None.

  Process 0's index is serialized; in a multi-process job the others learn whether there
  is one and its checksum (the metadata is the same everywhere) and pass a one-byte
  placeholder: Orbax writes a NumPy leaf from process 0 alone.
  """
  item = None
  if index is not None:
    item = {"faiss": faiss.serialize_index(index)}
    if changed_rows is not None:
      item["changed"] = np.packbits(np.asarray(changed_rows, bool))
  if jax.process_count() > 1:
    header = distributed.broadcast_arrays(None if not distributed.is_lead_process() else {
        "present": np.int32([item is not None]),
        "crc": np.uint32([_index_crc32(item) if item is not None else 0]),
        "rows": np.int32([0 if item is None or changed_rows is None else len(changed_rows)])})
    if not header["present"][0]:
      return None
    if item is None:
      item = {"faiss": np.zeros(1, np.uint8)}
      if header["rows"][0]:
        item["changed"] = np.zeros(1, np.uint8)
    return item, int(header["crc"][0]), int(header["rows"][0])
  if item is None:
    return None
  return item, _index_crc32(item), 0 if changed_rows is None else len(changed_rows)
