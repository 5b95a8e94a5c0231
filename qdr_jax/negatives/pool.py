"""Similarity-guided, cross-batch negative pool with a static shape for the jitted step.

For a batch of B queries the quantized index returns the top-k rows of each query. The
candidates of all queries are pooled, de-duplicated, stripped of every batch positive,
cut or filled to a fixed size, and the batch positives are put in front. Every query
then scores every row of the pool (B x P), which approximates the full softmax over the
corpus with the passages that matter most: those the index would actually serve.
Without de-duplication (the reference recipe's pool) the cut draws from every return,
repeats included, and a row drawn n times weighs n in the softmax (``multiplicity``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

# (P,) pooled rows -> (B, P) bool mask of the rows relevant to each query of the batch but
# not labelled (e.g. they contain its answer string); such rows are hidden from that query.
RelevanceFn = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Pool:
  """Rows shared by the batch and, per query, which of them to pull up, push down or hide.

  Attributes:
    row_ids: (P,) int32 unique table rows; batch positives first.
    valid: (P,) bool; False for filler rows that only keep the shape static.
    positive_mask: (B, P) bool, the query's labelled positives.
    hidden_mask: (B, P) bool, rows relevant to the query that are not labelled positives
      (false negatives); excluded from its softmax.
    positive_positions: (B, max_positives) int32 pool positions of each query's
      positives, -1 padded.
    num_candidates: unique candidate rows the index returned before cutting/filling.
    multiplicity: (P,) float32 times each row stands in the pool (its draws among the
      batch's returns; 1 for positives and filler), or None for a de-duplicated pool.
  """
  row_ids: np.ndarray
  valid: np.ndarray
  positive_mask: np.ndarray
  hidden_mask: np.ndarray
  positive_positions: np.ndarray
  num_candidates: int
  multiplicity: np.ndarray | None = None

  def arrays(self) -> dict[str, np.ndarray]:
    """The fields the jitted step consumes."""
    arrays = {"row_ids": self.row_ids, "valid": self.valid,
              "positive_mask": self.positive_mask, "hidden_mask": self.hidden_mask}
    if self.multiplicity is not None:
      arrays["multiplicity"] = self.multiplicity
    return arrays


def _membership(pool_rows: np.ndarray, query_of: np.ndarray, rows: np.ndarray,
                batch_size: int) -> np.ndarray:
  """(B, P) mask with True at (query_of[i], position of rows[i]) for rows found in the pool."""
  mask = np.zeros((batch_size, pool_rows.size), dtype=bool)
  if rows.size == 0:
    return mask
  order = np.argsort(pool_rows, kind="stable")
  sorted_rows = pool_rows[order]
  at = np.searchsorted(sorted_rows, rows).clip(0, pool_rows.size - 1)
  found = sorted_rows[at] == rows
  mask[query_of[found], order[at[found]]] = True
  return mask


def build_pool(candidates: np.ndarray,
               positives: Sequence[np.ndarray],
               *,
               pool_size: int,
               num_rows: int,
               max_positives: int,
               rng: np.random.Generator,
               fill_valid: bool = True,
               hidden: Sequence[np.ndarray] | None = None,
               relevance_fn: RelevanceFn | None = None,
               unlabelled: int = 0,
               dedup: bool = True) -> Pool:
  """Pools the index's candidates of a batch into one static-shape set of rows.

  Args:
    candidates: (B, k) rows returned by the index per query; -1 (FAISS's "no result")
      is dropped.
    positives: per query, its labelled positive rows (at least one each; none for the
      ``unlabelled`` last queries).
    pool_size: P, the static number of rows of the pool.
    num_rows: rows of the table, to draw filler rows from.
    max_positives: width of ``positive_positions``; a query's extra positives are kept in
      ``positive_mask`` but not listed.
    rng: numpy generator (subsampling and filler draws are seeded by the caller).
    fill_valid: filler rows act as uniform random negatives (True) or are masked out.
    hidden: per query, rows known relevant but unlabelled, hidden wherever they land.
    relevance_fn: called once on the pool's valid rows to find more such rows for every
      query: a passage holding query b's answer is a false negative for b whichever
      query's candidates (or the filler) brought it into the pool.
    unlabelled: the last this many queries have no labels (label-free pseudo-queries):
      their candidates join the pool, their ``positive_mask`` rows are all False.
    dedup: True - each candidate row once, the free rows filled; False - the budget is
      drawn from the returns themselves (a row several queries return can be drawn
      several times: ``multiplicity``), and only the rows repeats leave free are filler.

  Returns:
    A ``Pool``.
  """
  batch_size = candidates.shape[0]
  if len(positives) != batch_size:
    raise ValueError(f"{len(positives)} positive lists for a batch of {batch_size} queries.")
  pos_counts = np.asarray([len(p) for p in positives], dtype=np.int64)
  labelled = batch_size - unlabelled
  if (pos_counts[:labelled] == 0).any():
    raise ValueError(f"queries {np.flatnonzero(pos_counts[:labelled] == 0).tolist()} of the "
                     "batch have no positive; drop them before batching.")
  if pos_counts[labelled:].any():
    raise ValueError(f"the last {unlabelled} queries are unlabelled but have positives.")
  pos_query_of = np.repeat(np.arange(batch_size), pos_counts)
  pos_rows_all = np.concatenate([np.asarray(p, dtype=np.int64) for p in positives]
                                + [np.zeros(0, np.int64)])
  pos_rows = np.unique(pos_rows_all)
  if pos_rows.size > pool_size:
    raise ValueError(f"the batch has {pos_rows.size} distinct positives but "
                     f"config.negatives.pool_size is {pool_size}.")

  flat = candidates.reshape(-1).astype(np.int64)
  budget = pool_size - pos_rows.size
  if dedup:
    flat = np.unique(flat[flat >= 0])
    negatives = np.setdiff1d(flat, pos_rows, assume_unique=True)
    num_candidates = int(flat.size)
    if negatives.size > budget:
      negatives = np.sort(rng.choice(negatives, size=budget, replace=False))
  else:
    returns = flat[(flat >= 0) & ~np.isin(flat, pos_rows)]
    num_candidates = int(np.unique(flat[flat >= 0]).size)
    if returns.size > budget:
      returns = returns[rng.choice(returns.size, size=budget, replace=False)]
    negatives, draws = np.unique(returns, return_counts=True)
  num_fill = budget - negatives.size
  fill = _draw_fill(num_fill, num_rows, np.concatenate([pos_rows, negatives]), rng)

  row_ids = np.concatenate([pos_rows, negatives, fill])
  valid = np.ones(pool_size, dtype=bool)
  if not fill_valid:
    valid[pos_rows.size + negatives.size:] = False

  positive_mask = _membership(row_ids, pos_query_of, pos_rows_all, batch_size)
  hidden_mask = np.zeros_like(positive_mask)
  if hidden is not None:
    counts = np.asarray([len(h) for h in hidden])
    if counts.sum():
      hidden_rows = np.concatenate([np.asarray(h, dtype=np.int64) for h in hidden])
      hidden_mask |= _membership(row_ids, np.repeat(np.arange(batch_size), counts),
                                 hidden_rows, batch_size)
  if relevance_fn is not None:
    relevant = np.asarray(relevance_fn(row_ids[valid]), dtype=bool)
    if relevant.shape != (batch_size, int(valid.sum())):
      raise ValueError(f"relevance_fn returned shape {relevant.shape}, expected "
                       f"({batch_size}, {int(valid.sum())}): one row per query, one "
                       "column per valid pooled row.")
    hidden_mask[:, valid] |= relevant
  hidden_mask &= ~positive_mask

  positive_positions = np.full((batch_size, max_positives), -1, dtype=np.int32)
  qs, ps = np.nonzero(positive_mask)
  slot = np.arange(qs.size) - np.searchsorted(qs, qs)  # rank within each query's row
  keep = slot < max_positives
  positive_positions[qs[keep], slot[keep]] = ps[keep]

  multiplicity = None
  if not dedup:
    multiplicity = np.ones(pool_size, np.float32)
    multiplicity[pos_rows.size:pos_rows.size + negatives.size] = draws
  return Pool(row_ids=row_ids.astype(np.int32), valid=valid, positive_mask=positive_mask,
              hidden_mask=hidden_mask, positive_positions=positive_positions,
              num_candidates=num_candidates, multiplicity=multiplicity)


def _draw_fill(count: int, num_rows: int, taken: np.ndarray, rng: np.random.Generator
               ) -> np.ndarray:
  """``count`` distinct rows not in ``taken``, drawn uniformly (rejection in rounds)."""
  if count == 0:
    return np.zeros(0, dtype=np.int64)
  free = num_rows - np.unique(taken).size
  if count > free:
    raise ValueError(f"pool needs {count} filler rows but only {free} rows of the "
                     f"{num_rows}-row table are not already pooled; lower "
                     "config.negatives.pool_size.")
  if count > free // 2:  # dense case: enumerate the free rows instead of rejecting
    return np.sort(rng.choice(np.setdiff1d(np.arange(num_rows), taken), count, replace=False))
  chosen = np.zeros(0, dtype=np.int64)
  while chosen.size < count:
    draw = rng.integers(0, num_rows, size=2 * (count - chosen.size))
    draw = np.setdiff1d(np.unique(draw), taken)
    chosen = np.union1d(chosen, draw)
  return np.sort(rng.choice(chosen, count, replace=False))
