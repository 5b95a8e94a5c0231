"""The target table: the corpus embedded once by the passage encoder, cached on disk.

The table is the starting point of training (its rows become trainable parameters),
so it is computed once per (encoder, corpus, tokenization) and cached as ``.npy`` under
the cache directory; it can also be initialised from an existing ``.npy`` or from a
released FAISS flat index, as the paper does with DPR's and pyserini's indexes.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import time

import ml_collections
import numpy as np
from absl import logging

from qdr_jax.data.types import Corpus
from qdr_jax.fingerprint import weights_stamp
from qdr_jax.io_utils import atomic_path
from qdr_jax.models.tokenization import passage_inputs


def table_cache_key(model_cfg: ml_collections.ConfigDict, corpus: Corpus) -> str:
  """Changes whenever the encoder (name or weight files), its tokenization or the corpus
  rows (ids or text) change."""
  encoder = model_cfg.passage_encoder or model_cfg.query_encoder
  spec = {"encoder": encoder, "weights": weights_stamp(encoder),
          "pooling": model_cfg.pooling, "normalize": model_cfg.normalize,
          "max_passage_length": model_cfg.max_passage_length,
          "passage_style": model_cfg.passage_style, "rows": len(corpus),
          "corpus": corpus.fingerprint()}
  return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def save_npy_atomic(path: pathlib.Path, array: np.ndarray) -> None:
  """Writes ``array`` so that ``path`` is either absent or complete."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with atomic_path(path) as tmp, open(tmp, "wb") as f:
    np.save(f, array, allow_pickle=False)


def load_npy_table(path: str | os.PathLike, num_rows: int | None = None) -> np.ndarray:
  """Loads an (N, d) table; never unpickles; checks the shape against the corpus."""
  try:
    table = np.load(path, allow_pickle=False, mmap_mode=None)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: not a readable .npy table ({e}).") from e
  if table.ndim != 2:
    raise ValueError(f"{path}: expected an (N, d) table, got shape {table.shape}.")
  if num_rows is not None and table.shape[0] != num_rows:
    raise ValueError(f"{path}: table has {table.shape[0]} rows but the corpus has "
                     f"{num_rows} passages.")
  return np.ascontiguousarray(table, dtype=np.float32)


def table_from_faiss(path: str | os.PathLike, num_rows: int) -> np.ndarray:
  from qdr_jax.index.faiss_index import load_index, reconstruct_all
  table = reconstruct_all(load_index(str(path)))
  if table.shape[0] != num_rows:
    raise ValueError(f"{path}: index holds {table.shape[0]} vectors but the corpus has "
                     f"{num_rows} passages.")
  return table.astype(np.float32)


def build_or_load_table(config: ml_collections.ConfigDict, corpus: Corpus,
                        cache_dir: pathlib.Path, encode_passages) -> np.ndarray:
  """The initial (N, d) float32 table, from ``config.table.init``.

  Args:
    config: full config (``table`` and ``model`` sections are read).
    corpus: the passages, in row order.
    cache_dir: where encoded tables are cached.
    encode_passages: ``(texts, pair_texts) -> (N, d)``, called on a cache miss.
  """
  init = config.table.init
  if init == "npy":
    return load_npy_table(config.table.path, len(corpus))
  if init == "faiss":
    return table_from_faiss(config.table.path, len(corpus))
  if init != "encode":
    raise ValueError(f"config.table.init must be encode, npy or faiss; got {init!r}")
  key = table_cache_key(config.model, corpus)
  path = pathlib.Path(cache_dir) / f"table-{key}.npy"
  if path.exists():
    logging.info("Loading cached table %s", path)
    return load_npy_table(path, len(corpus))
  texts, pairs = passage_inputs(corpus.titles, corpus.texts, config.model.passage_style)
  start = time.perf_counter()
  table = encode_passages(texts, pairs)
  seconds = time.perf_counter() - start
  save_npy_atomic(path, table)
  meta = {"rows": len(corpus), "dim": int(table.shape[1]), "seconds": seconds,
          "passages_per_second": len(corpus) / seconds,
          "encoder": config.model.passage_encoder or config.model.query_encoder}
  path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
  logging.info("Embedded %d passages in %.1fs (%.1f/s) -> %s", len(corpus), seconds,
               len(corpus) / seconds, path)
  return table
