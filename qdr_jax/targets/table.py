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

import jax
import ml_collections
import numpy as np
from absl import logging

from qdr_jax.checksums import save_table_with_sums, set_aside, verify_table
from qdr_jax.data.types import Corpus, DataFormatError
from qdr_jax.fingerprint import weights_stamp
from qdr_jax.io_utils import write_text_atomic
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


def load_npy_table(path: str | os.PathLike, num_rows: int | None = None) -> np.ndarray:
  """A read-only memory map of an (N, d) ``.npy`` table; never unpickles; checks the shape.

  Nothing is read until rows are used, so callers can place the table shard by shard
  (``sharding.put_rows``) or stream it to FAISS. A table stored in another dtype than
  float32 is converted, which loads it whole.
  """
  try:
    table = np.load(path, allow_pickle=False, mmap_mode="r")
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: not a readable .npy table ({e}).") from e
  if table.dtype not in (np.float16, np.float32, np.float64):
    # An integer (or other) table cast to float32 would train silently on wrong values.
    raise DataFormatError(os.fspath(path), f"table holds {table.dtype} values; expected a "
                          "floating-point embedding table")
  if table.ndim != 2:
    raise ValueError(f"{path}: expected an (N, d) table, got shape {table.shape}.")
  if num_rows is not None and table.shape[0] != num_rows:
    raise ValueError(f"{path}: table has {table.shape[0]} rows but the corpus has "
                     f"{num_rows} passages.")
  if table.dtype != np.float32 or not table.flags.c_contiguous:
    return np.ascontiguousarray(table, dtype=np.float32)
  return table


def table_from_faiss(path: str | os.PathLike, num_rows: int) -> np.ndarray:
  from qdr_jax.index.files import load_index
  from qdr_jax.index.layout import reconstruct_all
  table = reconstruct_all(load_index(str(path)))
  if table.shape[0] != num_rows:
    raise ValueError(f"{path}: index holds {table.shape[0]} vectors but the corpus has "
                     f"{num_rows} passages.")
  return table.astype(np.float32)


def build_or_load_table(config: ml_collections.ConfigDict, corpus: Corpus,
                        cache_dir: pathlib.Path, encode_passages) -> np.ndarray:
  """The initial (N, d) float32 table, from ``config.table.init``.

  With ``init=encode`` and ``npy`` the table is a read-only ``np.memmap`` of the file.
  In a multi-process job every process must call this; with ``encode`` each embeds its
  block of the corpus (see ``embed_corpus``) and all return once the cache is complete.

  Args:
    config: full config (``table`` and ``model`` sections are read).
    corpus: the passages, in row order.
    cache_dir: where encoded tables are cached (shared by all processes).
    encode_passages: a ``PassageEmbedder`` (``encoders.embed_passages``), which streams
      the corpus into the cache chunk by chunk and resumes after an interruption; or any
      ``(texts, pair_texts) -> (N, d)`` callable, called on the whole corpus (one process).
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
  streamed = hasattr(encode_passages, "embed_corpus")
  # In a job of several processes the processes must agree whether the table is cached:
  # another job sharing the cache can complete it between one process's look and
  # another's, and the one that saw no table would then wait in embed_corpus's barrier for
  # peers that never come (a CI hang). embed_corpus decides it for all of them at once,
  # under its lock, and returns at once for a finished table.
  if path.exists() and (jax.process_count() == 1 or not streamed):
    # Checked against the checksums recorded when it was written: rows overwritten on
    # disk would otherwise train and evaluate silently on wrong vectors.
    problem = verify_table(path)
    if problem is None:
      logging.info("Loading cached table %s (checksums verified)", path)
      return load_npy_table(path, len(corpus))
    set_aside(path, problem)
  start = time.perf_counter()
  if streamed:
    stats = encode_passages.embed_corpus(corpus, path)
  else:
    n = len(corpus)
    texts, pairs = passage_inputs(corpus.titles[0:n], corpus.texts[0:n],
                                  config.model.passage_style)
    table = np.asarray(encode_passages(texts, pairs), np.float32)
    if not np.isfinite(table).all():
      raise FloatingPointError(f"{path}: the passage encoder gave NaN or infinite vectors; "
                               "nothing is cached")
    save_table_with_sums(path, table)
    stats = {"dim": table.shape[1], "computed_rows": n, "skipped": 0, "cached": False}
  seconds = time.perf_counter() - start
  if jax.process_index() == 0 and not stats["cached"]:
    # This process's own rate: rows it embedded in this call (a resume skips some).
    rate = stats["computed_rows"] / seconds
    meta = {"rows": len(corpus), "dim": int(stats["dim"]), "seconds": seconds,
            "passages_per_second": rate, "resumed_chunks": stats["skipped"],
            "processes": jax.process_count(),
            "encoder": config.model.passage_encoder or config.model.query_encoder}
    write_text_atomic(path.with_suffix(".json"), json.dumps(meta, indent=1))
    logging.info("Embedded %d passages in %.1fs (%.1f/s on process 0) -> %s",
                 stats["computed_rows"], seconds, rate, path)
  return load_npy_table(path, len(corpus))
