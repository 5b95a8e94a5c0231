"""Conversion between trained FAISS PQ-family indexes and JAX `Quantizer`s.

Supported layouts (PQ codes of 1..8 bits per sub-quantizer; row id = search id):
  * IndexPQ, and IndexPQFastScan (`PQ{m}x4fs`, codes packed in blocks of 32 rows);
  * IndexIVFPQ and IndexIVFPQFastScan (`IVF{n},PQ{m}x4fs[r]`), by_residual True or False,
    with a flat (IP or L2) or HNSW coarse quantizer (`IVF{n}_HNSW32,PQ{m}`);
  * IndexHNSWPQ (`HNSW32,PQ{m}`): an HNSW graph over an IndexPQ storage, row = position;
  * any of the above behind an IndexPreTransform holding a single OPQMatrix (or the
    orthonormal LinearTransform FAISS reads back in its place).
  * IndexRaBitQ and IndexIVFRaBitQ (`RaBitQ`, `IVF{n},RaBitQ`, multi-bit `RaBitQ{b}`),
    optionally behind a single orthonormal transform (`RR{d},...`, the random rotation):
    `quantizer_from_faiss` then returns a `qdr_jax.quant.rabitq.RaBitQ` and
    `stored_codes` FAISS's raw code bytes (sign bits, then float32 factors; multi-bit
    codes add their extra bits and two factors). JAX encodes the 1-bit codes and reads
    multi-bit ones from the index.
Every other family (Flat, SQ, LSQ/RQ, PQ over 8 bits, refine stages, id maps) has codes
JAX does not reproduce: `supports_straight_through` says so without raising.
"""

from __future__ import annotations

import dataclasses

import faiss
import jax.numpy as jnp
import numpy as np

from qdr_jax.quant.pq import Quantizer
from qdr_jax.quant.rabitq import RaBitQ

# The trainer keeps codes as uint8 (one byte per sub-quantizer), hence the 8-bit ceiling.
MAX_NBITS = 8


@dataclasses.dataclass(frozen=True)
class _Parts:
  """The pieces of a FAISS index that matter for PQ encoding."""

  transform: faiss.LinearTransform | None
  base: faiss.Index  # downcast IndexPQ, IndexPQFastScan, IndexIVFPQ(FastScan), IndexHNSWPQ
  pq: faiss.ProductQuantizer
  ivf: faiss.IndexIVF | None  # IndexIVFPQ or IndexIVFPQFastScan
  storage: faiss.Index  # what holds the codes: `base`, or an HNSW's IndexPQ storage


_FLAT_PQ = (faiss.IndexPQ, faiss.IndexPQFastScan)
_IVF_PQ = (faiss.IndexIVFPQ, faiss.IndexIVFPQFastScan)


def _unwrap_transform(index: faiss.Index, what: str
                      ) -> tuple[faiss.VectorTransform | None, faiss.Index]:
  """(the single transform in front of ``index`` or None, the downcast index behind it)."""
  index = faiss.downcast_index(index)
  if not isinstance(index, faiss.IndexPreTransform):
    return None, index
  if index.chain.size() != 1:
    raise ValueError(f"Only a single {what} is supported, got a chain of "
                     f"{index.chain.size()}.")
  return (faiss.downcast_VectorTransform(index.chain.at(0)),
          faiss.downcast_index(index.index))


def _split(index: faiss.Index, require_trained: bool = True) -> _Parts:
  transform, index = _unwrap_transform(index, "OPQ transform")
  if transform is not None:
    # FAISS writes an OPQMatrix as a plain LinearTransform: a read-back index has one.
    if type(transform) not in (faiss.OPQMatrix, faiss.LinearTransform):
      raise ValueError(f"Only OPQMatrix pre-transforms are supported, got "
                       f"{type(transform).__name__}.")
    # An untrained OPQMatrix reports itself non-orthonormal until training sets A.
    if transform.have_bias or (transform.is_trained and not transform.is_orthonormal):
      raise ValueError("The OPQ matrix must be orthonormal and without bias.")
  # Exact types: subclasses (e.g. IndexIVFPQR, IndexPQFastScan's relatives) encode otherwise.
  if type(index) in _IVF_PQ:
    parts = _Parts(transform, index, index.pq, index, index)
  elif type(index) in _FLAT_PQ:
    parts = _Parts(transform, index, index.pq, None, index)
  elif type(index) is faiss.IndexHNSWPQ:
    storage = faiss.downcast_index(index.storage)
    parts = _Parts(transform, index, storage.pq, None, storage)
  else:
    raise ValueError(f"Unsupported index type {type(index).__name__}: expected IndexPQ, "
                     "IndexIVFPQ, their fast-scan variants or IndexHNSWPQ, optionally behind "
                     "an OPQ IndexPreTransform.")
  if not 1 <= parts.pq.nbits <= MAX_NBITS:
    raise ValueError(f"Only PQ codes of at most {MAX_NBITS} bits per sub-quantizer are "
                     f"supported, got nbits={parts.pq.nbits}.")
  if require_trained and not index.is_trained:
    raise ValueError("The FAISS index is not trained.")
  return parts


