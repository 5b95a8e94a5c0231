"""Incremental refresh of a quantized index: re-encode only the table rows that changed.

A train step moves only the rows of its negative pool, so between two index refreshes
most of a large table is untouched. A full rebuild retrains the quantizer (k-means over
the table) and re-adds every row; an incremental refresh keeps the trained quantizer
(OPQ rotation, coarse centroids, PQ codebooks) fixed and re-encodes just the changed
rows, which costs time proportional to their number. The quantizer slowly goes stale as
the table drifts, so a run alternates: incremental refreshes every
``config.index.rebuild_every`` steps and a full rebuild every
``config.index.full_rebuild_every`` steps (``refresh_kind``).

Supported layouts (``supports_incremental_refresh``), each optionally behind an
IndexPreTransform (OPQ):
  * IndexIVF of any kind (IVFPQ, IVFSQ, IVF-Flat, fast-scan IVFPQ; flat or HNSW coarse
    quantizer) whose ids are table rows: changed rows are removed and re-added, so they
    move to their current nearest list;
  * flat-code indexes (IndexPQ, IndexScalarQuantizer, IndexFlat, ...; id = position) and
    IndexPQFastScan: the codes at the changed positions are overwritten (fast-scan codes
    are re-packed into their blocks of 32 rows);
  * IndexHNSW over a flat-code storage (``HNSW32``, ``HNSW32,PQ48``, ``HNSW32,SQ8``): the
    storage codes are overwritten and the graph is kept. The graph's links were chosen
    for the old vectors, so it goes stale: scores of moved rows are exact, but a row that
    moved far may be reached less often until the next full rebuild, which builds a new
    graph. We overwrite rather than refuse because a training step moves few rows by
    little, HNSW navigation tolerates that, and the periodic full rebuild
    (``full_rebuild_every``) bounds the staleness; a run that wants no stale graph sets
    ``full_rebuild_every=0``.
Other layouts (IndexIDMap, refine stages, NSG, ...) need a full rebuild.
Learned codebooks change every code, so a run that learns them must re-encode the whole
table (``write_codebooks_to_faiss``) instead.
"""

from __future__ import annotations

from typing import Literal

import faiss
import numpy as np

RefreshKind = Literal["full", "incremental"]


def refresh_kind(step: int, rebuild_every: int, full_rebuild_every: int
                 ) -> RefreshKind | None:
  """What refresh, if any, follows ``step`` completed steps.

  Args:
    step: steps completed so far (>= 1 after the first step).
    rebuild_every: steps between refreshes (<= 0: never refresh).
    full_rebuild_every: steps between full rebuilds; 0 makes every refresh full. Must be
      a multiple of ``rebuild_every``, so that a full rebuild replaces an incremental
      refresh rather than landing between two.

  Returns:
    "full", "incremental" or None (no refresh after this step).
  """
  if rebuild_every <= 0 or step <= 0 or step % rebuild_every:
    return None
  if full_rebuild_every < 0:
    raise ValueError(f"full_rebuild_every must be >= 0, got {full_rebuild_every}.")
  if full_rebuild_every == 0:
    return "full"
  if full_rebuild_every % rebuild_every:
    raise ValueError(f"full_rebuild_every={full_rebuild_every} is not a multiple of "
                     f"rebuild_every={rebuild_every}.")
  return "full" if step % full_rebuild_every == 0 else "incremental"


class ChangedRows:
  """The set of table rows written since the last refresh.

  Feed it every step's pooled rows that the step updated (``pool.row_ids[pool.valid]``);
  ``take`` hands them over and starts a new set. A boolean mask keeps ``add`` O(pool).
  """

  def __init__(self, num_rows: int):
    self._mask = np.zeros(num_rows, dtype=bool)

  def add(self, rows: np.ndarray) -> None:
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if rows.size and (rows.min() < 0 or rows.max() >= self._mask.size):
      raise ValueError(f"row ids must lie in 0..{self._mask.size - 1}.")
    self._mask[rows] = True

  def __len__(self) -> int:
    return int(self._mask.sum())

  def mask(self) -> np.ndarray:
    """A copy of the (num_rows,) bool mask of the changed rows (what a checkpoint saves)."""
    return self._mask.copy()

  def peek(self) -> np.ndarray:
    """The sorted changed rows (int64), without clearing them."""
    return np.flatnonzero(self._mask).astype(np.int64)

  def take(self) -> np.ndarray:
    """The sorted changed rows (int64); the set is empty afterwards."""
    rows = self.peek()
    self._mask[:] = False
    return rows

  def clear(self) -> None:
    """Forget every row (after a full rebuild, which re-encodes them all)."""
    self._mask[:] = False


def _unwrap(index: faiss.Index) -> tuple[faiss.Index, faiss.Index | None]:
  """(the downcast index that stores codes, the pre-transform wrapper or None)."""
  top = faiss.downcast_index(index)
  wrapper = None
  if isinstance(top, faiss.IndexPreTransform):
    wrapper, top = top, faiss.downcast_index(top.index)
  return top, wrapper


def _positional_storage(base: faiss.Index) -> faiss.Index | None:
  """The index whose codes sit at row positions (IndexFlatCodes or IndexPQFastScan),
  looking through an HNSW graph; None when ``base`` has no such storage."""
  if isinstance(base, faiss.IndexHNSW):
    base = faiss.downcast_index(base.storage)
  if isinstance(base, (faiss.IndexFlatCodes, faiss.IndexPQFastScan)):
    return base
  return None


