"""Flat vs quantized evaluation of a retriever: a config's as is, or a training checkpoint's."""

from __future__ import annotations

import json
import pathlib

import jax
import ml_collections
import numpy as np

from qdr_jax.data.loader import load_dataset
from qdr_jax.eval.report import format_table
from qdr_jax.eval.table_eval import evaluate_table
from qdr_jax.quant import quantizer_from_faiss
from qdr_jax.targets.encoders import embed_passages, embed_queries, load_encoders
from qdr_jax.targets.table import build_or_load_table
from qdr_jax.train.checkpoint import (Checkpointer, checkpoint_dir, config_from_metadata,
                                      validate_metadata)


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


def restore_trained(workdir: str | pathlib.Path, *, step: int | None = None,
                    config: ml_collections.ConfigDict | None = None,
                    extra: tuple[str, ...] = ()) -> dict:
  """Loads what serving and evaluation need from a training checkpoint.

  Args:
    workdir: the training workdir (its ``checkpoints/`` are read, never written).
    step: checkpoint step; None = the latest readable one.
    config: when given, used instead of the checkpoint's own config, after checking that
      it describes the same model, dimension and corpus (`validate_metadata`).
    extra: ``("codebooks",)`` also restores learned PQ codebooks (None when the mode
      learns none).

  Returns:
    ``{"config", "metadata", "step", "dataset", "encoders", "params", "table" (unpadded
    float32, host), "codebooks", "index" (the FAISS index saved with the state)}``.

  Raises:
    MetadataMismatchError: ``config`` does not match the checkpoint.
  """
  ckpt = Checkpointer(checkpoint_dir(workdir), read_only=True)
  meta = ckpt.read_metadata(step)
  config = config if config is not None else config_from_metadata(meta)
  dataset = load_dataset(config.data)
  encoders = load_encoders(config.model)
  validate_metadata(meta, config, len(dataset.corpus),
                    encoders.query_module.config.hidden_size)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  targets = {"params": encoders.query_params,
             "table": jax.ShapeDtypeStruct((meta["table_rows"], meta["table_dim"]),
                                           np.dtype(meta["table_dtype"]), sharding=device)}
  # step=None falls back past a corrupt latest checkpoint (same run, same config).
  restored = ckpt.restore_arrays(targets, step=step, with_index=True)
  out = {"config": config, "metadata": restored.metadata, "step": restored.step,
         "dataset": dataset, "encoders": encoders, "index": restored.index,
         "params": restored.state["params"],
         "table": np.asarray(jax.device_get(restored.state["table"][:meta["corpus_size"]]),
                             np.float32),
         "codebooks": None}
  if "codebooks" in extra and meta.get("has_codebooks") and restored.index is not None:
    # Learned codebooks have the saved index's PQ shape.
    shape = quantizer_from_faiss(restored.index).codebooks.shape
    out["codebooks"] = ckpt.restore_arrays(
        {"codebooks": jax.ShapeDtypeStruct(shape, np.float32, sharding=device)},
        step=restored.step).state["codebooks"]
  return out


def evaluate_checkpoint(workdir: str | pathlib.Path, *, step: int | None = None,
                        config: ml_collections.ConfigDict | None = None,
                        out: str | pathlib.Path | None = None) -> tuple[dict, str]:
  """Evaluates a checkpoint's query encoder and table on flat and quantized indexes.

  The quantized index is rebuilt over the trained table for each of
  ``config.eval.index_seeds``, as the "after" figures of training are. Writes
  ``out`` (default ``{workdir}/eval_step_{step}.json``).

  Args:
    workdir: the training workdir.
    step: checkpoint step; None = the latest readable one.
    config: optional config (e.g. to change the eval split or the index); it must match
      the checkpoint's model, dimension and corpus size. None = the checkpoint's config.
    out: results path.

  Returns:
    (results, printable table).
  """
  trained = restore_trained(workdir, step=step, config=config)
  config, dataset = trained["config"], trained["dataset"]
  split = dataset.split(config.data.eval_split)
  query_emb = embed_queries(trained["encoders"], trained["params"], split.queries.texts,
                            config)
  metrics = evaluate_table(trained["table"], query_emb, split, dataset.corpus, config.index,
                           config.eval)
  results = {"dataset": config.data.name, "model": config.model.query_encoder,
             "split": config.data.eval_split, "step": trained["step"],
             "checkpoint": str(checkpoint_dir(workdir) / str(trained["step"])),
             "index": {"factory": config.index.factory, **metrics["index"]},
             "flat": metrics["flat"], "quantized": metrics["quantized"],
             "quantized_std": metrics["quantized_std"],
             "quantized_per_seed": metrics["quantized_per_seed"]}
  out = pathlib.Path(out) if out else pathlib.Path(workdir) / f"eval_step_{trained['step']}.json"
  out.write_text(json.dumps(results, indent=1))
  text = format_table({"flat": metrics["flat"], config.index.factory: metrics["quantized"]},
                      {config.index.factory: metrics["quantized_std"]})
  return results, text