def supports_straight_through(index: faiss.Index) -> bool:
  """Whether JAX reproduces `index`'s codes (`quantizer_from_faiss` accepts it).

  Looks at the layout only, so an untrained index (e.g. fresh from `index_factory`)
  answers too. Write-back (`write_quantizer_to_faiss`) works for the same layouts.
  """
  try:
    if is_rabitq(index):
      _split_rabitq(index, require_trained=False)
    else:
      _split(index, require_trained=False)
  except ValueError:
    return False
  return True


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


def quantizer_from_faiss(index: faiss.Index) -> Quantizer | RaBitQ:
  """Reads the rotation, coarse centroids and PQ codebooks of a trained FAISS index.

  Args:
    index: a trained index of a supported layout (see the module docstring).

  Returns:
    A `Quantizer` with float32 leaves, K = 2**nbits centroids per sub-quantizer (16 for
    fast-scan); `encode` on it reproduces the index's codes. A `RaBitQ` for a RaBitQ
    index (`rabitq_from_faiss`).
  """
  if is_rabitq(index):
    return rabitq_from_faiss(index)
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


def unpack_codes(raw: np.ndarray, m: int, nbits: int) -> np.ndarray:
  """(n, M) int32 sub-quantizer codes from (n, code_size) uint8 FAISS PQ codes.

  FAISS writes the M codes of a vector as one little-endian bit string (code j in bits
  j*nbits .. (j+1)*nbits - 1), so 8-bit codes are plain bytes and 4-bit ones share a
  byte, the first in its low nibble.
  """
  raw = np.ascontiguousarray(raw, np.uint8)
  if nbits == 8:
    return raw[:, :m].astype(np.int32)
  bits = np.unpackbits(raw, axis=1, bitorder="little")[:, :m * nbits]
  weights = (1 << np.arange(nbits)).astype(np.int32)
  return bits.reshape(len(raw), m, nbits).astype(np.int32) @ weights


def _unpack_blocks(packer: faiss.CodePacker, blocks: np.ndarray, n: int) -> np.ndarray:
  """(n, code_size) flat codes from fast-scan's blocks of `packer.nvec` interleaved rows."""
  flat = np.empty((len(blocks) * packer.nvec, packer.code_size), np.uint8)
  for b, block in enumerate(blocks):
    packer.unpack_all(faiss.swig_ptr(block), faiss.swig_ptr(flat[b * packer.nvec:]))
  return flat[:n]


