"""Conversion between trained FAISS (OPQ +) (IVF +) PQ indexes and JAX `Quantizer`s.

Supported index layouts (all 8-bit PQ):
  * IndexPQ
  * IndexIVFPQ, by_residual True or False, with a flat (IP or L2) or HNSW coarse
    quantizer (`IVF{n}_HNSW32,PQ{m}`)
  * IndexPreTransform with a single OPQMatrix in front of either of the above.
"""

from __future__ import annotations

import dataclasses

import faiss
import jax.numpy as jnp
import numpy as np

from qdr_jax.quant.pq import Quantizer


@dataclasses.dataclass(frozen=True)
class _Parts:
  """The pieces of a FAISS index that matter for PQ encoding."""

  transform: faiss.LinearTransform | None
  base: faiss.Index  # downcast IndexPQ or IndexIVFPQ
  pq: faiss.ProductQuantizer
  ivf: faiss.IndexIVFPQ | None


def _split(index: faiss.Index) -> _Parts:
  index = faiss.downcast_index(index)
  transform = None
  if isinstance(index, faiss.IndexPreTransform):
    if index.chain.size() != 1:
      raise ValueError(f"Only a single OPQ transform is supported, got a chain of "
                       f"{index.chain.size()}.")
    transform = faiss.downcast_VectorTransform(index.chain.at(0))
    if not isinstance(transform, faiss.OPQMatrix):
      raise ValueError(f"Only OPQMatrix pre-transforms are supported, got "
                       f"{type(transform).__name__}.")
    if transform.have_bias or not transform.is_orthonormal:
      raise ValueError("The OPQ matrix must be orthonormal and without bias.")
    index = faiss.downcast_index(index.index)
  if type(index) is faiss.IndexIVFPQ:
    parts = _Parts(transform, index, index.pq, index)
  elif type(index) is faiss.IndexPQ:
    parts = _Parts(transform, index, index.pq, None)
  else:
    raise ValueError(f"Unsupported index type {type(index).__name__}: expected IndexPQ or "
                     "IndexIVFPQ, optionally behind an OPQ IndexPreTransform.")
  if parts.pq.nbits != 8:
    raise ValueError(f"Only 8-bit PQ (one byte per sub-quantizer) is supported, got "
                     f"nbits={parts.pq.nbits}.")
  if not index.is_trained:
    raise ValueError("The FAISS index is not trained.")
  return parts


def _coarse_quantizer(ivf: faiss.IndexIVF) -> faiss.Index:
  """The coarse quantizer, or the exact storage behind an HNSW one."""
  quantizer = faiss.downcast_index(ivf.quantizer)
  if isinstance(quantizer, faiss.IndexHNSW):
    # HNSW searches approximately; its storage holds the exact centroids.
    return faiss.downcast_index(quantizer.storage)
  return quantizer


def _metric_name(metric_type: int) -> str:
  if metric_type == faiss.METRIC_INNER_PRODUCT:
    return "ip"
  if metric_type == faiss.METRIC_L2:
    return "l2"
  raise ValueError(f"Unsupported coarse metric {metric_type}.")


def _pq_centroids(pq: faiss.ProductQuantizer) -> np.ndarray:
  return faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub)


def quantizer_from_faiss(index: faiss.Index) -> Quantizer:
  """Reads the rotation, coarse centroids and PQ codebooks of a trained FAISS index.

  Args:
    index: a trained IndexPQ / IndexIVFPQ, optionally wrapped in an OPQ
      IndexPreTransform.

  Returns:
    A `Quantizer` with float32 leaves; `encode` on it reproduces the index's codes.
  """
  parts = _split(index)
  rotation = None
  if parts.transform is not None:
    t = parts.transform
    rotation = jnp.asarray(faiss.vector_to_array(t.A).reshape(t.d_out, t.d_in), jnp.float32)
  coarse = None
  by_residual = False
  metric = "ip"
  if parts.ivf is not None:
    quantizer = _coarse_quantizer(parts.ivf)
    coarse = jnp.asarray(quantizer.reconstruct_n(0, parts.ivf.nlist), jnp.float32)
    by_residual = bool(parts.ivf.by_residual)
    metric = _metric_name(quantizer.metric_type)
  return Quantizer(
      codebooks=jnp.asarray(_pq_centroids(parts.pq), jnp.float32),
      rotation=rotation,
      coarse_centroids=coarse,
      by_residual=by_residual,
      coarse_metric=metric,
  )


