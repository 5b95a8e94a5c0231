"""Content fingerprints of a run's inputs (corpus, encoder weights) and their comparison.

A count or a name does not identify an input: a corpus reordered in place keeps its size
and ids, and a model directory keeps its path when its weights are replaced. Checkpoints,
``results.json``, evaluation outputs and export bundles record these digests, and every
consumer compares them with the inputs it is about to use (`mismatches`).
"""

from __future__ import annotations

import glob
import hashlib
import os
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

CORPUS, ENCODER = "corpus", "encoder"


class FingerprintMismatchError(ValueError):
  """A file's content differs from the fingerprint recorded when it was produced."""


def params_fingerprint(params: Any) -> str:
  """Hex digest of every leaf's path, dtype, shape and bytes (in sorted path order).

  Independent of the container's leaf order and of where the leaves live (host or device);
  a few hundred ms for a 110M-parameter encoder.
  """
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  digest = hashlib.blake2b(digest_size=16)
  for name, leaf in sorted((jax.tree_util.keystr(p), leaf) for p, leaf in flat):
    array = np.ascontiguousarray(jax.device_get(leaf))
    digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
    digest.update(array.reshape(-1).view(np.uint8))
  return digest.hexdigest()


def file_fingerprint(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
  """Hex digest of a file's bytes, read in chunks."""
  digest = hashlib.blake2b(digest_size=16)
  with open(path, "rb") as f:
    while block := f.read(chunk):
      digest.update(block)
  return digest.hexdigest()


def weights_stamp(name_or_path: str) -> list[list[Any]]:
  """``[file, size, mtime_ns]`` of each weight file of an encoder: a cheap key (no read)
  that changes when the weights are replaced at the same path, as the corpus store's
  key does for its source."""
  from qdr_jax.models.loading import resolve_model_path  # pylint: disable=g-import-not-at-top
  directory = resolve_model_path(name_or_path)
  files = sorted(glob.glob(os.path.join(directory, "**", "*.safetensors"), recursive=True))
  return [[os.path.relpath(f, directory), os.stat(f).st_size, os.stat(f).st_mtime_ns]
          for f in files]


def encoder_fingerprint(encoders: Any) -> str:
  """The initial weights of a run: the query encoder's, and the passage encoder's when it
  is a separate checkpoint (``encoders`` is a `qdr_jax.targets.encoders.Encoders`)."""
  query = params_fingerprint(encoders.query_params)
  if encoders.passage_params is encoders.query_params:
    return query
  passage = params_fingerprint(encoders.passage_params)
  return hashlib.blake2b(f"{query}|{passage}".encode(), digest_size=16).hexdigest()


def input_fingerprints(corpus: Any, encoders: Any) -> dict[str, str]:
  """``{"corpus", "encoder"}`` digests of what a run reads (ids and texts in row order;
  initial encoder weights)."""
  return {CORPUS: corpus.fingerprint(), ENCODER: encoder_fingerprint(encoders)}


def input_sources(config: ml_collections.ConfigDict) -> dict[str, str]:
  """The file (or directory) behind each input of ``config``, to name in a refusal."""
  from qdr_jax.data.loader import resolve_path  # pylint: disable=g-import-not-at-top
  data, model = config.data, config.model
  if data.format == "dpr":
    corpus = data.corpus if data.corpus.startswith("hf:") else resolve_path(data.corpus)
  else:
    corpus = resolve_path(data.root) if data.root else ""
    if data.format == "beir":
      files = sorted(glob.glob(os.path.join(corpus, "corpus.jsonl*")))
      corpus = files[0] if files else corpus
  encoder = model.query_encoder
  if model.passage_encoder:
    encoder = f"{encoder} + {model.passage_encoder}"
  return {CORPUS: corpus, ENCODER: encoder}


def mismatches(recorded: Mapping[str, str] | None, current: Mapping[str, str],
               sources: Mapping[str, str], *, recorded_by: str) -> list[str]:
  """One line per input whose recorded fingerprint differs from the current one.

  Inputs that ``recorded`` lacks (files written before fingerprints existed) are skipped.
  """
  problems = []
  for name, now in current.items():
    then = (recorded or {}).get(name)
    if then is not None and then != now:
      problems.append(f"{name} {sources.get(name, '?')} changed since {recorded_by} was "
                      f"written: {recorded_by} has fingerprint {then}, the file now has {now}")
  return problems
