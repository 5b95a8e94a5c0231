"""What a checkpoint records to be resumed exactly, and the rules that refuse misuse.

A checkpoint's metadata (`make_metadata`) names the run's config, data set, corpus size,
table shape, model, index factory and input fingerprints; `validate_metadata` refuses a
checkpoint of another run, or a resume with a config that differs outside
``RESUMABLE_KEYS``, and `config_from_metadata` rebuilds the config a checkpoint was
trained with. `structure` and `fingerprints` describe and checksum every array of a
state, so a restore compares the structure before reading an array and detects a
flipped byte after. The Orbax I/O that stores all this is `qdr_jax.train.checkpoint`.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from qdr_jax import fingerprint
from qdr_jax.config import base_config

FORMAT_VERSION = 1


class MetadataMismatchError(ValueError):
  """A checkpoint was written for another model, table dimension, corpus, encoder, config
  or state structure: a good checkpoint of another run, never set aside as corrupt."""


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


def path_name(path) -> str:
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


def is_prng_key(x) -> bool:
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
  """``{path: fingerprint}`` of every array leaf of ``tree`` (typed keys as key data).

  A collective in a multi-process job: every process passes its state.
  """
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  if not flat:
    return {}
  alone = [np.ndim(x) > 0 and np.dtype(x.dtype).itemsize * int(np.prod(np.shape(x)))
           >= _FINGERPRINT_ALONE_BYTES for _, x in flat]
  together = [x for (_, x), a in zip(flat, alone) if not a]
  values = iter(jax.device_get(_fingerprint_leaves(together)) if together else [])
  large = [x for (_, x), a in zip(flat, alone) if a]
  sums = iter(_fingerprints_by_shard(large) if large else [])
  return {path_name(path): int(next(sums) if a else next(values))
          for (path, _), a in zip(flat, alone)}


# Leaves at least this large are fingerprinted shard by shard, a block of rows at a time
# (`_fingerprints_by_shard`); the rest in one program.
_FINGERPRINT_ALONE_BYTES = 16 << 20
# Elements of a row block: its uint32 words are the fingerprint's only scratch (16 MiB).
_FINGERPRINT_BLOCK_ELEMENTS = 1 << 22


def _fingerprints_by_shard(leaves: list) -> list[int]:
  """`_fingerprint_leaves`'s values for large arrays, with scratch independent of size.

  Widening a whole table shard to uint32 words costs 2-4 times the shard. Instead each
  process sums, for the shards it holds (one replica of each), the weighted bits of a
  block of rows at a time, with the shard's offsets in the whole array; the partial sums
  of all processes add up mod 2**32 to the same value.
  """
  per_shard: list[tuple[int, jax.Array]] = []  # dispatched together, fetched once
  for i, leaf in enumerate(leaves):
    leaf = leaf if isinstance(leaf, jax.Array) else jnp.asarray(leaf)
    strides = np.cumprod((leaf.shape[1:] + (1,))[::-1])[::-1].astype(np.uint32)
    row_elements = max(1, int(np.prod(leaf.shape[1:])))
    for shard in leaf.addressable_shards:
      if shard.replica_id != 0 or shard.data.size == 0:
        continue
      starts = np.array([s.indices(n)[0] for s, n in zip(shard.index, leaf.shape)],
                        np.uint32)
      rows = max(1, min(shard.data.shape[0], _FINGERPRINT_BLOCK_ELEMENTS // row_elements))
      per_shard.append((i, _shard_fingerprint(shard.data, starts, strides, rows)))
  partial = np.zeros(len(leaves), np.uint64)
  for (i, _), value in zip(per_shard, jax.device_get([v for _, v in per_shard])):
    partial[i] += int(value)
  partial = (partial % 2**32).astype(np.uint32)  # what each process adds, mod 2**32
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    partial = np.asarray(multihost_utils.process_allgather(partial)).sum(0, dtype=np.uint64)
  return [int(v) % 2**32 for v in partial]


@functools.partial(jax.jit, static_argnums=3)
def _shard_fingerprint(shard: jax.Array, starts: jax.Array, strides: jax.Array,
                       block: int) -> jax.Array:
  """Sum of (bits * (2 * flat_index + 1)) mod 2**32 over one shard, ``block`` rows at a time.

  ``flat_index = sum over axes of (starts + local index) * strides`` (the whole array's
  strides), so the sum splits into the bits' total and, per axis, their marginal weighted
  by the index: per block, one fused reduction per axis over the block's uint32 words.
  """
  n = shard.shape[0]
  blocks = -(-n // block)

  def add_block(i, carry):
    total, shard = carry
    # The shard rides in the carry behind a barrier: otherwise XLA hoists the widening
    # out of the loop, converting the whole shard at once.
    shard = jax.lax.optimization_barrier(shard)
    first = jnp.minimum(i * block, n - block)  # the last block overlaps the one before
    local = first + jnp.arange(block, dtype=jnp.uint32)
    keep = (local >= i * block).astype(jnp.uint32)
    u = _unsigned(jax.lax.dynamic_slice_in_dim(shard, first, block))
    u = u * keep.reshape((block,) + (1,) * (u.ndim - 1))
    bits = jnp.sum(u, dtype=jnp.uint32)
    weighted = jnp.uint32(0)
    for axis in range(u.ndim):
      others = tuple(a for a in range(u.ndim) if a != axis)
      marginal = jnp.sum(u, axis=others, dtype=jnp.uint32)
      index = (local if axis == 0 else jnp.arange(u.shape[axis], dtype=jnp.uint32)
               ) + starts[axis]
      weighted = weighted + strides[axis] * jnp.sum(marginal * index, dtype=jnp.uint32)
    return total + bits + jnp.uint32(2) * weighted, shard

  return jax.lax.fori_loop(0, blocks, add_block, (jnp.uint32(0), shard))[0]


def structure(tree) -> dict[str, dict]:
  """``{path: {"shape", "dtype"}}`` of every leaf (arrays or ShapeDtypeStructs)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {path_name(p): {"shape": [int(n) for n in np.shape(x)], "dtype": str(x.dtype)}
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
