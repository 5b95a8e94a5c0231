"""Incremental refresh of a quantized index: re-encode only the table rows that changed.

A train step moves only the rows of its negative pool, so between two index refreshes
most of a large table is untouched. A full rebuild retrains the quantizer (k-means over
the table) and re-adds every row; an incremental refresh keeps the trained quantizer
(OPQ rotation, coarse centroids, PQ codebooks) fixed and re-encodes just the changed
rows, which costs time proportional to their number. The quantizer slowly goes stale as
the table drifts, so a run alternates: incremental refreshes every
``config.index.rebuild_every`` steps and a full rebuild every
``config.index.full_rebuild_every`` steps (``refresh_kind``).

Supported layouts: IndexIVF (e.g. IVFPQ, with flat or HNSW coarse quantizer) whose ids
are table rows, and flat-code indexes (IndexPQ, IndexFlat: id = position), each
optionally behind an IndexPreTransform (OPQ). HNSW graphs cannot be edited in place. Learned codebooks change every code, so a run that learns them
must re-encode the whole table (``write_codebooks_to_faiss``) instead.
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


def incremental_refresh(index: faiss.Index, rows: np.ndarray, vectors: np.ndarray
                        ) -> faiss.Index:
  """Re-encodes ``rows`` of the table as ``vectors`` in ``index``, quantizer unchanged.

  Afterwards ``index`` holds exactly what adding the whole current table to the same
  trained (emptied) index would hold, up to the order of entries within IVF lists: the
  changed rows are re-assigned to their nearest coarse list and re-encoded there, every
  other row keeps its code.

  Args:
    index: a populated, trained IndexIVF* or IndexPQ (optionally behind OPQ) whose ids are
      table rows (as ``build_index`` adds them).
    rows: (n,) distinct row ids that changed.
    vectors: (n, d) their current values (e.g. gathered from the device table by ``rows``,
      so that the rest of the table never leaves the devices).

  Returns:
    ``index``, modified in place.
  """
  rows = np.ascontiguousarray(rows, dtype=np.int64).reshape(-1)
  vectors = np.ascontiguousarray(vectors, dtype=np.float32)
  if vectors.shape != (rows.size, index.d):
    raise ValueError(f"vectors have shape {vectors.shape}, expected {(rows.size, index.d)}.")
  if rows.size == 0:
    return index
  if np.unique(rows).size != rows.size:
    raise ValueError("rows must be distinct.")
  if rows.min() < 0:
    raise ValueError("row ids must be >= 0.")
  if not np.isfinite(vectors).all():
    raise ValueError("vectors contain NaN or infinite values.")
  base, _ = _unwrap(index)
  if isinstance(base, faiss.IndexIVF):
    # Removing by id scans the inverted lists once (no direct map needed); the wrapper,
    # if any, forwards both calls and applies its transform on the way in.
    removed = index.remove_ids(faiss.IDSelectorBatch(rows.size, faiss.swig_ptr(rows)))
    if removed != rows.size:
      raise ValueError(f"{rows.size - removed} of the rows are not in the index.")
    index.add_with_ids(vectors, rows)
    return index
  if isinstance(base, faiss.IndexFlatCodes):
    # Flat-code indexes (IndexPQ, IndexScalarQuantizer, IndexFlat) store row i's code at
    # position i: overwrite those codes in place with the encoder of the full index.
    if rows.max() >= base.ntotal:
      raise ValueError(f"row ids must be < ntotal={base.ntotal}.")
    codes = index.sa_encode(vectors)
    stored = faiss.rev_swig_ptr(base.codes.data(), base.ntotal * base.code_size)
    stored = stored.reshape(base.ntotal, base.code_size)
    stored[rows] = codes
    return index
  raise TypeError(f"incremental refresh does not support {type(base).__name__}; rebuild "
                  "the index instead.")


def emptied_copy(index: faiss.Index) -> faiss.Index:
  """A copy of ``index`` with its trained quantizer and no vectors (for comparisons)."""
  copy = faiss.clone_index(index)
  copy.reset()
  return copy
