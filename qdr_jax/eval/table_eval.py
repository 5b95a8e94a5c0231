"""Flat versus quantized evaluation of one table and one set of query embeddings.

The quantized figures depend on FAISS's k-means seeds (on SciFact the spread over seeds
is about +-0.012 nDCG@10), so the quantized index is built once per seed of
``config.eval.index_seeds`` and the metrics are reported as mean, standard deviation and
per-seed values.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence

import ml_collections
import numpy as np

from qdr_jax.data.types import Corpus, Split
from qdr_jax.eval.evaluator import IndexScores, score_index, score_ranking
from qdr_jax.eval.metrics import subset_means
from qdr_jax.eval.trec import write_trec_run
from qdr_jax.index.build import build_index, build_quantized_seeds
from qdr_jax.index.layout import describe_index


def _eval_kwargs(eval_cfg: ml_collections.ConfigDict) -> dict:
  return dict(depth=eval_cfg.depth, answer_ks=tuple(eval_cfg.answer_ks),
              measures=tuple(eval_cfg.measures))


def mean_and_spread(per_seed: Sequence[dict[str, float | None]]) -> tuple[dict, dict]:
  """Mean and standard deviation of each metric over seeds; None stays None (a metric of
  an empty subset)."""
  keys = per_seed[0].keys()
  values = {k: [m[k] for m in per_seed] for k in keys}
  mean = {k: None if None in v else float(np.mean(v)) for k, v in values.items()}
  std = {k: None if None in v else float(np.std(v)) for k, v in values.items()}
  return mean, std


def _score(index, query_emb: np.ndarray, split: Split, corpus: Corpus,
           eval_cfg: ml_collections.ConfigDict, run_path: pathlib.Path | None = None
           ) -> IndexScores:
  """The index's scores; with ``run_path``, its ranking is written there as a TREC run
  (and not kept). ``index`` may also be the (scores, ids) of a search done elsewhere."""
  if isinstance(index, tuple):
    kwargs = _eval_kwargs(eval_cfg)
    del kwargs["depth"]  # the search's
    scores = score_ranking(*index, split, corpus, return_run=run_path is not None, **kwargs)
  else:
    scores = score_index(index, query_emb, split, corpus, return_run=run_path is not None,
                         **_eval_kwargs(eval_cfg))
  if run_path is None:
    return scores
  write_trec_run(run_path, scores.run)
  return dataclasses.replace(scores, run=None)


def _judged(scores: IndexScores, metric: str) -> tuple[list[str], np.ndarray]:
  """The queries `metric` judges and their values."""
  values = scores.per_query[metric]
  keep = ~np.isnan(values)
  return [q for q, k in zip(scores.query_ids, keep) if k], values[keep]


@dataclasses.dataclass(frozen=True)
class EvalQueries:
  """One split's queries as `evaluate_splits` scores them.

  subsets: optional {name: query ids} (e.g. 'seen' / 'unseen' from
    `metrics.split_seen`) to report metrics on, besides 'all'.
  runs_dir: optional directory for TREC run files of each search (`run_files`).
  """
  embeddings: np.ndarray
  split: Split
  subsets: Mapping[str, Sequence[str]] | None = None
  runs_dir: str | os.PathLike | None = None  # TREC run files of each search (`run_files`)


def evaluate_table(table: np.ndarray, query_emb: np.ndarray, split: Split, corpus: Corpus,
                   index_cfg: ml_collections.ConfigDict, eval_cfg: ml_collections.ConfigDict,
                   subsets: Mapping[str, Sequence[str]] | None = None,
                   served_index=None, quantized_indexes: Iterable | None = None,
                   runs_dir: str | os.PathLike | None = None) -> dict:
  """`evaluate_splits` of one split."""
  return evaluate_splits(table, {"": EvalQueries(query_emb, split, subsets, runs_dir)}, corpus,
                         index_cfg, eval_cfg, served_index=served_index,
                         quantized_indexes=quantized_indexes)[""]


def evaluate_splits(table: np.ndarray | None, queries: Mapping[str, EvalQueries],
                    corpus: Corpus, index_cfg: ml_collections.ConfigDict,
                    eval_cfg: ml_collections.ConfigDict, served_index=None,
                    quantized_indexes: Iterable | None = None,
                    flat_searches: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None
                    ) -> dict[str, dict]:
  """Flat and quantized (one build per index seed) metrics of one table, for each split
  of ``queries``.

  Each index is built once and searched once per split; subset figures and per-query
  values come from that search.

  Args:
    served_index: optional FAISS index a run serves instead of a fresh build (its
      training quantizer, learned parameters written in), evaluated the same way.
    quantized_indexes: optional indexes over `table`, one per seed of
      ``eval_cfg.index_seeds`` in order (`build_quantized_seeds`, which the default
      calls with ``eval_cfg.concurrent_builds``); each is scored and dropped in turn.
    flat_searches: optional exact (scores, ids) per name of ``queries``, searched
      elsewhere at `evaluator.search_depth` (`index.exact.exact_search` on the devices),
      instead of a Flat index over ``table``. With these and ``quantized_indexes``,
      ``table`` is not read and may be None.

  Returns:
    Per name of ``queries``: {'flat': metrics, 'quantized': mean metrics over the index
    seeds, 'quantized_std', 'quantized_per_seed', 'index': description of the quantized
    index, 'per_query': {'metric': eval_cfg.primary_metric, 'query_ids': the queries it
    judges, 'flat': their values, 'quantized': one list of values per index seed} (absent
    when the primary metric is not measured), and with subsets, 'subsets': {'all' and each
    name: {'count', 'flat', 'quantized', 'quantized_std'}}, a metric None on an empty
    subset}. With ``served_index``, 'served' holds the same keys for that one index (as
    one seed), so anything that reads an evaluation reads it too.
  """
  seeds = list(eval_cfg.index_seeds)
  paths = {name: run_files(q.runs_dir, seeds) if q.runs_dir is not None else {}
           for name, q in queries.items()}
  flat_index = build_index(table, "Flat") if flat_searches is None else None
  flat = {name: _score(flat_index if flat_searches is None else flat_searches[name],
                       q.embeddings, q.split, corpus, eval_cfg, paths[name].get("flat"))
          for name, q in queries.items()}
  del flat_index
  if quantized_indexes is None:
    quantized_indexes = build_quantized_seeds(table, index_cfg, eval_cfg.index_seeds,
                                              eval_cfg.concurrent_builds)
  quantized: dict[str, list[IndexScores]] = {name: [] for name in queries}
  description = None
  for i, index in enumerate(quantized_indexes):
    seed = seeds[i] if i < len(seeds) else None
    for name, q in queries.items():
      quantized[name].append(_score(index, q.embeddings, q.split, corpus, eval_cfg,
                                    paths[name].get(f"quantized_seed{seed}")))
    description = describe_index(index)
    del index  # not held while the next one builds
  if len(next(iter(quantized.values()))) != len(eval_cfg.index_seeds):
    raise ValueError(f"{len(next(iter(quantized.values())))} quantized indexes for the "
                     f"{len(eval_cfg.index_seeds)} seeds of config.eval.index_seeds.")
  metric = eval_cfg.primary_metric
  out = {}
  for name, q in queries.items():
    out[name] = {**_against_flat(flat[name], quantized[name], metric, q.subsets),
                 "index": description}
    if served_index is not None:
      served = _score(served_index, q.embeddings, q.split, corpus, eval_cfg)
      out[name]["served"] = {**_against_flat(flat[name], [served], metric, q.subsets),
                             "index": describe_index(served_index)}
  return out


def run_files(runs_dir: str | os.PathLike, index_seeds: Sequence[int]
              ) -> dict[str, pathlib.Path]:
  """Where `evaluate_table` writes its TREC runs: ``run.flat.trec`` and
  ``run.quantized.seed{s}.trec`` per index seed."""
  runs_dir = pathlib.Path(runs_dir)
  return {"flat": runs_dir / "run.flat.trec",
          **{f"quantized_seed{s}": runs_dir / f"run.quantized.seed{s}.trec"
             for s in index_seeds}}


def _against_flat(flat: IndexScores, quantized: Sequence[IndexScores], metric: str,
                  subsets: Mapping[str, Sequence[str]] | None) -> dict:
  """The flat and quantized (one search per index seed) parts of `evaluate_table`."""
  mean, std = mean_and_spread([s.metrics for s in quantized])
  out = {"flat": flat.metrics, "quantized": mean, "quantized_std": std,
         "quantized_per_seed": [s.metrics for s in quantized]}
  if metric in flat.per_query:
    query_ids, flat_values = _judged(flat, metric)
    out["per_query"] = {"metric": metric, "query_ids": query_ids,
                        "flat": flat_values.tolist(),
                        "quantized": [_judged(s, metric)[1].tolist() for s in quantized]}
  if subsets is not None:
    out["subsets"] = {"all": {"count": len(flat.query_ids), "flat": flat.metrics,
                              "quantized": mean, "quantized_std": std}}
    flat_sub = subset_means(flat.query_ids, flat.per_query, subsets)
    quant_sub = [subset_means(s.query_ids, s.per_query, subsets) for s in quantized]
    for name, entry in flat_sub.items():
      count = entry.pop("count")
      for per_seed in quant_sub:
        per_seed[name].pop("count")
      q_mean, q_std = mean_and_spread([per_seed[name] for per_seed in quant_sub])
      out["subsets"][name] = {"count": count, "flat": entry, "quantized": q_mean,
                              "quantized_std": q_std}
  return out
