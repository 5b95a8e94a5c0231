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

from collections.abc import Mapping, Sequence

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
  if not qrels:
    raise ValueError("ranking_metrics needs at least one judged query.")
  parsed = {name: _parse(name) for name in measures}
  by_measure = {m: name for name, m in parsed.items()}
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
  means = table.mean(axis=1)
  return {by_measure[m]: float(means[j]) for m, j in col.items()}


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