def _block_view(ptr, n: int, packer: faiss.CodePacker) -> np.ndarray:
  """The (num_blocks, block_size) uint8 blocks behind `ptr` holding `n` rows."""
  num_blocks = -(-n // packer.nvec)
  return faiss.rev_swig_ptr(ptr, num_blocks * packer.block_size).reshape(
      num_blocks, packer.block_size)


def _flat_codes(parts: _Parts) -> np.ndarray:
  """(N, code_size) uint8 codes of a non-IVF layout, row i = position i."""
  storage = parts.storage
  n = storage.ntotal
  if isinstance(storage, faiss.IndexPQFastScan):
    if n == 0:
      return np.zeros((0, parts.pq.code_size), np.uint8)
    packer = storage.get_CodePacker()
    return _unpack_blocks(packer, _block_view(storage.codes.get(), n, packer), n)
  return faiss.vector_to_array(storage.codes).reshape(n, storage.code_size)


def _ivf_list_codes(ivf: faiss.IndexIVF, l: int, size: int) -> np.ndarray:
  """(size, code_size) uint8 codes stored in IVF list `l` (unpacked for fast-scan)."""
  invlists = faiss.downcast_InvertedLists(ivf.invlists)
  if isinstance(invlists, faiss.BlockInvertedLists):
    packer = invlists.packer
    return _unpack_blocks(packer, _block_view(invlists.get_codes(l), size, packer), size)
  code_size = invlists.code_size
  raw = faiss.rev_swig_ptr(invlists.get_codes(l), size * code_size)
  return np.asarray(raw, np.uint8).reshape(size, code_size)


def stored_codes(index: faiss.Index) -> tuple[np.ndarray, np.ndarray]:
  """The PQ codes a FAISS index stores, in row-id order.

  Args:
    index: a populated index of a supported layout (see the module docstring). For IVF,
      the ids must be 0..ntotal-1 (as `index.add` assigns them); elsewhere row i is the
      i-th vector added.

  Returns:
    codes: (N, M) int32 in [0, 2**nbits) (for RaBitQ: (N, code_size) uint8, FAISS's
    bytes); coarse_ids: (N,) int32 IVF list of each row (zeros without IVF).
  """
  if is_rabitq(index):
    return _rabitq_stored_codes(index)
  parts = _split(index)
  m, nbits = parts.pq.M, parts.pq.nbits
  if parts.ivf is None:
    flat = _flat_codes(parts)
    return unpack_codes(flat, m, nbits), np.zeros(len(flat), np.int32)
  return _ivf_codes_by_row(parts.ivf, (m,), np.int32,
                           lambda raw: unpack_codes(raw, m, nbits))


def _ivf_codes_by_row(ivf: faiss.IndexIVF, shape: tuple[int, ...], dtype, convert
                      ) -> tuple[np.ndarray, np.ndarray]:
  """(codes (N, *shape) of ``dtype``, lists (N,) int32) of an IVF index in row-id order;
  ``convert`` turns a list's raw (size, code_size) bytes into its rows' codes."""
  n = ivf.ntotal
  codes = np.zeros((n, *shape), dtype)
  lists = np.full(n, -1, np.int32)
  for l in range(ivf.nlist):
    size = ivf.invlists.list_size(l)
    if size == 0:
      continue
    ids = faiss.rev_swig_ptr(ivf.invlists.get_ids(l), size).copy()
    if ids.min() < 0 or ids.max() >= n:
      raise ValueError("stored_codes needs ids 0..ntotal-1; this index has others.")
    codes[ids] = convert(_ivf_list_codes(ivf, l, size))
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
  (checked), so only the PQ centroids change; `write_quantizer_to_faiss` writes all
  three. Arguments and result as for `write_quantizer_to_faiss`.
  """
  reference = quantizer_from_faiss(index)
  for name in ("rotation", "coarse_centroids"):
    ours, theirs = getattr(quantizer, name), getattr(reference, name)
    if (ours is None) != (theirs is None) or (
        ours is not None and not np.allclose(np.asarray(ours), np.asarray(theirs), atol=1e-6)):
      raise ValueError(f"The quantizer's {name} differs from the index's; only codebooks "
                       "are written back.")
  return write_quantizer_to_faiss(index, quantizer, vectors, ids)


def _write_rotation(transform: faiss.LinearTransform, rotation: np.ndarray) -> None:
  shape = (transform.d_out, transform.d_in)
  if rotation.shape != shape:
    raise ValueError(f"Rotation shape {rotation.shape} does not match the index's OPQ "
                     f"matrix {shape}.")
  faiss.copy_array_to_vector(np.ascontiguousarray(rotation.reshape(-1)), transform.A)
  # FAISS's reverse transform (reconstruct) uses A^T only for an orthonormal A.
  transform.set_is_orthonormal()
  if not transform.is_orthonormal:
    raise ValueError("The rotation written into the OPQ matrix is not orthonormal; project "
                     "it (qdr_jax.quant.orthogonalize) first.")


def _write_coarse_centroids(ivf: faiss.IndexIVF, centroids: np.ndarray) -> None:
  if centroids.shape != (ivf.nlist, ivf.d):
    raise ValueError(f"Coarse centroids shape {centroids.shape} does not match the index's "
                     f"IVF {(ivf.nlist, ivf.d)}.")
  # reset + add: a flat quantizer takes the rows as they are, an HNSW one rebuilds its
  # graph over them (its search then routes to the new centroids).
  quantizer = faiss.downcast_index(ivf.quantizer)
  quantizer.reset()
  quantizer.add(np.ascontiguousarray(centroids))


def _readd(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray | None) -> faiss.Index:
  """Empties ``index`` and adds ``vectors`` (with ``ids`` when given) under its current
  parameters."""
  vectors = np.ascontiguousarray(vectors, np.float32)
  index.reset()
  if not len(vectors):  # FAISS's fast-scan indexes crash on an empty add
    return index
  if ids is None:
    index.add(vectors)
  else:
    index.add_with_ids(vectors, np.ascontiguousarray(ids, np.int64))
  return index


def _check_levels(quantizer: Quantizer | RaBitQ, parts: _Parts | _RaBitQParts) -> None:
  """The quantizer has a rotation and coarse centroids exactly where the index does."""
  for name, level in (("rotation", parts.transform), ("coarse_centroids", parts.ivf)):
    if (getattr(quantizer, name) is None) != (level is None):
      raise ValueError(f"The quantizer's {name} is "
                       f"{'missing' if level is not None else 'present'} but the index "
                       f"{'has' if level is not None else 'has no'} such level.")


def write_quantizer_to_faiss(
    index: faiss.Index,
    quantizer: Quantizer,
    vectors: np.ndarray,
    ids: np.ndarray | None = None,
) -> faiss.Index:
  """Writes a JAX quantizer (OPQ rotation, IVF centroids, PQ codebooks) into a trained
  FAISS index and re-encodes its vectors with it.

  Every level the index has is overwritten with the quantizer's (learned) values; no
  re-training happens. The index is modified in place and also returned. Works for
  every supported layout; an HNSW coarse quantizer or HNSW-PQ graph is rebuilt.

  Args:
    index: a trained index of a supported layout (see the module docstring).
    quantizer: the quantizer to write (e.g. after optax updates); its levels must be
      those of the index (same shapes, same by_residual).
    vectors: (N, d) float32 vectors to re-add after clearing the index.
    ids: optional (N,) int64 ids for `add_with_ids` (IVF only); default 0..N-1.

  Returns:
    `index`, whose stored codes are now `encode_with_lists(quantizer, vectors)` (exact
    coarse quantizers) and whose scores equal `adc_scores` under `quantizer` (up to
    fast-scan's 8-bit lookup tables).
  """
  if is_rabitq(index):
    return _write_rabitq_to_faiss(index, quantizer, vectors, ids)
  parts = _split(index)
  pq = parts.pq
  codebooks = np.asarray(quantizer.codebooks, np.float32)
  if codebooks.shape != (pq.M, pq.ksub, pq.dsub):
    raise ValueError(f"Codebooks shape {codebooks.shape} does not match the index's PQ "
                     f"{(pq.M, pq.ksub, pq.dsub)}.")
  _check_levels(quantizer, parts)
  if parts.ivf is not None and quantizer.by_residual != bool(parts.ivf.by_residual):
    raise ValueError("The quantizer's by_residual differs from the index's.")
  if ids is not None and parts.ivf is None:
    raise ValueError(f"{type(parts.base).__name__} numbers rows by position and does not "
                     "support add_with_ids.")

  if parts.transform is not None:
    _write_rotation(parts.transform, np.asarray(quantizer.rotation, np.float32))
  if parts.ivf is not None:
    _write_coarse_centroids(parts.ivf, np.asarray(quantizer.coarse_centroids, np.float32))
  faiss.copy_array_to_vector(np.ascontiguousarray(codebooks.reshape(-1)), pq.centroids)
  # Derived tables would otherwise keep encoding/searching with the old parameters.
  if pq.transposed_centroids.size() > 0:
    pq.sync_transposed_centroids()
  if pq.sdc_table.size() > 0:
    pq.compute_sdc_table()
  if parts.ivf is not None and parts.ivf.by_residual:
    parts.ivf.precompute_table()

  return _readd(index, vectors, ids)


# ----------------------------------------------------------------------------- RaBitQ


@dataclasses.dataclass(frozen=True)
class _RaBitQParts:
  """The pieces of a FAISS RaBitQ index that matter for its codes and scores."""

  transform: faiss.LinearTransform | None
  base: faiss.Index  # downcast IndexRaBitQ or IndexIVFRaBitQ
  ivf: faiss.IndexIVF | None


_RABITQ = (faiss.IndexRaBitQ, faiss.IndexIVFRaBitQ)


def _inner(index: faiss.Index) -> faiss.Index:
  index = faiss.downcast_index(index)
  if isinstance(index, faiss.IndexPreTransform):
    return faiss.downcast_index(index.index)
  return index


def is_rabitq(index: faiss.Index) -> bool:
  """Whether ``index`` (or the index behind its pre-transform) is a RaBitQ index that
  stores codes in FAISS's flat layout (fast-scan RaBitQ packs them otherwise)."""
  return type(_inner(index)) in _RABITQ


def _split_rabitq(index: faiss.Index, require_trained: bool = True) -> _RaBitQParts:
  transform, index = _unwrap_transform(index, "rotation in front of RaBitQ")
  if transform is not None:
    if not isinstance(transform, faiss.LinearTransform) or transform.have_bias or (
        transform.is_trained and not transform.is_orthonormal) or (
        transform.d_in != transform.d_out):
      raise ValueError("The transform in front of RaBitQ must be a square orthonormal "
                       "rotation without bias (RR{d}).")
  if type(index) not in _RABITQ:
    raise ValueError(f"Unsupported index type {type(index).__name__}: expected IndexRaBitQ "
                     "or IndexIVFRaBitQ.")
  if isinstance(index, faiss.IndexRaBitQ) and index.centered:
    raise ValueError("RaBitQ's centered query quantizer is not reproduced in JAX.")
  if require_trained and not (index.is_trained and (transform is None
                                                    or transform.is_trained)):
    raise ValueError("The FAISS index is not trained.")
  ivf = index if isinstance(index, faiss.IndexIVF) else None
  return _RaBitQParts(transform, index, ivf)


def rabitq_from_faiss(index: faiss.Index) -> RaBitQ:
  """Reads the rotation, centre (or IVF centroids), metric, query bits ``qb`` and code
  bits ``nb_bits`` of a trained FAISS RaBitQ index, so that `qdr_jax.quant.rabitq.encode`
  reproduces its (1-bit) codes and `estimate` its search's scores."""
  parts = _split_rabitq(index)
  rotation = center = coarse = None
  coarse_metric = "ip"
  if parts.transform is not None:
    t = parts.transform
    rotation = jnp.asarray(faiss.vector_to_array(t.A).reshape(t.d_out, t.d_in), jnp.float32)
  if parts.ivf is not None:
    quantizer = _coarse_quantizer(parts.ivf)
    coarse = jnp.asarray(quantizer.reconstruct_n(0, parts.ivf.nlist), jnp.float32)
    coarse_metric = _metric_name(quantizer.metric_type)
  else:
    center = jnp.asarray(faiss.vector_to_array(parts.base.center), jnp.float32)
  return RaBitQ(center=center, coarse_centroids=coarse, rotation=rotation,
                metric=_metric_name(parts.base.metric_type), coarse_metric=coarse_metric,
                qb=int(parts.base.qb), nb_bits=int(parts.base.rabitq.nb_bits))


def _rabitq_stored_codes(index: faiss.Index) -> tuple[np.ndarray, np.ndarray]:
  """FAISS's (N, code_size) uint8 RaBitQ codes and (N,) IVF lists, in row-id order."""
  parts = _split_rabitq(index)
  base = parts.base
  if parts.ivf is None:
    n = base.ntotal
    flat = faiss.vector_to_array(base.codes).reshape(n, base.code_size)
    return flat, np.zeros(n, np.int32)
  return _ivf_codes_by_row(parts.ivf, (parts.ivf.code_size,), np.uint8, lambda raw: raw)


def _write_rabitq_to_faiss(index: faiss.Index, quantizer: RaBitQ, vectors: np.ndarray,
                           ids: np.ndarray | None) -> faiss.Index:
  """`write_quantizer_to_faiss` for RaBitQ: the rotation and IVF centroids (RaBitQ has no
  codebooks; its centre is the training mean) are written, then the vectors re-added."""
  parts = _split_rabitq(index)
  if not isinstance(quantizer, RaBitQ):
    raise ValueError("A RaBitQ index takes a RaBitQ quantizer, got a PQ one.")
  _check_levels(quantizer, parts)
  if ids is not None and parts.ivf is None:
    raise ValueError("IndexRaBitQ numbers rows by position and does not support "
                     "add_with_ids.")
  if parts.transform is not None:
    _write_rotation(parts.transform, np.asarray(quantizer.rotation, np.float32))
  if parts.ivf is not None:
    _write_coarse_centroids(parts.ivf, np.asarray(quantizer.coarse_centroids, np.float32))
  return _readd(index, vectors, ids)
