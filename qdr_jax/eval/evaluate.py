"""Evaluation of a config's retriever as is (no training): flat vs quantized index."""

from __future__ import annotations

import json
import pathlib

import ml_collections

from qdr_jax.data.loader import load_dataset
from qdr_jax.eval.report import format_table
from qdr_jax.eval.table_eval import evaluate_table
from qdr_jax.targets.encoders import embed_passages, embed_queries, load_encoders
from qdr_jax.targets.table import build_or_load_table


def evaluate_config(config: ml_collections.ConfigDict, workdir: pathlib.Path
                    ) -> tuple[dict, str]:
  """Embeds (or loads the cached table), evaluates both indexes, writes results.json.

  Returns:
    (results, printable table).
  """
  workdir.mkdir(parents=True, exist_ok=True)
  dataset = load_dataset(config.data)
  split = dataset.split(config.data.eval_split)
  encoders = load_encoders(config.model)
  cache_dir = pathlib.Path(config.table.cache_dir or workdir / "cache")
  table = build_or_load_table(config, dataset.corpus, cache_dir,
                              embed_passages(encoders, config))
  query_emb = embed_queries(encoders, encoders.query_params, split.queries.texts, config)
  metrics = evaluate_table(table, query_emb, split, dataset.corpus, config.index, config.eval)
  results = {"dataset": config.data.name, "model": config.model.query_encoder,
             "split": config.data.eval_split,
             "index": {"factory": config.index.factory, **metrics["index"]},
             "flat": metrics["flat"], "quantized": metrics["quantized"],
             "quantized_std": metrics["quantized_std"],
             "quantized_per_seed": metrics["quantized_per_seed"]}
  (workdir / "results.json").write_text(json.dumps(results, indent=1))
  text = format_table({"flat": metrics["flat"], config.index.factory: metrics["quantized"]},
                      {config.index.factory: metrics["quantized_std"]})
  return results, text
