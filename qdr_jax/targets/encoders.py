"""The query and passage encoders of a run, and embedding queries and passages with them."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

from qdr_jax.models import LENGTH_BUCKET, load_encoder, load_tokenizer
from qdr_jax.targets.embed import (
  Batching,
  embed_corpus,
  embed_texts,
  make_apply,
  make_corpus_apply,
  resumable_chunk_rows,
)

# An embedding window's last batch is padded to a multiple of this many rows (fewer
# compiled shapes than padding to the exact count, less waste than a full batch).
EMBED_ROW_BUCKET = 8


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
    # The corpus forward (long passages, inference only) runs staged on CPU, its
    # attention core compiled with its own XLA options (qdr_jax.models.staged).
    self.passage_apply = make_corpus_apply(self.passage_module)


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
                     batch_size=config.model.embed_batch_size,
                     bucket=LENGTH_BUCKET, row_bucket=EMBED_ROW_BUCKET, desc=desc)


@dataclasses.dataclass(frozen=True)
class PassageEmbedder:
  """The passage encoder and its tokenization: what ``build_or_load_table`` embeds with.

  ``embed_corpus`` streams a whole corpus into a resumable ``.npy``; calling the object
  embeds ``(texts, pair_texts)`` into memory (the older interface).
  """
  encoders: Encoders
  config: ml_collections.ConfigDict

  @property
  def batching(self) -> Batching:
    model = self.config.model
    return Batching(max_length=model.max_passage_length, batch_size=model.embed_batch_size,
                    bucket=LENGTH_BUCKET, row_bucket=EMBED_ROW_BUCKET)

  def __call__(self, texts: Sequence[str], pair_texts: Sequence[str] | None = None
               ) -> np.ndarray:
    b = self.batching
    return embed_texts(None, self.encoders.passage_params, self.encoders.tokenizer, texts,
                       pair_texts=pair_texts, jitted=self.encoders.passage_apply,
                       max_length=b.max_length, batch_size=b.batch_size, bucket=b.bucket,
                       row_bucket=b.row_bucket, desc="corpus")

  def embed_corpus(self, corpus, path: str | os.PathLike, *, progress: bool = True,
                   on_chunk: Callable[[int], None] | None = None) -> dict:
    """``qdr_jax.targets.embed.embed_corpus`` with this encoder and the config's batching."""
    return embed_corpus(self.encoders.passage_apply, self.encoders.passage_params,
                        self.encoders.tokenizer, corpus, path, batching=self.batching,
                        passage_style=self.config.model.passage_style,
                        chunk_rows=resumable_chunk_rows(
                            len(corpus), self.config.table.embed_chunk_rows,
                            self.batching.batch_size),
                        progress=progress,
                        on_chunk=on_chunk)


def embed_passages(encoders: Encoders, config: ml_collections.ConfigDict) -> PassageEmbedder:
  """The passage embedder of ``build_or_load_table`` (also ``(texts, pair_texts) -> table``)."""
  return PassageEmbedder(encoders, config)