def supports_incremental_refresh(index: faiss.Index) -> bool:
  """Whether ``incremental_refresh`` can re-encode rows of ``index`` in place.

  Looks at the layout only, so an untrained index (fresh from ``index_factory``) answers
  too.
  """
  base, _ = _unwrap(index)
  return isinstance(base, faiss.IndexIVF) or _positional_storage(base) is not None


def _encode_for_storage(index: faiss.Index, storage: faiss.Index,
                        vectors: np.ndarray) -> np.ndarray:
  """(n, code_size) uint8 codes of ``vectors`` as ``storage`` (inside ``index``) keeps
  them: the pre-transform, if any, is applied first."""
  _, wrapper = _unwrap(index)
  if wrapper is not None:
    for i in range(wrapper.chain.size()):
      vectors = faiss.downcast_VectorTransform(wrapper.chain.at(i)).apply(vectors)
  return storage.sa_encode(np.ascontiguousarray(vectors, np.float32))


def _clear_block_tails(invlists: faiss.BlockInvertedLists, sizes_before: list[int]) -> None:
  """Zeroes the freed slots at the end of every fast-scan list that shrank.

  FAISS's fast-scan lists add a code by OR-ing its 4-bit values into the packed block,
  (so it appears: the result is only right over zeroed slots); ``remove_ids`` moves the last entries into the
  holes but leaves the old nibbles in the freed tail, so a later add would corrupt the
  codes (measured with faiss-cpu 1.15: about 3 in 4 re-added rows). ``pack_1`` assigns
  rather than ORs, so packing a zero code clears a slot.
  """
  packer = invlists.packer
  zero = np.zeros(packer.code_size, np.uint8)
  for l, before in enumerate(sizes_before):
    size = invlists.list_size(l)
    if size == before:
      continue
    blocks = invlists.get_codes(l)
    for slot in range(size, -(-size // packer.nvec) * packer.nvec):
      packer.pack_1_c(faiss.swig_ptr(zero), slot, blocks)


def incremental_refresh(index: faiss.Index, rows: np.ndarray, vectors: np.ndarray) -> int:
  """Re-encodes ``rows`` of the table as ``vectors`` in ``index``, quantizer unchanged.

  Afterwards ``index`` stores exactly the codes that adding the whole current table to
  the same trained (emptied) index would store, up to the order of entries within IVF
  lists: the changed rows are re-assigned to their nearest coarse list and re-encoded
  there, every other row keeps its code. An HNSW graph is kept as it was (see the module
  docstring).

  Args:
    index: a populated, trained index of a supported layout
      (``supports_incremental_refresh``) whose ids are table rows (as ``build_index``
      adds them); modified in place.
    rows: (n,) distinct row ids that changed.
    vectors: (n, d) their current values (e.g. gathered from the device table by ``rows``,
      so that the rest of the table never leaves the devices).

  Returns:
    The number of rows re-encoded (``n`` on success; FAISS's own count for IVF).
  """
  rows = np.ascontiguousarray(rows, dtype=np.int64).reshape(-1)
  vectors = np.ascontiguousarray(vectors, dtype=np.float32)
  if vectors.shape != (rows.size, index.d):
    raise ValueError(f"vectors have shape {vectors.shape}, expected {(rows.size, index.d)}.")
  if rows.size == 0:
    return 0
  if np.unique(rows).size != rows.size:
    raise ValueError("rows must be distinct.")
  if rows.min() < 0:
    raise ValueError("row ids must be >= 0.")
  if not np.isfinite(vectors).all():
    raise ValueError("vectors contain NaN or infinite values.")
  base, _ = _unwrap(index)
  if isinstance(base, faiss.IndexIVF):
    # Removing by id scans the inverted lists once (no direct map needed); the wrapper,
    # if any, forwards both calls and applies its transform on the way in. Fast-scan
    # lists re-pack their blocks on both calls.
    invlists = faiss.downcast_InvertedLists(base.invlists)
    sizes = [invlists.list_size(l) for l in range(base.nlist)]
    removed = index.remove_ids(faiss.IDSelectorBatch(rows.size, faiss.swig_ptr(rows)))
    if removed != rows.size:
      raise ValueError(f"{rows.size - removed} of the rows are not in the index.")
    if isinstance(invlists, faiss.BlockInvertedLists):
      _clear_block_tails(invlists, sizes)
    index.add_with_ids(vectors, rows)
    return int(removed)
  storage = _positional_storage(base)
  if storage is None:
    raise TypeError(f"incremental refresh does not support {type(base).__name__}; rebuild "
                    "the index instead.")
  # Row i's code sits at position i: overwrite those codes in place with the storage's
  # own encoder (what adding the vector would have stored).
  if rows.max() >= storage.ntotal:
    raise ValueError(f"row ids must be < ntotal={storage.ntotal}.")
  codes = _encode_for_storage(index, storage, vectors)
  if isinstance(storage, faiss.IndexPQFastScan):
    packer = storage.get_CodePacker()
    blocks = faiss.swig_ptr(faiss.rev_swig_ptr(storage.codes.get(), storage.codes.size()))
    for row, code in zip(rows, codes):
      packer.pack_1_c(faiss.swig_ptr(code), int(row), blocks)
  else:
    stored = faiss.rev_swig_ptr(storage.codes.data(), storage.ntotal * storage.code_size)
    stored.reshape(storage.ntotal, storage.code_size)[rows] = codes
  return int(rows.size)


def emptied_copy(index: faiss.Index) -> faiss.Index:
  """A copy of ``index`` with its trained quantizer and no vectors (for comparisons)."""
  copy = faiss.clone_index(index)
  copy.reset()
  return copy
