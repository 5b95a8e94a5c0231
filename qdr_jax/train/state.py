"""The train state: everything a step reads and writes, as one pytree."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from qdr_jax import sharding
from qdr_jax.quant import Quantizer, index_params as select_index_params
from qdr_jax.train import optim
from qdr_jax.train.modes import Mode


@flax.struct.dataclass
class TrainState:
  """Query encoder, target table and their optimizer states.

  Attributes:
    step: int32 scalar, number of updates applied.
    params: query-encoder parameters (Flax pytree).
    encoder_opt_state: optax state of the encoder.
    table: (rows, d) target embeddings, rows padded to a multiple of the device count;
      sharded by rows.
    row_opt_state: per-row optimizer state, every leaf with the table's rows first; an
      `optim.MasterRows` (with float32 copies of the rows) for a bfloat16 table with
      ``table.bf16_update='master'``.
    index_params: the learned index parameters (``mode.learn``), a dict of some of
      "codebooks" (M, K, dsub), "centroids" (nlist, d_out) and "rotation" (d_out, d_in),
      replicated; None when the mode learns none (they stay FAISS's).
    index_opt_state: optax state of ``index_params``, or None.
    rng: PRNG key from which per-step host randomness (pool subsampling) and the
      stochastic rounding of a bfloat16 table are derived.
  """
  step: jax.Array
  params: Any
  encoder_opt_state: Any
  table: jax.Array
  row_opt_state: Any
  index_params: dict[str, jax.Array] | None
  index_opt_state: Any
  rng: jax.Array


def init_state(config: ml_collections.ConfigDict, mode: Mode, params: Any, table: np.ndarray,
               quantizer: Quantizer | None, mesh, encoder_tx, row_tx, index_tx, *,
               abstract_rows: bool = False) -> TrainState:
  """The initial state, placed on the mesh.

  The table and its per-row optimizer state are split by rows (``sharding.shard_table``);
  encoder weights and their optimizer state are replicated, or split FSDP-style with
  ``sharding.shard_params``; the rest is replicated. The table goes straight from the host
  to its row shards (``sharding.put_rows``) and the per-row state is created sharded, so
  no device ever holds all rows. ``quantizer`` is the index's (or a placeholder of its
  shapes, for a restore); its ``mode.learn`` parameters start the learned ones.
  ``abstract_rows``: the table and per-row state are only their shapes, dtypes and
  shardings (``jax.ShapeDtypeStruct``), as a restore's target: nothing row-sized is
  placed, and ``table`` is read only for its shape.
  """
  rows = sharding.padded_rows(table.shape[0], mesh)
  row_sh = sharding.row_sharding(mesh, config.sharding.shard_table)
  replicate = lambda tree: sharding.place(tree, lambda _: sharding.replicated(mesh))
  fsdp = bool(config.sharding.shard_params)
  by_shape = lambda leaf: sharding.param_sharding(np.shape(leaf), mesh, fsdp)
  master = mode.update_rows and optim.bf16_update(config.table) == "master"
  init_rows = lambda t: optim.init_row_state(row_tx, t, master)
  if abstract_rows:
    shaped = lambda dtype: jax.ShapeDtypeStruct((rows,) + table.shape[1:], dtype,
                                                sharding=row_sh)
    table_dev = shaped(jnp.dtype(config.table.dtype))
    row_state = (jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=row_sh),
                              jax.eval_shape(init_rows, shaped(
                                  jnp.float32 if master else table_dev.dtype)))
                 if mode.update_rows else None)
  else:
    table_dev = sharding.put_rows(table, mesh, config.sharding.shard_table, rows,
                                  dtype=jnp.dtype(config.table.dtype))
    # float32 master copies of a bfloat16 table start from the host's float32 rows, not
    # from their rounding; that temporary is donated to become them.
    row_source = (sharding.put_rows(table, mesh, config.sharding.shard_table, rows,
                                    dtype=jnp.float32) if master else table_dev)
    row_state = (jax.jit(init_rows, out_shardings=row_sh,
                         donate_argnums=(0,) if master else ())(row_source)
                 if mode.update_rows else None)
  # Placed from host copies: the step donates the state, which must never delete the
  # caller's arrays.
  params = sharding.place(jax.device_get(params), by_shape)
  encoder_opt_state = (sharding.place(encoder_tx.init(params), by_shape)
                       if mode.update_encoder else None)
  learned = index_opt_state = None
  if mode.learns_index:
    learned = jax.device_get(select_index_params(quantizer, mode.learn))
    index_opt_state = index_tx.init(learned)
  return TrainState(
      step=replicate(np.zeros((), np.int32)), params=params,
      encoder_opt_state=encoder_opt_state, table=table_dev, row_opt_state=row_state,
      index_params=replicate(learned), index_opt_state=replicate(index_opt_state),
      rng=replicate(jax.random.key(config.seed)))

