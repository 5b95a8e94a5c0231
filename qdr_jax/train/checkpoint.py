"""Saves and restores the whole train state with Orbax, so that a run resumes exactly.

A checkpoint is one Orbax step directory ``{workdir}/checkpoints/{step}/`` with three
items:

* ``state``: the `TrainState` pytree (encoder params and optimizer state, the padded
  target table and its per-row optimizer state, learned codebooks, step, PRNG key).
  Typed PRNG keys are stored as their raw ``key_data`` and re-wrapped on restore.
* ``index``: the FAISS index the loop was searching at that step, serialized to bytes.
  Between two scheduled rebuilds that index was built from an *older* table, so it cannot
  be rebuilt from the saved one; storing it is what makes a resume bit-exact.
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
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import signal
import threading
import time
import warnings
import zlib
from typing import Any, Callable, Mapping, Sequence

import faiss
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from qdr_jax import distributed, fingerprint
from qdr_jax.config import base_config

CHECKPOINT_SUBDIR = "checkpoints"
CORRUPT_SUBDIR = "corrupt"
FORMAT_VERSION = 1
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


class MetadataMismatchError(ValueError):
  """A checkpoint was written for another model, table dimension, corpus, encoder, config
  or state structure: a good checkpoint of another run, never set aside as corrupt."""


class CorruptCheckpointWarning(RuntimeWarning):
  """A checkpoint could not be restored; an older one was used instead."""


def checkpoint_dir(workdir: str | pathlib.Path) -> pathlib.Path:
  return pathlib.Path(workdir) / CHECKPOINT_SUBDIR


def has_checkpoint(workdir: str | pathlib.Path) -> bool:
  """True when ``workdir`` holds at least one finalized checkpoint step."""
  directory = checkpoint_dir(workdir)
  return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


# ----------------------------------------------------------------------------- metadata


def make_metadata(config: ml_collections.ConfigDict, *, step: int, corpus_size: int,
                  table_rows: int, dim: int, table_dtype: str, has_codebooks: bool,
                  inputs: Mapping[str, str] | None = None,
                  index_params: Sequence[str] = ()) -> dict:
  """The JSON stored next to a state: enough to rebuild the run and to refuse misuse.

  ``inputs`` are the run's `qdr_jax.fingerprint.input_fingerprints` (corpus, encoder);
  ``index_params`` the names of the learned index parameters in the state
  (``TrainState.index_params``; the key's presence marks a state with that field).
  """
  return {
      "format": FORMAT_VERSION,
      "step": int(step),
      "dataset": config.data.name,
      "corpus_size": int(corpus_size),
      "table_rows": int(table_rows),
      "table_dim": int(dim),
      "table_dtype": str(table_dtype),
      "model": config.model.query_encoder,
      "mode": config.train.mode,
      "index_factory": config.index.factory,
      "has_codebooks": bool(has_codebooks),
      "index_params": list(index_params),
      "input_fingerprints": dict(inputs or {}),
      "config": json.loads(config.to_json_best_effort()),
  }


# Config keys a resumed run may change; any other difference is refused. Each leaves the
# restored state, the saved index and the data order meaning what they meant:
#   train.steps          the run's length (the schedules then differ: a warning says so);
#   train.log_every, train.profile_steps  logging and profiling only;
#   eval.*               in-loop and final evaluation only (the best-checkpoint ranking
#                        may then mix measures: that is retention, not training);
#   checkpoint.*         how often and how many checkpoints are written and kept;
#   distributed.*        how the processes find each other, not what they compute;
#   sharding.num_devices restore re-pads the table rows for the new device count;
#   table.cache_dir, data.cache_dir  where caches live (their content is keyed by
#                        fingerprint and checked against the checkpoint's).
RESUMABLE_KEYS = ("train.steps", "train.log_every", "train.profile_steps", "eval.*", "checkpoint.*",
                  "distributed.*", "sharding.num_devices", "table.cache_dir",
                  "data.cache_dir")
_ABSENT = "<absent>"


def _config_value(config: ml_collections.ConfigDict, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping) and value:
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _resumable(key: str, allowed: Sequence[str]) -> bool:
  return any(key == a or (a.endswith(".*") and key.startswith(a[:-1])) for a in allowed)


def config_differences(saved: Mapping[str, Any], config: ml_collections.ConfigDict, *,
                       allowed: Sequence[str] = RESUMABLE_KEYS
                       ) -> list[tuple[str, Any, Any]]:
  """(key, checkpoint's value, config's value) of every differing key not in ``allowed``.

  The checkpoint's config is merged into today's defaults first, so a key added to
  `base_config` since it was written compares as its default.
  """
  then = _flatten(json.loads(config_from_metadata(saved).to_json_best_effort()))
  now = _flatten(json.loads(config.to_json_best_effort()))
  return [(key, then.get(key, _ABSENT), now.get(key, _ABSENT))
          for key in sorted(set(then) | set(now))
          if then.get(key, _ABSENT) != now.get(key, _ABSENT)
          and not _resumable(key, allowed)]


def _same_model(saved: str | None, current: str) -> tuple[str | None, str]:
  """(saved, current), equal when both name the same local directory."""
  if saved and os.path.isdir(saved) and os.path.isdir(current):
    if os.path.realpath(saved) == os.path.realpath(current):
      return saved, saved
  return saved, current


def validate_metadata(saved: Mapping[str, Any], config: ml_collections.ConfigDict,
                      corpus_size: int, dim: int, *, also: Sequence[str] = (),
                      inputs: Mapping[str, str] | None = None, resume: bool = False) -> None:
  """Refuses a checkpoint written for another model, table dimension, corpus or config.

  Args:
    saved: the checkpoint's metadata (`Checkpointer.read_metadata`).
    config: the config about to be used with it.
    corpus_size: passages in the corpus that ``config`` loads.
    dim: embedding dimension of ``config``'s encoder.
    also: further dotted config keys that must be equal (e.g. ``"train.mode"``).
    inputs: the `qdr_jax.fingerprint.input_fingerprints` of the corpus and encoder that
      ``config`` loads; compared with the ones the checkpoint recorded (when it did).
    resume: the run continues training from it: every config key outside
      `RESUMABLE_KEYS` must be equal.

  Raises:
    MetadataMismatchError: naming every mismatched field with both values (and the file
      of every changed input), in one message.
  """
  checks = [("model", *_same_model(saved.get("model"), config.model.query_encoder)),
            ("dim", saved.get("table_dim"), int(dim)),
            ("corpus_size", saved.get("corpus_size"), int(corpus_size))]
  saved_config = saved.get("config") or {}
  for key in also:
    try:
      old = _config_value(saved_config, key)
    except (KeyError, TypeError):
      old = None
    new = _config_value(config, key)
    checks.append((key, list(old) if isinstance(old, tuple) else old,
                   list(new) if isinstance(new, tuple) else new))
  if resume:
    # The query encoder was compared above as "model" (equal when the same directory).
    checks += [d for d in config_differences(saved, config) if d[0] != "model.query_encoder"]
  problems = list(dict.fromkeys(f"{name}: checkpoint has {old!r}, config has {new!r}"
                                for name, old, new in checks if old != new))
  if inputs is not None:
    problems += fingerprint.mismatches(saved.get("input_fingerprints"), inputs,
                                       fingerprint.input_sources(config),
                                       recorded_by=f"the checkpoint of step {saved.get('step')}")
  if problems:
    hint = (f" (keys that may change on resume: {', '.join(RESUMABLE_KEYS)})"
            if resume else "")
    raise MetadataMismatchError(
        f"checkpoint at step {saved.get('step')} does not match the config ("
        + "; ".join(problems) + ")" + hint)


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


def config_from_metadata(saved: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """The locked config a checkpoint was trained with (base defaults for keys it lacks)."""

  def merge(node: ml_collections.ConfigDict, values: Mapping[str, Any]):
    for key, value in values.items():
      if isinstance(value, dict) and isinstance(node.get(key), ml_collections.ConfigDict):
        merge(node[key], value)
      elif isinstance(value, list) and isinstance(node.get(key), tuple):
        node[key] = tuple(value)  # JSON has no tuples; keep the base's type
      else:
        with node.ignore_type():
          node[key] = value

  config = base_config()
  merge(config, saved.get("config") or {})
  config.lock()
  return config


# ----------------------------------------------------------------------------- arrays


def _path_name(path) -> str:
  """A key path as ``a/b/0``: the same for a dataclass field and a dict key, so that a
  partial restore into plain dicts checks the fingerprints of a full save."""
  parts = []
  for entry in path:
    for attr in ("name", "key", "idx"):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
    else:
      parts.append(str(entry))
  return "/".join(parts)


def _is_key(x) -> bool:
  return (isinstance(x, (jax.Array, jax.ShapeDtypeStruct))
          and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))


def _unsigned(x: jax.Array) -> jax.Array:
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}.get(x.dtype.itemsize)
  if bits is None:  # 8-byte types (x64 mode): fold the two halves
    return jax.lax.bitcast_convert_type(x, jnp.uint32).sum(-1, dtype=jnp.uint32)
  return jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32)


@jax.jit
def _fingerprint_leaves(leaves: list[jax.Array]) -> list[jax.Array]:
  """Sum of (bits * (2 * flat_index + 1)) mod 2**32 per array.

  Odd weights make any single changed word change the sum. Zero rows appended to the
  table (padding for another device count) leave it unchanged, and it is computed where
  the array lives (no host copy, sharded arrays reduce across devices).
  """
  out = []
  for x in leaves:
    x = jnp.asarray(x)
    u = _unsigned(x)
    flat = jnp.zeros(u.shape, jnp.uint32)
    stride = 1
    for axis in range(u.ndim - 1, -1, -1):
      flat = flat + jax.lax.broadcasted_iota(jnp.uint32, u.shape, axis) * jnp.uint32(stride)
      stride *= u.shape[axis]
    out.append(jnp.sum(u * (flat * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32))
  return out


def fingerprints(tree) -> dict[str, int]:
  """``{path: fingerprint}`` of every array leaf of ``tree`` (typed keys as key data)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  if not flat:
    return {}
  # Row-sized leaves one program each: in one program over all leaves, XLA keeps the
  # temporaries of every leaf's reduction alive together (a fraction of the state).
  alone = [np.dtype(x.dtype).itemsize * int(np.prod(np.shape(x))) >= _FINGERPRINT_ALONE_BYTES
           for _, x in flat]
  together = [x for (_, x), a in zip(flat, alone) if not a]
  values = iter(_fingerprint_leaves(together) if together else [])
  per_leaf = [_fingerprint_leaves([x])[0] if a else next(values)
              for (_, x), a in zip(flat, alone)]
  return {_path_name(path): int(v) for (path, _), v in zip(flat, jax.device_get(per_leaf))}


# Leaves at least this large get their own fingerprint program (see `fingerprints`).
_FINGERPRINT_ALONE_BYTES = 16 << 20


def structure(tree) -> dict[str, dict]:
  """``{path: {"shape", "dtype"}}`` of every leaf (arrays or ShapeDtypeStructs)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_name(p): {"shape": [int(n) for n in np.shape(x)], "dtype": str(x.dtype)}
          for p, x in flat}


def structure_mismatches(saved: Mapping[str, Mapping], expected: Mapping[str, Mapping], *,
                         partial: bool, row_leaf: Callable[[Sequence[int]], bool]
                         ) -> list[str]:
  """How the expected state differs from the saved one (paths, shapes, dtypes).

  Args:
    saved, expected: `structure` of the checkpoint's state and of the restore target.
    partial: only ``expected``'s paths are restored (others may be saved).
    row_leaf: whether a leaf of that expected shape is a table-row leaf, whose first
      dimension may differ (padding for another device count).
  """
  problems = [f"{path}: expected by the config, absent from the checkpoint"
              for path in expected if path not in saved]
  if not partial:
    problems += [f"{path}: in the checkpoint, absent from the state the config builds"
                 for path in saved if path not in expected]
  for path, want in expected.items():
    have = saved.get(path)
    if have is None:
      continue
    shapes_agree = (have["shape"] == want["shape"] or (
        row_leaf(want["shape"]) and have["shape"][1:] == want["shape"][1:]))
    if not shapes_agree or have["dtype"] != want["dtype"]:
      problems.append(f"{path}: checkpoint has {have['dtype']}{tuple(have['shape'])}, "
                      f"config builds {want['dtype']}{tuple(want['shape'])}")
  return problems


def _to_saveable(tree):
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _key_impls(tree) -> dict[str, str]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_name(p): str(jax.random.key_impl(x)) for p, x in flat if _is_key(x)}


def _abstract(leaf, default_sharding) -> jax.ShapeDtypeStruct:
  """A restore target for ``leaf`` (array or ShapeDtypeStruct), key data for keys."""
  sharding = getattr(leaf, "sharding", None) or default_sharding
  if _is_key(leaf):
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
    index: the FAISS index saved with it, or None (not requested or not saved).
  """
  step: int
  state: Any
  metadata: dict
  index: faiss.Index | None


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
           metrics: Mapping[str, float] | None = None) -> bool:
    """Starts saving ``state`` (and ``index``) at step ``metadata["step"]``.

    Returns after the device-to-host copy; the files are written in the background
    (call `wait_until_finished` before reading them). The state may be donated to the
    next step right away: Orbax holds host copies. Returns False when that step is
    already saved.
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
    if index is not None:
      blob = faiss.serialize_index(index)
      meta["index_crc32"] = zlib.crc32(blob.tobytes())
      items[_INDEX] = ocp.args.PyTreeSave({"faiss": blob})
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
    if load_index:
      out = self._manager.restore(step, args=ocp.args.Composite(**{
          _INDEX: ocp.args.PyTreeRestore(
              restore_args={"faiss": ocp.RestoreArgs(restore_type=np.ndarray)})}))
    saved = meta.get("fingerprints", {})
    for path, value in fingerprints(tree).items():
      if path not in saved:
        raise CheckpointError(f"array {path!r} has no recorded fingerprint")
      if saved[path] != value:
        raise CheckpointError(f"array {path!r} does not match its fingerprint (corrupt data)")
    impls = meta.get("prng_impls", {})
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    targets = jax.tree.leaves(target)
    leaves = [jax.random.wrap_key_data(x, impl=impls.get(_path_name(p), "threefry2x32"))
              if _is_key(t) else x for (p, x), t in zip(flat, targets)]
    index = None
    if load_index:
      blob = np.asarray(out[_INDEX]["faiss"], dtype=np.uint8)
      if zlib.crc32(blob.tobytes()) != meta["index_crc32"]:
        raise CheckpointError("the saved FAISS index does not match its checksum")
      index = faiss.deserialize_index(blob)
    return Restored(step=step, state=jax.tree.unflatten(treedef, leaves), metadata=meta,
                    index=index)


# ----------------------------------------------------------------------------- preemption


class StopSignal:
  """Turns SIGTERM and SIGINT (Ctrl-C) into a request the training loop honours after the
  current step.

  Installed only while the ``with`` block runs and only in the main thread (where
  Python delivers signals); the previous handlers are restored on exit, so the signals
  act as usual outside the loop. A second Ctrl-C while the step finishes interrupts at
  once (``KeyboardInterrupt``), as a user pressing it again expects.
  """

  def __init__(self, enabled: bool = True,
               signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)):
    self.enabled = enabled and threading.current_thread() is threading.main_thread()
    self.signals = tuple(signals)
    self.requested = False
    self._previous: dict[int, Any] = {}

  def _handle(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    logging.warning("received signal %d: saving a checkpoint after this step (Ctrl-C again "
                    "stops at once, without saving)", signum)
    self.requested = True
    self._signum = signum

  def __enter__(self) -> "StopSignal":
    self._acknowledged, self._signum = False, None
    if self.enabled:
      for s in self.signals:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def release(self) -> None:
    """Restores the previous handlers (the loop is over); idempotent."""
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()

  def acknowledge(self) -> None:
    """The loop saved and is stopping because of the signal."""
    self._acknowledged = True

  def __exit__(self, *exc) -> None:
    self.release()
    if self.requested and not self._acknowledged and self._signum is not None:
      # The signal came too late for the loop to act on it: deliver it as if we had
      # never caught it (by default, SIGTERM terminates).
      signal.raise_signal(self._signum)
