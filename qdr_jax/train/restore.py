"""Loads what evaluation and serving need from a training checkpoint (read-only)."""

from __future__ import annotations

import pathlib

import jax
import ml_collections
import numpy as np

from qdr_jax.data.loader import load_dataset
from qdr_jax.fingerprint import input_fingerprints
from qdr_jax.index.lifecycle import pq_codebook_shape, placeholder_quantizer
from qdr_jax.quant import index_params as select_index_params
from qdr_jax.targets.encoders import load_encoders
from qdr_jax.train.checkpoint import Checkpointer, checkpoint_dir
from qdr_jax.train.resume import config_from_metadata, validate_metadata


def restore_trained(workdir: str | pathlib.Path, *, step: int | None = None,
                    config: ml_collections.ConfigDict | None = None,
                    extra: tuple[str, ...] = ()) -> dict:
  """Loads what serving and evaluation need from a training checkpoint.

  Args:
    workdir: the training workdir (its ``checkpoints/`` are read, never written).
    step: checkpoint step; None = the latest readable one.
    config: when given, used instead of the checkpoint's own config, after checking that
      it describes the same model, dimension and corpus (`validate_metadata`). Either
      way the corpus and the initial encoder weights it loads must have the fingerprints
      the checkpoint recorded: a corpus reordered or edited since training is refused.
    extra: ``("index_params",)`` also restores the learned index parameters
      (``TrainState.index_params``; None when the run learned none). A checkpoint written
      before ``quant.learn`` (learned codebooks as ``codebooks``) gives
      ``{"codebooks": ...}``.

  Returns:
    ``{"config", "metadata", "step", "dataset", "encoders", "params", "table" (unpadded
    float32, host), "index_params", "index" (the FAISS index saved with the state)}``.

  Raises:
    MetadataMismatchError: ``config`` (or the files it names) does not match the
      checkpoint; raised before any array is read.
  """
  ckpt = Checkpointer(checkpoint_dir(workdir), read_only=True)
  meta = ckpt.read_metadata(step)
  config = config if config is not None else config_from_metadata(meta)
  dataset = load_dataset(config.data)
  encoders = load_encoders(config.model)
  validate_metadata(meta, config, len(dataset.corpus),
                    encoders.query_module.config.hidden_size,
                    inputs=input_fingerprints(dataset.corpus, encoders))
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
         "index_params": None}
  if "index_params" in extra and meta.get("index_params"):
    # Learned parameters have the shapes of the run's factory string.
    shapes = select_index_params(placeholder_quantizer(config.index.factory,
                                                       meta["table_dim"]),
                                 meta["index_params"])
    target = {name: jax.ShapeDtypeStruct(v.shape, np.float32, sharding=device)
              for name, v in shapes.items()}
    out["index_params"] = jax.device_get(ckpt.restore_arrays(
        {"index_params": target}, step=restored.step).state["index_params"])
  elif "index_params" in extra and meta.get("has_codebooks"):  # before quant.learn
    shape = pq_codebook_shape(config.index.factory, meta["table_dim"])
    out["index_params"] = {"codebooks": jax.device_get(ckpt.restore_arrays(
        {"codebooks": jax.ShapeDtypeStruct(shape, np.float32, sharding=device)},
        step=restored.step).state["codebooks"])}
  return out
