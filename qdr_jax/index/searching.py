"""Searching a FAISS index: FAISS's thread count, search parameters (nprobe, efSearch,
RaBitQ query bits) wherever they live in an index, and batched top-k search.

Scores: `search` always returns "higher is better" scores: inner products for
`metric='ip'`, negated squared distances for `metric='l2'`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import faiss
import numpy as np

from qdr_jax.index.layout import find_stage, hnsw_graphs, ivf_stage


# ----------------------------------------------------------------------------- threads


def set_num_threads(n: int) -> None:
  """Sets FAISS's OpenMP thread count for every later call (process-wide)."""
  if n < 1:
    raise ValueError(f"threads must be >= 1, got {n}.")
  faiss.omp_set_num_threads(int(n))


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[None]:
  """Runs a block with `n` FAISS threads, then restores the previous count (None: no change)."""
  if n is None:
    yield
    return
  previous = faiss.omp_get_max_threads()
  set_num_threads(n)
  try:
    yield
  finally:
    faiss.omp_set_num_threads(previous)


# ----------------------------------------------------------------------------- searching


def as_matrix(x: np.ndarray, name: str, d: int | None = None) -> np.ndarray:
  """`x` as a contiguous float32 (n, d) matrix, or a ValueError naming it (`name`) when it is
  not 2-D or (given `d`) its rows do not have `d` dimensions."""
  x = np.ascontiguousarray(x, dtype=np.float32)
  if x.ndim != 2:
    raise ValueError(f"{name} must be 2-D (n, d), got shape {x.shape}.")
  if d is not None and x.shape[1] != d:
    raise ValueError(f"{name} have dimension {x.shape[1]}, the index has {d}.")
  return x


def set_search_params(
    index: faiss.Index,
    nprobe: int | None = None,
    ef_search: int | None = None,
    *,
    rabitq_qb: int | None = None,
    strict: bool = True,
) -> None:
  """Sets IVF nprobe and/or HNSW efSearch wherever they live in `index`.

  Looks through IndexPreTransform (OPQ), IndexIDMap and refine wrappers. efSearch is set on
  every HNSW graph found: the index itself (`HNSW32,PQ16`) or an IVF's coarse quantizer
  (`IVF4096_HNSW32,PQ128`). None leaves a parameter unchanged.

  Args:
    index: any FAISS index.
    nprobe: IVF lists to probe.
    ef_search: HNSW search breadth.
    rabitq_qb: bits a RaBitQ index quantizes queries to (0..8; 0: float queries). FAISS
      writes it into the index file, so a saved index serves with it.
    strict: raise when a given parameter has nothing to apply to; False ignores it.

  Raises:
    ValueError: a value < 1, or (strict) a parameter the index has nothing to apply to.
  """
  if nprobe is not None:
    if nprobe < 1:
      raise ValueError(f"nprobe must be >= 1, got {nprobe}.")
    ivf = ivf_stage(index)
    if ivf is not None:
      ivf.nprobe = int(nprobe)
    elif strict:
      raise ValueError(f"nprobe={nprobe} given but the index has no IVF stage.")
  if ef_search is not None:
    if ef_search < 1:
      raise ValueError(f"ef_search must be >= 1, got {ef_search}.")
    graphs = hnsw_graphs(index)
    for g in graphs:
      g.hnsw.efSearch = int(ef_search)
    if not graphs and strict:
      raise ValueError(f"ef_search={ef_search} given but the index has no HNSW graph.")
  if rabitq_qb is not None:
    if not 0 <= rabitq_qb <= 8:
      raise ValueError(f"rabitq_qb must be in 0..8, got {rabitq_qb}.")
    rabitq = find_stage(index, (faiss.IndexRaBitQ, faiss.IndexIVFRaBitQ))
    if rabitq is not None:
      rabitq.qb = int(rabitq_qb)
    elif strict:
      raise ValueError(f"rabitq_qb={rabitq_qb} given but the index has no RaBitQ stage.")


def search(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    *,
    batch_size: int = 4096,
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Top-k search in query batches.

  Returns:
    scores (Q, k) float32, higher is better (L2 distances are negated), and ids (Q, k) int64
    row ids; slots with fewer than k results hold id -1 (and score -inf).
  """
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}.")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  q = as_matrix(queries, "queries", d=index.d)
  scores = np.empty((q.shape[0], k), dtype=np.float32)
  ids = np.empty((q.shape[0], k), dtype=np.int64)
  with num_threads(threads):
    for start in range(0, q.shape[0], batch_size):
      stop = start + batch_size
      scores[start:stop], ids[start:stop] = index.search(q[start:stop], k)
  if index.metric_type == faiss.METRIC_L2:
    np.negative(scores, out=scores)
  # FAISS pads missing results with -1 ids and +-max-float scores; make the pad unambiguous.
  scores[ids < 0] = -np.inf
  return scores, ids
