"""Exact (flat) inner-product search over the row-sharded device table.

A flat FAISS index needs the whole float table on one host; at tens of millions of rows
that is the largest allocation of a run. Here every device scores the queries against
its own rows, a block at a time, and keeps its top-k, and only those
(queries x k x devices) candidates are gathered and merged, so the table never leaves
the devices.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from qdr_jax import sharding
from qdr_jax.sharding import DATA_AXIS


@functools.lru_cache(maxsize=None)
def _search_fn(mesh: Mesh, k: int, num_rows: int, shard_rows: int, block_rows: int):
  local_k = min(k, shard_rows)
  block = min(block_rows, shard_rows)
  blocks = -(-shard_rows // block)

  def per_shard(table, queries):
    first_row = jax.lax.axis_index(DATA_AXIS) * shard_rows

    def merge_block(i, carry):
      best, table = carry
      # The table rides in the loop's carry behind a barrier: otherwise XLA hoists a
      # bfloat16 table's cast out of the loop, a float32 copy of the whole shard.
      table = jax.lax.optimization_barrier(table)
      # The shard is scored block by block, so the (queries x rows) scores never exceed
      # one block: scoring a whole shard at once grows with the corpus. The last block
      # ends at the shard's end; the rows it shares with the block before are masked.
      start = jnp.minimum(i * block, shard_rows - block)
      local = start + jnp.arange(block)
      rows = jax.lax.dynamic_slice_in_dim(table, start, block).astype(jnp.float32)
      scores = queries @ rows.T
      keep = (local >= i * block) & (first_row + local < num_rows)  # padding never wins
      top, at = jax.lax.top_k(jnp.where(keep, scores, -jnp.inf), min(k, block))
      scores = jnp.concatenate([best[0], top], axis=1)
      ids = jnp.concatenate([best[1], (first_row + local)[at]], axis=1)
      top, at = jax.lax.top_k(scores, local_k)
      return (top, jnp.take_along_axis(ids, at, axis=1)), table

    none = (jnp.full((queries.shape[0], local_k), -jnp.inf, jnp.float32),
            jnp.zeros((queries.shape[0], local_k), jnp.int32))
    # Each device's running top-k differs: the carry varies over the data axis.
    none = jax.lax.pcast(none, (DATA_AXIS,), to="varying")
    return jax.lax.fori_loop(0, blocks, merge_block, (none, table))[0]

  sharded = jax.shard_map(per_shard, mesh=mesh, in_specs=(P(DATA_AXIS), P()),
                          out_specs=(P(None, DATA_AXIS), P(None, DATA_AXIS)))

  def search(table, queries):
    scores, ids = sharded(table, queries)  # (b, local_k * devices)
    top, at = jax.lax.top_k(scores, k)
    return top, jnp.take_along_axis(ids, at, axis=1)

  replicated = sharding.replicated(mesh)
  return jax.jit(search, out_shardings=(replicated, replicated))


def exact_search(table: jax.Array, queries: np.ndarray, k: int, mesh: Mesh, num_rows: int,
                 *, batch_size: int = 256, block_rows: int = 32768
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Top-k rows of ``table`` (the first ``num_rows``) by inner product, on the devices.

  A collective in a multi-process job: every process passes the same queries and gets
  the same result. Device memory for scores is ``batch_size x block_rows`` floats per
  device, whatever the corpus size.

  Returns:
    scores (Q, k) float32 and ids (Q, k) int64, best first, as ``qdr_jax.index.searching.search``.
  """
  queries = np.ascontiguousarray(queries, np.float32)
  k = min(k, num_rows)
  shard_rows = table.shape[0] // mesh.devices.size
  fn = _search_fn(mesh, k, num_rows, shard_rows, block_rows)
  scores = np.empty((queries.shape[0], k), np.float32)
  ids = np.empty((queries.shape[0], k), np.int64)
  for start in range(0, queries.shape[0], batch_size):
    block = queries[start:start + batch_size]
    padded = np.zeros((batch_size, queries.shape[1]), np.float32)  # one compiled shape
    padded[:block.shape[0]] = block
    q = jax.make_array_from_process_local_data(sharding.replicated(mesh), padded)
    top, at = fn(table, q)
    scores[start:start + block.shape[0]] = np.asarray(top.addressable_data(0))[:block.shape[0]]
    ids[start:start + block.shape[0]] = np.asarray(at.addressable_data(0))[:block.shape[0]]
  return scores, ids
