"""The query and passage encoders of a run, and embedding queries and passages with them."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from qdr_jax.models import load_encoder, load_tokenizer
from qdr_jax.targets.embed import embed_texts, make_apply


@dataclasses.dataclass
class Encoders:
  """Query encoder (trained) and passage encoder (only used to build the table)."""
  query_module: Any
  query_params: Any
  passage_module: Any
  passage_params: Any
  tokenizer: Any

  def __post_init__(self):
    self.query_apply = jax.jit(make_apply(self.query_module))
    self.passage_apply = (self.query_apply if self.passage_module is self.query_module
                          else jax.jit(make_apply(self.passage_module)))


def load_encoders(model_cfg: ml_collections.ConfigDict) -> Encoders:
  """Loads both encoders; with no ``passage_encoder`` both start from one checkpoint."""
  kwargs = dict(pooling=model_cfg.pooling or None, normalize=model_cfg.normalize,
                dtype=model_cfg.dtype)
  module, params = load_encoder(model_cfg.query_encoder, **kwargs)
  if model_cfg.passage_encoder:
    p_module, p_params = load_encoder(model_cfg.passage_encoder, **kwargs)
  else:
    p_module, p_params = module, params
  return Encoders(module, params, p_module, p_params, load_tokenizer(model_cfg.query_encoder))


def embed_queries(encoders: Encoders, params: Any, texts: Sequence[str],
                  config: ml_collections.ConfigDict, desc: str = "queries") -> np.ndarray:
  return embed_texts(None, params, encoders.tokenizer, texts, jitted=encoders.query_apply,
                     max_length=config.model.max_query_length,
                     batch_size=config.eval.batch_size, bucket=config.model.length_bucket,
                     desc=desc)


def embed_passages(encoders: Encoders, config: ml_collections.ConfigDict):
  """``(texts, pair_texts) -> table`` with the passage encoder, for the table cache."""

  def encode(texts, pair_texts):
    return embed_texts(None, encoders.passage_params, encoders.tokenizer, texts,
                       pair_texts=pair_texts, jitted=encoders.passage_apply,
                       max_length=config.model.max_passage_length,
                       batch_size=config.model.embed_batch_size,
                       bucket=config.model.length_bucket, desc="corpus")

  return encode
