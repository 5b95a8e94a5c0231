"""Incremental index refresh equals re-adding the whole table to the same quantizer."""

import numpy as np
import pytest

from qdr_jax.index.build import build_index
from qdr_jax.index.refresh import (ChangedRows, emptied_copy, incremental_refresh,
                                   refresh_kind)
from qdr_jax.index.searching import search
from qdr_jax.quant.faiss_bridge import stored_codes

ROWS, DIM = 3000, 32


def _tables():
  """A clustered table, and the same table after a 'training' drift of 10% of its rows."""
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(24, DIM))
  table = centers[rng.integers(0, 24, ROWS)] + 0.3 * rng.normal(size=(ROWS, DIM))
  table = (table / np.linalg.norm(table, axis=1, keepdims=True)).astype(np.float32)
  changed = np.sort(rng.choice(ROWS, ROWS // 10, replace=False))
  new = table.copy()
  # Small moves for most rows, large ones (another cluster, hence another IVF list) for some.
  new[changed] += 0.05 * rng.normal(size=(changed.size, DIM)).astype(np.float32)
  jump = changed[::5]
  new[jump] = table[rng.integers(0, ROWS, jump.size)]
  queries = table[rng.integers(0, ROWS, 40)] + 0.1 * rng.normal(size=(40, DIM))
  return table, new, changed, queries.astype(np.float32)


def _assert_same_search(a, b, queries, k=20):
  scores_a, ids_a = search(a, queries, k)
  scores_b, ids_b = search(b, queries, k)
  np.testing.assert_array_equal(scores_a, scores_b)
  # Equal scores may come out in either order (IVF lists hold entries in another order),
  # so ids must agree wherever the score is not tied with a neighbour.
  tied = np.zeros_like(scores_a, dtype=bool)
  tied[:, 1:] |= scores_a[:, 1:] == scores_a[:, :-1]
  tied[:, :-1] |= scores_a[:, :-1] == scores_a[:, 1:]
  np.testing.assert_array_equal(ids_a[~tied], ids_b[~tied])
  assert (~tied).mean() > 0.9


@pytest.mark.parametrize("factory", ["IVF16,PQ8", "OPQ8,IVF16,PQ8", "PQ8",
                                     "IVF16_HNSW8,PQ8"])
def test_incremental_equals_full_add_to_same_quantizer(factory):
  table, new, changed, queries = _tables()
  index = build_index(table, factory, seed=0, nprobe=4, opq_niter=3)
  codes_before, lists_before = stored_codes(index)
  reference = emptied_copy(index)
  reference.add(new)

  assert incremental_refresh(index, changed, new[changed]) == changed.size

  assert index.ntotal == ROWS
  codes, lists = stored_codes(index)
  ref_codes, ref_lists = stored_codes(reference)
  # Changed rows: re-assigned and re-encoded exactly as a fresh add would.
  np.testing.assert_array_equal(codes[changed], ref_codes[changed])
  np.testing.assert_array_equal(lists[changed], ref_lists[changed])
  # Unchanged rows: untouched.
  kept = np.setdiff1d(np.arange(ROWS), changed)
  np.testing.assert_array_equal(codes[kept], codes_before[kept])
  np.testing.assert_array_equal(lists[kept], lists_before[kept])
  if "IVF" in factory:
    assert (lists[changed] != lists_before[changed]).any()  # some rows moved lists
  _assert_same_search(index, reference, queries)


def test_flat_index_rows_overwritten():
  table, new, changed, queries = _tables()
  index = build_index(table, "Flat")
  incremental_refresh(index, changed, new[changed])
  reference = build_index(new, "Flat")
  _assert_same_search(index, reference, queries)


def test_refresh_rejects_bad_input():
  table, new, changed, _ = _tables()
  index = build_index(table, "IVF16,PQ8", seed=0)
  with pytest.raises(ValueError, match="not in the index"):
    incremental_refresh(index, np.array([ROWS + 5]), new[:1])
  with pytest.raises(ValueError, match="distinct"):
    incremental_refresh(index, np.array([1, 1]), new[:2])
  with pytest.raises(ValueError, match="shape"):
    incremental_refresh(index, changed, new[:3])
  assert incremental_refresh(index, np.zeros(0, np.int64), new[:0]) == 0
  refine = build_index(table, "IVF16,PQ8,Refine(Flat)", seed=0)
  with pytest.raises(TypeError, match="IndexRefine"):
    incremental_refresh(refine, changed[:2], new[changed[:2]])


def test_changed_rows_accumulate_and_reset():
  tracker = ChangedRows(10)
  tracker.add(np.array([3, 1, 3]))
  tracker.add(np.array([[7], [1]]))
  assert len(tracker) == 3
  np.testing.assert_array_equal(tracker.peek(), [1, 3, 7])
  np.testing.assert_array_equal(tracker.take(), [1, 3, 7])
  assert len(tracker) == 0 and tracker.take().size == 0
  with pytest.raises(ValueError):
    tracker.add(np.array([10]))


def test_refresh_kind():
  # Every refresh is full by default.
  assert [refresh_kind(s, 10, 0) for s in (0, 5, 10, 20)] == [None, None, "full", "full"]
  kinds = [refresh_kind(s, 10, 30) for s in range(1, 61)]
  assert [(s + 1, k) for s, k in enumerate(kinds) if k] == [
      (10, "incremental"), (20, "incremental"), (30, "full"),
      (40, "incremental"), (50, "incremental"), (60, "full")]
  assert refresh_kind(10, 0, 0) is None  # refreshes off
  with pytest.raises(ValueError, match="multiple"):
    refresh_kind(10, 10, 25)
