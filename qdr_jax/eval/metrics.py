"""Ranking metrics (MRR, recall, nDCG, ...) of a retrieval run against qrels, via ir_measures.

Averaging follows `trec_eval -c`: every query in the qrels counts, and a query missing from
the run (or whose run is empty) scores 0 on every measure. We do not rely on a provider's
own aggregation for this: per-query values come from `ir_measures.iter_calc` and the mean over
the qrels queries is taken here, with absent values filled with 0. Queries in the run but not in
the qrels are ignored. Relevance > 0 marks a relevant passage; nDCG uses graded gains.

Ties: trec_eval (and so ir_measures' pytrec_eval provider) orders equal scores by document id,
not by the order of the run. Quantized indexes tie often (passages with the same code score
the same), so `run_from_search` keeps the order the index returned by lowering each tied score
by the smallest float32 steps (trec_eval stores scores as 32-bit floats) needed to make a row
strictly decreasing; ranking metrics then see the same order as answer accuracy does.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import ir_measures
import numpy as np

DEFAULT_MEASURES = ("MRR@10", "R@10", "R@100", "R@1000", "nDCG@10")

# Names people write that ir_measures spells differently.
_ALIASES = {"MRR": "RR"}


def _parse(name: str):
  base, at, cutoff = name.partition("@")
  try:
    return ir_measures.parse_measure(_ALIASES.get(base, base) + at + cutoff)
  except (ValueError, NameError, KeyError, TypeError, SyntaxError) as e:
    raise ValueError(f"Unknown measure {name!r}.") from e


def per_query_ranking(
    qrels: Mapping[str, Mapping[str, int]],
    run: Mapping[str, Mapping[str, float]],
    measures: Sequence[str] = DEFAULT_MEASURES,
) -> tuple[list[str], dict[str, np.ndarray]]:
  """Each measure's value for every query of the qrels (0 where the run has none).

  Returns:
    (query ids in the qrels' order, {name: (Q,) float64 values in that order}).

  Raises:
    ValueError: no qrels, or an unknown measure name.
  """
  if not qrels:
    raise ValueError("ranking_metrics needs at least one judged query.")
  parsed = {name: _parse(name) for name in measures}
  # ir_measures wants plain ints / floats and str ids; drop queries it cannot judge.
  qrels_in = {str(q): {str(d): int(r) for d, r in docs.items()} for q, docs in qrels.items()}
  run_in = {
      str(q): {str(d): float(s) for d, s in docs.items()}
      for q, docs in run.items() if str(q) in qrels_in and docs
  }
  qids = list(qrels_in)
  row = {q: i for i, q in enumerate(qids)}
  # Zero-filled table: any (query, measure) the provider does not report stays 0.
  table = np.zeros((len(parsed), len(qids)), dtype=np.float64)
  col = {m: j for j, m in enumerate(parsed.values())}
  if run_in:
    for metric in ir_measures.iter_calc(list(parsed.values()), qrels_in, run_in):
      if metric.query_id in row and metric.measure in col:
        table[col[metric.measure], row[metric.query_id]] = metric.value
  return qids, {name: table[col[m]] for name, m in parsed.items()}


def ranking_metrics(
    qrels: Mapping[str, Mapping[str, int]],
    run: Mapping[str, Mapping[str, float]],
    measures: Sequence[str] = DEFAULT_MEASURES,
) -> dict[str, float]:
  """Means over the qrels' queries of each measure, keyed by the names given in `measures`.

  Args:
    qrels: query id -> {passage id: relevance}.
    run: query id -> {passage id: score}; higher scores rank first.
    measures: ir_measures names; "MRR@k" is accepted for "RR@k".

  Returns:
    {name: mean}; queries of the qrels absent from the run count as 0.

  Raises:
    ValueError: no qrels, or an unknown measure name.
  """
  _, values = per_query_ranking(qrels, run, measures)
  return {name: float(v.mean()) for name, v in values.items()}


def split_seen(test_qrels: Mapping[str, Mapping[str, int]],
               train_qrels: Mapping[str, Mapping[str, int]],
               query_ids: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
  """Test queries split by whether any of their positives was a training positive.

  A positive is a passage with relevance > 0 (for DPR-style data the loaders put a
  query's positive passage ids in its qrels with relevance 1).

  Args:
    test_qrels: the test split's query id -> {passage id: relevance}.
    train_qrels: the training split's qrels.
    query_ids: the test queries to split, in order; None = the test qrels' queries. A
      query without positives has none that was trained on: it is unseen.

  Returns:
    (seen query ids, unseen query ids), each in the order of `query_ids`.
  """
  trained = {str(d) for docs in train_qrels.values() for d, rel in docs.items() if rel > 0}
  seen, unseen = [], []
  for qid in (test_qrels if query_ids is None else query_ids):
    docs = test_qrels.get(qid, {})
    hit = any(rel > 0 and str(d) in trained for d, rel in docs.items())
    (seen if hit else unseen).append(str(qid))
  return seen, unseen


def share_in_top(ranked_rows: np.ndarray, member: np.ndarray) -> float:
  """Fraction of the returned rows of a (Q, k) result that belong to a set of rows.

  For example the share of training positives in the top 10 that unseen test queries get,
  flat against quantized: a learned index that serves trained passages to every query
  shows as a larger share than its flat index gives.

  Args:
    ranked_rows: (Q, k) table rows per query; -1 (FAISS found fewer than k) is skipped.
    member: (N,) bool over the table's rows.

  Returns:
    members among the returned rows / returned rows (0.0 when nothing was returned).
  """
  ranked_rows = np.asarray(ranked_rows)
  member = np.asarray(member, bool)
  if ranked_rows.size and ranked_rows.max() >= member.size:
    raise ValueError(f"share_in_top: row {ranked_rows.max()} is outside the {member.size} "
                     "rows of the membership mask.")
  returned = ranked_rows[ranked_rows >= 0]
  return float(member[returned].mean()) if returned.size else 0.0


def subset_means(query_ids: Sequence[str], per_query: Mapping[str, np.ndarray],
                 subsets: Mapping[str, Collection[str]]) -> dict[str, dict]:
  """Each subset's count and per-measure means, from per-query values (no new search).

  Args:
    query_ids: (Q,) ids of the rows of every `per_query` array.
    per_query: {measure: (Q,) values}; NaN marks a query the measure does not judge (e.g. a
      qrels measure on a query without qrels), which the mean skips.
    subsets: {name: query ids}; ids not in `query_ids` are ignored.

  Returns:
    {name: {"count": queries of the subset among `query_ids`, measure: mean or None}};
    None where no query of the subset is judged by the measure (e.g. an empty subset).
  """
  row = {q: i for i, q in enumerate(query_ids)}
  out = {}
  for name, members in subsets.items():
    rows = np.fromiter((row[q] for q in members if q in row), dtype=np.int64)
    entry: dict = {"count": int(rows.size)}
    for measure, values in per_query.items():
      picked = np.asarray(values, dtype=np.float64)[rows]
      picked = picked[~np.isnan(picked)]
      entry[measure] = float(picked.mean()) if picked.size else None
    out[name] = entry
  return out


def run_from_search(
    query_ids: Sequence[str],
    ids: np.ndarray,
    scores: np.ndarray,
    corpus_ids: Sequence[str],
    *,
    keep_order: bool = True,
) -> dict[str, dict[str, float]]:
  """Turns FAISS search output into a run: query id -> {passage id: score}.

  Args:
    query_ids: (Q,) query ids, in the order of the search's rows.
    ids: (Q, k) row ids into `corpus_ids`; FAISS's -1 padding is dropped.
    scores: (Q, k) scores, higher is better, each row in rank order.
    corpus_ids: passage id of each table row.
    keep_order: make tied scores strictly decreasing (float32 steps) so that evaluation keeps
      the index's rank order instead of trec_eval's tie-break by passage id.

  Returns:
    The run. If a row id repeats within a query (it should not), its best score is kept.
  """
  ids = np.asarray(ids)
  # trec_eval keeps scores as 32-bit floats, so order must be kept in float32 steps.
  scores = np.array(scores, dtype=np.float32 if keep_order else np.float64)
  if ids.shape != scores.shape or ids.ndim != 2 or ids.shape[0] != len(query_ids):
    raise ValueError(
        f"ids {ids.shape} and scores {scores.shape} must both be (len(query_ids)="
        f"{len(query_ids)}, k).")
  if keep_order:
    # Column by column, vectorised over queries: each score at most one step below the last.
    for j in range(1, scores.shape[1]):
      np.minimum(scores[:, j], np.nextafter(scores[:, j - 1], np.float32(-np.inf)),
                 out=scores[:, j])
  n = len(corpus_ids)
  valid = ids >= 0
  if (ids[valid] >= n).any():
    raise ValueError(f"Search returned a row id >= corpus size {n}.")
  rows = np.where(valid, ids, 0)
  if hasattr(corpus_ids, "take"):  # A corpus column: read only the retrieved rows.
    docs = np.asarray(corpus_ids.take(rows.ravel()), dtype=object).reshape(rows.shape)
  else:
    docs = np.asarray(corpus_ids, dtype=object)[rows]
  run: dict[str, dict[str, float]] = {}
  score_rows = scores.astype(np.float64).tolist()
  for qid, d_row, s_row, v_row in zip(query_ids, docs, score_rows, valid):
    ranked: dict[str, float] = {}
    for d, s, v in zip(d_row, s_row, v_row):
      if v:
        ranked.setdefault(d, s)  # On a duplicate the first (best-ranked) score wins.
    run[str(qid)] = ranked
  return run
