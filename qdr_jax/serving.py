"""Serving bundles: export a trained checkpoint (encoder + quantized index) and search it.

A bundle is a plain directory that needs neither the training data nor this package's
checkpoints to serve:

  bundle.json        model settings (pooling, normalize, max query length, dtype) and
                     index settings (factory, nprobe, efSearch, size), provenance (the
                     training corpus and initial encoder fingerprints) and fingerprints
                     of the trained encoder weights and of ids.json and index.faiss,
                     which `load_bundle` checks
  query_encoder/     the trained query encoder as a Hugging Face model directory
                     (config.json, model.safetensors, tokenizer files); loads with
                     transformers' AutoModel and with `qdr_jax.models.load_encoder`
  index.faiss        the quantized FAISS index over the trained target table
  ids.json           passage id of every index row (row i has search id i)
  passages.jsonl     optional: {"id", "title", "text"} per row, to print results

Nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Sequence

import faiss
import jax
import numpy as np

from qdr_jax.fingerprint import FingerprintMismatchError, file_fingerprint, params_fingerprint
from qdr_jax.index.faiss_index import (build_quantized, describe_index, load_index, save_index,
                                       search, set_search_params)
from qdr_jax.models import load_encoder, load_tokenizer, save_encoder_hf
from qdr_jax.quant import quantizer_from_faiss, with_index_params, write_quantizer_to_faiss
from qdr_jax.targets.embed import embed_texts, make_apply
from qdr_jax.train.restore import restore_trained

BUNDLE_FORMAT = 1
ENCODER_DIR = "query_encoder"
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.json"
PASSAGES_FILE = "passages.jsonl"
MANIFEST = "bundle.json"


def export_bundle(workdir: str | os.PathLike, out: str | os.PathLike, *,
                  step: int | None = None, store_passages: bool = False,
                  config=None) -> pathlib.Path:
  """Writes a serving bundle from a training checkpoint.

  The index is built over the trained table with the run's factory string and
  ``config.index.seed``; when the run learned index parameters (``quant.learn``:
  codebooks, centroids, rotation), they are written into the index saved with the
  checkpoint instead and the table re-encoded, since retraining FAISS's quantizer would
  discard them.

  Args:
    workdir: training workdir with checkpoints.
    out: bundle directory; written to a temporary sibling and renamed, so it appears
      complete or not at all. Must not exist.
    step: checkpoint step (None = latest readable).
    store_passages: also write ``passages.jsonl`` (titles and texts) for display.
    config: optional config checked against the checkpoint (see `restore_trained`).

  Raises:
    MetadataMismatchError: the corpus (e.g. reordered: the ids would map rows to the wrong
      passages) or encoder differs from the checkpoint's; nothing is written.

  Returns:
    The bundle directory.
  """
  out = pathlib.Path(out)
  if out.exists():
    raise FileExistsError(f"{out} exists; choose a new bundle directory")
  trained = restore_trained(workdir, step=step, config=config, extra=("index_params",))
  config, corpus = trained["config"], trained["dataset"].corpus
  table = trained["table"]
  learned = trained["index_params"]
  if learned is not None and trained["index"] is not None:
    quantizer = with_index_params(quantizer_from_faiss(trained["index"]),
                                  {k: jax.numpy.asarray(v) for k, v in learned.items()})
    index = write_quantizer_to_faiss(trained["index"], quantizer, table)
    set_search_params(index, nprobe=config.index.nprobe,
                      ef_search=config.index.ef_search or None,
                      rabitq_qb=config.index.get("rabitq_qb", 0), strict=False)
  else:
    index = build_quantized(table, config.index, config.index.seed)
  module = trained["encoders"].query_module
  enc = module.config

  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
  try:
    save_encoder_hf(str(tmp / ENCODER_DIR), module, trained["params"],
                    tokenizer_dir=config.model.query_encoder)
    save_index(index, tmp / INDEX_FILE)
    with open(tmp / IDS_FILE, "w", encoding="utf-8") as f:  # Streamed: ids can be 21M.
      f.write("[")
      for i, chunk in enumerate(corpus.ids.chunks()):
        f.write((", " if i else "") + ", ".join(json.dumps(d) for d in chunk))
      f.write("]")
    if store_passages:
      with open(tmp / PASSAGES_FILE, "w", encoding="utf-8") as f:
        for pid, title, text in zip(corpus.ids, corpus.titles, corpus.texts):
          f.write(json.dumps({"id": pid, "title": title, "text": text}) + "\n")
    manifest = {
        "format": BUNDLE_FORMAT,
        "model": {"pooling": enc.pooling, "normalize": bool(enc.normalize),
                  "max_query_length": int(config.model.max_query_length),
                  "length_bucket": int(config.model.length_bucket),
                  "dtype": config.model.dtype, "dim": int(enc.hidden_size)},
        "index": {"factory": config.index.factory, "nprobe": int(config.index.nprobe),
                  "ef_search": int(config.index.ef_search or 0),
                  "learned_codebooks": learned is not None and "codebooks" in learned,
                  "learned_index_params": sorted(learned or ()),
                  **{k: v for k, v in describe_index(index).items()
                     if k in ("ntotal", "d", "bytes_per_vector", "compression_ratio")}},
        "source": {"workdir": str(pathlib.Path(workdir).absolute()), "step": trained["step"],
                   "dataset": config.data.name, "model": config.model.query_encoder,
                   "mode": config.train.mode, "corpus_size": len(corpus),
                   "input_fingerprints": trained["metadata"].get("input_fingerprints", {})},
        "fingerprints": {"encoder": params_fingerprint(trained["params"]),
                         IDS_FILE: file_fingerprint(tmp / IDS_FILE),
                         INDEX_FILE: file_fingerprint(tmp / INDEX_FILE)},
        "files": {"encoder": ENCODER_DIR, "index": INDEX_FILE, "ids": IDS_FILE,
                  "passages": PASSAGES_FILE if store_passages else None},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only
    tmp.rename(out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


@dataclasses.dataclass
class Bundle:
  """A loaded serving bundle."""
  directory: pathlib.Path
  manifest: dict
  module: Any
  params: Any
  tokenizer: Any
  index: faiss.Index
  ids: list[str]
  passages: list[dict] | None

  def __post_init__(self):
    self._apply = jax.jit(make_apply(self.module))

  def embed(self, queries: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """Query vectors, encoded as in training (same length cap and padding buckets)."""
    model = self.manifest["model"]
    return embed_texts(None, self.params, self.tokenizer, list(queries),
                       jitted=self._apply, max_length=model["max_query_length"],
                       batch_size=batch_size, bucket=model["length_bucket"], progress=False)

  def search(self, queries: Sequence[str], k: int = 10) -> list[list[dict]]:
    """Top-``k`` hits per query: ``{"rank", "id", "score"}`` (+ title/text if stored)."""
    scores, rows = search(self.index, self.embed(queries), k)
    results = []
    for q_scores, q_rows in zip(scores, rows):
      hits = []
      for rank, (score, row) in enumerate(zip(q_scores, q_rows), start=1):
        if row < 0:  # FAISS pads short result lists with -1
          continue
        hit = {"rank": rank, "id": self.ids[row], "score": float(score)}
        if self.passages is not None:
          hit.update(title=self.passages[row].get("title", ""),
                     text=self.passages[row].get("text", ""))
        hits.append(hit)
      results.append(hits)
    return results


def _check_bundle(directory: pathlib.Path, manifest: dict, params: Any) -> None:
  """Refuses a bundle whose files are not the ones it was exported with (bundles written
  before fingerprints were recorded are not checked)."""
  recorded = manifest.get("fingerprints") or {}
  files = manifest["files"]
  checks = [(IDS_FILE, directory / files["ids"], file_fingerprint),
            (INDEX_FILE, directory / files["index"], file_fingerprint),
            ("encoder", directory / files["encoder"], lambda _: params_fingerprint(params))]
  problems = []
  for name, path, compute in checks:
    if name in recorded and (now := compute(path)) != recorded[name]:
      problems.append(f"{path}: {directory / MANIFEST} records fingerprint "
                      f"{recorded[name]}, the file now has {now}")
  if problems:
    raise FingerprintMismatchError("bundle files changed since export (" + "; ".join(problems)
                                   + ")")


def load_bundle(directory: str | os.PathLike) -> Bundle:
  """Loads a bundle written by `export_bundle` with the Flax encoder.

  Raises:
    FingerprintMismatchError: ids.json, index.faiss or the encoder weights differ from
      the fingerprints in bundle.json.
  """
  directory = pathlib.Path(directory)
  manifest = json.loads((directory / MANIFEST).read_text())
  if manifest.get("format") != BUNDLE_FORMAT:
    raise ValueError(f"{directory / MANIFEST}: unknown bundle format {manifest.get('format')}")
  files, model = manifest["files"], manifest["model"]
  encoder_dir = str(directory / files["encoder"])
  module, params = load_encoder(encoder_dir, pooling=model["pooling"],
                                normalize=model["normalize"], dtype=model["dtype"])
  index = load_index(directory / files["index"])
  idx = manifest["index"]
  set_search_params(index, nprobe=idx["nprobe"] or None, ef_search=idx["ef_search"] or None,
                    strict=False)
  ids = json.loads((directory / files["ids"]).read_text())
  _check_bundle(directory, manifest, params)
  if len(ids) != index.ntotal:
    raise ValueError(f"{directory}: {len(ids)} ids for an index of {index.ntotal} vectors")
  passages = None
  if files.get("passages"):
    with open(directory / files["passages"], encoding="utf-8") as f:
      passages = [json.loads(line) for line in f]
  return Bundle(directory, manifest, module, params, load_tokenizer(encoder_dir), index,
                ids, passages)
