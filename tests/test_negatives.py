"""Invariants of the similarity-guided negative pool."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from qdr_jax.data.answers import AnswerMatcher, has_answer
from qdr_jax.negatives.pool import build_pool


def _check_invariants(pool, candidates, positives, pool_size, max_positives):
  batch = candidates.shape[0]
  assert pool.row_ids.shape == (pool_size,)
  assert pool.valid.shape == (pool_size,)
  assert pool.positive_mask.shape == pool.hidden_mask.shape == (batch, pool_size)
  assert pool.positive_positions.shape == (batch, max_positives)
  assert np.unique(pool.row_ids).size == pool_size, "duplicate rows in the pool"
  for b in range(batch):
    labelled = set(pool.row_ids[pool.positive_mask[b]].tolist())
    assert labelled == set(np.asarray(positives[b]).tolist())
    assert pool.valid[pool.positive_mask[b]].all()
    listed = pool.positive_positions[b][pool.positive_positions[b] >= 0]
    assert set(pool.row_ids[listed].tolist()) <= labelled
    assert listed.size == min(len(labelled), max_positives)
  assert not (pool.positive_mask & pool.hidden_mask).any()
  # Every candidate the index returned is in the pool unless the pool was full of them.
  cand = np.unique(candidates[candidates >= 0])
  if cand.size + sum(len(p) for p in positives) <= pool_size:
    assert set(cand.tolist()) <= set(pool.row_ids.tolist())


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 6), k=st.integers(1, 12), num_rows=st.integers(40, 200),
       slack=st.integers(-10, 20), seed=st.integers(0, 10_000), fill_valid=st.booleans())
def test_pool_invariants_property(batch, k, num_rows, slack, seed, fill_valid):
  rng = np.random.default_rng(seed)
  candidates = rng.integers(-1, num_rows, size=(batch, k))  # -1: FAISS's empty result
  positives = [rng.choice(num_rows, size=rng.integers(1, 4), replace=False)
               for _ in range(batch)]
  num_pos = np.unique(np.concatenate(positives)).size
  pool_size = max(num_pos, batch * k + slack)
  pool_size = min(pool_size, num_rows)
  pool = build_pool(candidates, positives, pool_size=pool_size, num_rows=num_rows,
                    max_positives=2, rng=np.random.default_rng(seed), fill_valid=fill_valid)
  _check_invariants(pool, candidates, positives, pool_size, 2)
  real = np.unique(np.concatenate([candidates[candidates >= 0].ravel(),
                                   np.concatenate(positives)]))
  if not fill_valid:
    # Invalid rows are exactly the filler, never a candidate or positive.
    assert not np.isin(pool.row_ids[~pool.valid], real).any()


def test_pool_known_case():
  candidates = np.array([[5, 1, 7, -1], [7, 2, 9, 5]])
  positives = [np.array([1]), np.array([3, 9])]
  pool = build_pool(candidates, positives, pool_size=8, num_rows=20, max_positives=2,
                    rng=np.random.default_rng(0), fill_valid=False,
                    hidden=[np.array([7]), np.array([])])
  # Positives first (sorted), then the de-duplicated negatives, then filler.
  assert pool.row_ids[:3].tolist() == [1, 3, 9]
  assert pool.row_ids[3:6].tolist() == [2, 5, 7]
  assert pool.valid.tolist() == [True] * 6 + [False] * 2
  assert pool.num_candidates == 5  # unique non-empty ids: 1, 2, 5, 7, 9
  assert pool.positive_mask[0].tolist() == [True] + [False] * 7
  assert pool.positive_mask[1].tolist() == [False, True, True] + [False] * 5
  assert pool.positive_positions.tolist() == [[0, -1], [1, 2]]
  # Row 7 is hidden from query 0 only; query 1's positive 9 was query 0's negative.
  assert pool.hidden_mask[0].tolist() == [False] * 5 + [True, False, False]
  assert not pool.hidden_mask[1].any()


def test_pool_subsamples_when_too_many_candidates():
  candidates = np.arange(100).reshape(4, 25)
  pool = build_pool(candidates, [np.array([0])] * 4, pool_size=30, num_rows=100,
                    max_positives=1, rng=np.random.default_rng(1))
  assert pool.valid.all() and np.unique(pool.row_ids).size == 30
  assert pool.positive_mask[:, 0].all()


def test_relevance_fn_hides_answer_matches_from_every_query():
  # Query 0's answer is in rows 5 and 7; row 7 came only through query 1's candidates
  # and row 1 is query 1's positive: both are false negatives for query 0 all the same.
  # Query 1's answer is in row 4 (query 0's candidate) and in its own positive 1.
  holds = {0: {5, 7, 1}, 1: {4, 1}}
  calls = []

  def relevance(rows):
    calls.append(rows.copy())
    return np.array([[r in holds[b] for r in rows] for b in range(2)])

  candidates = np.array([[4, 5], [6, 7]])
  pool = build_pool(candidates, [np.array([0]), np.array([1])], pool_size=6, num_rows=10,
                    max_positives=1, rng=np.random.default_rng(0), relevance_fn=relevance)
  assert len(calls) == 1 and sorted(calls[0].tolist()) == sorted(pool.row_ids.tolist())
  hidden = {b: set(pool.row_ids[pool.hidden_mask[b]].tolist()) for b in range(2)}
  assert hidden == {0: {1, 5, 7}, 1: {4}}  # a query's own positive is never hidden


def test_relevance_fn_sees_only_valid_rows_and_checks_its_shape():
  candidates = np.array([[4], [6]])
  pool = build_pool(candidates, [np.array([0]), np.array([1])], pool_size=6, num_rows=10,
                    max_positives=1, rng=np.random.default_rng(0), fill_valid=False,
                    relevance_fn=lambda rows: np.ones((2, rows.size), bool))
  np.testing.assert_array_equal(pool.hidden_mask[0], pool.valid & ~pool.positive_mask[0])
  assert not pool.hidden_mask[:, ~pool.valid].any()
  with pytest.raises(ValueError, match=r"relevance_fn returned shape \(2, 3\), expected"):
    build_pool(candidates, [np.array([0]), np.array([1])], pool_size=6, num_rows=10,
               max_positives=1, rng=np.random.default_rng(0),
               relevance_fn=lambda rows: np.ones((2, 3), bool))


def test_answer_matrix_matches_pairwise_matching():
  texts = ["Barack Obama was born in Hawaii", "the 1,000 islands", "obama's dog Bo",
           "Honolulu, Hawaii", "nothing here"]
  answers = [["Barack Obama", "Hawaii"], ["1,000"], [], ["bo", "Honolulu"]]
  rows = [4, 0, 3, 2, 1, 0]
  matcher = AnswerMatcher(texts)
  got = matcher.contains_answer_matrix(answers, rows)
  want = np.array([[has_answer(a, texts[r]) for r in rows] for a in answers])
  np.testing.assert_array_equal(got, want)
  assert want.sum() == 6 and want[0].tolist() == [False, True, True, False, False, True]


def test_pool_errors():
  with pytest.raises(ValueError, match="no positive"):
    build_pool(np.zeros((2, 3), int), [np.array([1]), np.array([], int)], pool_size=5,
               num_rows=10, max_positives=1, rng=np.random.default_rng(0))
  with pytest.raises(ValueError, match="pool_size"):
    build_pool(np.zeros((2, 3), int), [np.array([1, 2]), np.array([3])], pool_size=2,
               num_rows=10, max_positives=1, rng=np.random.default_rng(0))
