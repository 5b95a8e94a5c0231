"""Flat versus quantized evaluation of one table and one set of query embeddings.

The quantized figures depend on FAISS's k-means seeds (on SciFact the spread over seeds
is about +-0.012 nDCG@10), so the quantized index is built once per seed of
``config.eval.index_seeds`` and the metrics are reported as mean, standard deviation and
per-seed values.
"""

from __future__ import annotations

from typing import Sequence

import ml_collections
import numpy as np

from qdr_jax.data.types import Corpus, Split
from qdr_jax.eval.evaluator import evaluate_index
from qdr_jax.index.faiss_index import build_index, build_quantized, describe_index


def _eval_kwargs(eval_cfg: ml_collections.ConfigDict) -> dict:
  return dict(depth=eval_cfg.depth, answer_ks=tuple(eval_cfg.answer_ks),
              measures=tuple(eval_cfg.measures))


def mean_and_spread(per_seed: Sequence[dict[str, float]]) -> tuple[dict, dict]:
  keys = per_seed[0].keys()
  mean = {k: float(np.mean([m[k] for m in per_seed])) for k in keys}
  std = {k: float(np.std([m[k] for m in per_seed])) for k in keys}
  return mean, std


def evaluate_flat(table: np.ndarray, query_emb: np.ndarray, split: Split, corpus: Corpus,
                  eval_cfg: ml_collections.ConfigDict) -> dict[str, float]:
  return evaluate_index(build_index(table, "Flat"), query_emb, split, corpus,
                        **_eval_kwargs(eval_cfg))


def evaluate_quantized(table: np.ndarray, query_emb: np.ndarray, split: Split, corpus: Corpus,
                       index_cfg: ml_collections.ConfigDict, eval_cfg: ml_collections.ConfigDict,
                       factory: str | None = None) -> dict:
  """Quantized metrics over the seeds: {'mean', 'std', 'per_seed', 'index'}."""
  per_seed, index = [], None
  for seed in eval_cfg.index_seeds:
    index = build_quantized(table, index_cfg, seed, factory)
    per_seed.append(evaluate_index(index, query_emb, split, corpus, **_eval_kwargs(eval_cfg)))
  mean, std = mean_and_spread(per_seed)
  return {"mean": mean, "std": std, "per_seed": per_seed, "index": describe_index(index)}


def evaluate_table(table: np.ndarray, query_emb: np.ndarray, split: Split, corpus: Corpus,
                   index_cfg: ml_collections.ConfigDict, eval_cfg: ml_collections.ConfigDict
                   ) -> dict:
  """{'flat': metrics, 'quantized': mean metrics, 'quantized_std', 'quantized_per_seed',
  'index': description of the quantized index}."""
  quantized = evaluate_quantized(table, query_emb, split, corpus, index_cfg, eval_cfg)
  return {"flat": evaluate_flat(table, query_emb, split, corpus, eval_cfg),
          "quantized": quantized["mean"], "quantized_std": quantized["std"],
          "quantized_per_seed": quantized["per_seed"], "index": quantized["index"]}