def stored_codes(index: faiss.Index) -> tuple[np.ndarray, np.ndarray]:
  """The PQ codes a FAISS index stores, in row-id order.

  Args:
    index: a populated IndexPQ / IndexIVFPQ (optionally behind OPQ). For IVF, the ids
      must be 0..ntotal-1 (as `index.add` assigns them).

  Returns:
    codes: (N, M) int32; coarse_ids: (N,) int32 IVF list of each row (zeros for
    IndexPQ).
  """
  parts = _split(index)
  m = parts.pq.M
  n = parts.base.ntotal
  if parts.ivf is None:
    codes = faiss.vector_to_array(parts.base.codes).reshape(n, parts.pq.code_size)
    return codes[:, :m].astype(np.int32), np.zeros(n, np.int32)
  ivf = parts.ivf
  invlists = ivf.invlists
  code_size = invlists.code_size
  codes = np.full((n, m), -1, np.int32)
  lists = np.full(n, -1, np.int32)
  for l in range(ivf.nlist):
    size = invlists.list_size(l)
    if size == 0:
      continue
    ids = faiss.rev_swig_ptr(invlists.get_ids(l), size).copy()
    raw = faiss.rev_swig_ptr(invlists.get_codes(l), size * code_size)
    raw = np.asarray(raw, np.uint8).reshape(size, code_size)
    if ids.min() < 0 or ids.max() >= n:
      raise ValueError("stored_codes needs ids 0..ntotal-1; this index has others.")
    codes[ids] = raw[:, :m]
    lists[ids] = l
  if (lists < 0).any():
    raise ValueError("stored_codes needs ids 0..ntotal-1; some rows are missing.")
  return codes, lists


def write_codebooks_to_faiss(
    index: faiss.Index,
    quantizer: Quantizer,
    vectors: np.ndarray,
    ids: np.ndarray | None = None,
) -> faiss.Index:
  """Writes the JAX codebooks into a trained FAISS index and re-encodes its vectors.

  The rotation and coarse centroids are not written: they must still match the index
  (checked), so only the PQ centroids change. No re-training happens. The index is
  modified in place and also returned.

  Args:
    index: a trained IndexPQ / IndexIVFPQ (optionally behind OPQ).
    quantizer: the quantizer whose `codebooks` to write (e.g. after optax updates).
    vectors: (N, d) float32 vectors to re-add after clearing the index.
    ids: optional (N,) int64 ids for `add_with_ids` (IVF only); default 0..N-1.

  Returns:
    `index`, now searching with scores equal to `adc_scores` under `quantizer`.
  """
  parts = _split(index)
  pq = parts.pq
  codebooks = np.asarray(quantizer.codebooks, np.float32)
  if codebooks.shape != (pq.M, pq.ksub, pq.dsub):
    raise ValueError(f"Codebooks shape {codebooks.shape} does not match the index's PQ "
                     f"{(pq.M, pq.ksub, pq.dsub)}.")
  reference = quantizer_from_faiss(index)
  for name in ("rotation", "coarse_centroids"):
    ours, theirs = getattr(quantizer, name), getattr(reference, name)
    if (ours is None) != (theirs is None) or (
        ours is not None and not np.allclose(np.asarray(ours), np.asarray(theirs), atol=1e-6)):
      raise ValueError(f"The quantizer's {name} differs from the index's; only codebooks "
                       "are written back.")
  if quantizer.by_residual != reference.by_residual:
    raise ValueError("The quantizer's by_residual differs from the index's.")
  if ids is not None and parts.ivf is None:
    raise ValueError("IndexPQ does not support add_with_ids.")

  faiss.copy_array_to_vector(np.ascontiguousarray(codebooks.reshape(-1)), pq.centroids)
  # Derived tables would otherwise keep encoding/searching with the old centroids.
  if pq.transposed_centroids.size() > 0:
    pq.sync_transposed_centroids()
  if pq.sdc_table.size() > 0:
    pq.compute_sdc_table()
  if parts.ivf is not None and parts.ivf.by_residual:
    parts.ivf.precompute_table()

  vectors = np.ascontiguousarray(vectors, np.float32)
  index.reset()
  if ids is None:
    index.add(vectors)
  else:
    index.add_with_ids(vectors, np.ascontiguousarray(ids, np.int64))
  return index
