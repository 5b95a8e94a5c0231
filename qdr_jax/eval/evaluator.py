"""Evaluate a corpus index on one split: search once, then score by qrels and/or answers."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import faiss
import numpy as np

from qdr_jax.data.types import Corpus, Split
from qdr_jax.data.answers import DEFAULT_KS, AnswerMatcher, accuracy_from_ranks
from qdr_jax.eval.metrics import DEFAULT_MEASURES, per_query_ranking, run_from_search
from qdr_jax.index.searching import search


@dataclasses.dataclass(frozen=True)
class IndexScores:
  """One search of a split, scored.

  metrics: {measure: mean}, as `evaluate_index` returns them.
  query_ids: the split's query ids, the rows of every `per_query` array.
  per_query: {measure: (Q,) float64}; NaN where the measure does not judge the query (a
    ranking measure on a query without qrels). Means over subsets of queries come from
    these (`metrics.subset_means`) without searching again.
  run: query id -> {passage id: score}, or None when not asked for and not needed.
  """
  metrics: dict[str, float]
  query_ids: list[str]
  per_query: dict[str, np.ndarray]
  run: dict[str, dict[str, float]] | None = None


def evaluate_index(index: faiss.Index, query_embeddings: np.ndarray, split: Split,
                   corpus: Corpus, *, return_run: bool = False, **options):
  """The metrics of `score_index` (same arguments and errors): {measure: value}, or with
  `return_run`, (metrics, run)."""
  scores = score_index(index, query_embeddings, split, corpus, return_run=return_run,
                       **options)
  return (scores.metrics, scores.run) if return_run else scores.metrics


def score_index(
    index: faiss.Index,
    query_embeddings: np.ndarray,
    split: Split,
    corpus: Corpus,
    *,
    depth: int = 1000,
    answer_ks: Sequence[int] = DEFAULT_KS,
    measures: Sequence[str] = DEFAULT_MEASURES,
    batch_size: int = 4096,
    matcher: AnswerMatcher | None = None,
    return_run: bool = False,
) -> IndexScores:
  """Searches `index` with the split's queries and scores the ranking.

  The index's search ids must be corpus rows (row i = `corpus.ids[i]`), as `build_index`
  makes them. Search settings (nprobe, efSearch) are whatever the index holds; set them with
  `set_search_params` first.

  Args:
    index: FAISS index over the corpus table.
    query_embeddings: (Q, d) float32, row i embedding `split.queries.ids[i]`.
    split: the queries with qrels and/or answers.
    corpus: the indexed passages.
    depth: passages retrieved per query, capped at the corpus size; raised to max(answer_ks)
      when the split is judged by answers.
    answer_ks: top-k cutoffs of answer accuracy.
    measures: ranking measures (see `ranking_metrics`).
    batch_size: queries per FAISS search call.
    matcher: an AnswerMatcher over `corpus.texts` to reuse its passage cache across calls.
    return_run: keep the run (query id -> {passage id: score}), e.g. for a TREC file.

  Returns:
    IndexScores: metrics {measure: value} with the ranking measures when the split has
    qrels and 'top{k}' answer accuracies when `split.answers` is not None (both when both
    are there), their per-query values, and with `return_run` the run.

    Ranking measures average over the split's queries that have qrels, and a qrels query
    without results scores 0; qrels of queries not in `split.queries` are ignored (they have
    no embedding). Answer accuracy averages over all the split's queries; a query with no
    answers counts as a miss, as in DPR.

  Raises:
    ValueError: shapes that do not match, an index whose size is not the corpus size, or a
      split with neither qrels nor answers.
  """
  q = _checked_queries(query_embeddings, split)
  if index.ntotal != len(corpus):
    raise ValueError(f"The index holds {index.ntotal} vectors but the corpus has {len(corpus)}.")
  _judged_by(split, corpus)  # refused before the search
  k = search_depth(split, corpus, depth, answer_ks)
  scores, ids = search(index, q, k, batch_size=batch_size)
  return score_ranking(scores, ids, split, corpus, answer_ks=answer_ks, measures=measures,
                       matcher=matcher, return_run=return_run)


def _checked_queries(query_embeddings: np.ndarray, split: Split) -> np.ndarray:
  q = np.asarray(query_embeddings)
  if q.ndim != 2 or q.shape[0] != len(split.queries.ids):
    raise ValueError(
        f"query_embeddings has shape {q.shape}; expected ({len(split.queries.ids)}, d), one "
        "row per query of the split.")
  return q


def _judged_by(split: Split, corpus: Corpus) -> tuple[list[str], dict]:
  """The split's query ids and the qrels of those queries; refuses a split that cannot
  be judged."""
  query_ids = [str(q) for q in split.queries.ids]
  wanted = set(query_ids)
  qrels = {qid: docs for qid, docs in split.qrels.items() if qid in wanted}
  if split.qrels and not qrels:
    raise ValueError("None of the split's qrels queries is among its queries.")
  if not qrels and split.answers is None:
    raise ValueError("The split has neither qrels nor answers to judge the search by.")
  if not query_ids or len(corpus) == 0:
    raise ValueError("Nothing to evaluate: no queries or an empty corpus.")
  return query_ids, qrels


def search_depth(split: Split, corpus: Corpus, depth: int = 1000,
                 answer_ks: Sequence[int] = DEFAULT_KS) -> int:
  """Passages `score_index` retrieves a query: ``depth``, raised to max(answer_ks) when
  the split is judged by answers, capped at the corpus size."""
  k = max(depth, max(answer_ks)) if split.answers is not None else depth
  return min(k, len(corpus))


def score_ranking(
    scores: np.ndarray,
    ids: np.ndarray,
    split: Split,
    corpus: Corpus,
    *,
    answer_ks: Sequence[int] = DEFAULT_KS,
    measures: Sequence[str] = DEFAULT_MEASURES,
    matcher: AnswerMatcher | None = None,
    return_run: bool = False,
) -> IndexScores:
  """`score_index` of a search done elsewhere (e.g. `index.exact.exact_search` on the
  devices): ``scores`` and ``ids`` (Q, k), best first, row i for the split's query i, ids
  being corpus rows; k as `search_depth` gives it. Same arguments, result and errors."""
  _checked_queries(ids, split)
  query_ids, qrels = _judged_by(split, corpus)
  by_answers = split.answers is not None

  results: dict[str, float] = {}
  per_query: dict[str, np.ndarray] = {}
  run = None
  if qrels or return_run:
    run = run_from_search(query_ids, ids, scores, corpus.ids)
  if qrels:
    judged, values = per_query_ranking(qrels, run, measures)
    results.update({name: float(v.mean()) for name, v in values.items()})
    row_of = {qid: i for i, qid in enumerate(query_ids)}
    rows = np.asarray([row_of[qid] for qid in judged], dtype=np.int64)
    for name, v in values.items():
      per_query[name] = np.full(len(query_ids), np.nan)
      per_query[name][rows] = v
  if by_answers:
    matcher = matcher if matcher is not None else AnswerMatcher(corpus.texts)
    answers = [split.answers.get(qid, ()) for qid in query_ids]
    # Only the top max(answer_ks) slots can change any top-k accuracy.
    ranks = matcher.first_hit_ranks(answers, ids[:, :max(answer_ks)])
    results.update(accuracy_from_ranks(ranks, answer_ks))
    for k_ in answer_ks:  # A miss is rank -1.
      per_query[f"top{k_}"] = ((ranks >= 0) & (ranks < k_)).astype(np.float64)
  return IndexScores(metrics=results, query_ids=query_ids, per_query=per_query,
                     run=run if return_run else None)
