"""Serving bundles: export a trained checkpoint (encoder + quantized index) and search it.

A bundle is a plain directory that needs neither the training data nor this package's
checkpoints to serve:

  bundle.json        model settings (pooling, normalize, max query length, dtype) and
                     index settings (factory, nprobe, efSearch, size), provenance (the
                     training corpus and initial encoder fingerprints) and fingerprints
                     of the trained encoder weights and of ids.json, index.faiss and
                     passages.jsonl, which `load_bundle` checks before reading them
  query_encoder/     the trained query encoder as a Hugging Face model directory
                     (config.json, model.safetensors, tokenizer files); loads with
                     transformers' AutoModel and with `qdr_jax.models.load_encoder`
  index.faiss        the quantized FAISS index over the trained target table
  ids.json           passage id of every index row (row i has search id i)
  passages.jsonl     optional: {"id", "title", "text"} per passage, to print results
                     (looked up by id, never by line number)

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

from qdr_jax.data.types import DataFormatError
from qdr_jax.fingerprint import FingerprintMismatchError, file_fingerprint, params_fingerprint
from qdr_jax.index.build import RABITQ_QB, build_quantized
from qdr_jax.index.files import load_index, save_index
from qdr_jax.index.layout import describe_index
from qdr_jax.index.searching import search, set_search_params
from qdr_jax.models import LENGTH_BUCKET, load_encoder, load_tokenizer, save_encoder_hf
from qdr_jax.quant import quantizer_from_faiss, with_index_params, write_quantizer_to_faiss
from qdr_jax.targets.embed import embed_texts, make_apply
from qdr_jax.train.checkpoint import checkpoint_dir
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
  discard them (and the parts it did not learn, which they were trained with). A
  checkpoint with learned parameters but no index is refused.

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
    BundleError: learned index parameters without the index they were trained in (a
      multi-process checkpoint of a version that left it out); nothing is written.

  Returns:
    The bundle directory.
  """
  out = pathlib.Path(out)
  if out.exists() or out.is_symlink():
    raise BundleError(f"{out} exists; choose a new bundle directory")
  trained = restore_trained(workdir, step=step, config=config, extra=("index_params",))
  config, corpus = trained["config"], trained["dataset"].corpus
  table = trained["table"]
  learned = trained["index_params"]
  if learned is not None and trained["index"] is None:
    raise BundleError(
        f"{checkpoint_dir(workdir) / str(trained['step'])}: holds learned index "
        f"parameters {sorted(learned)} but no FAISS index (saved by a version that left it "
        "out of multi-process checkpoints); a fresh k-means build would serve them against "
        "centroids they were not trained with: export a single-process checkpoint or retrain")
  if learned is not None:
    quantizer = with_index_params(quantizer_from_faiss(trained["index"]),
                                  {k: jax.numpy.asarray(v) for k, v in learned.items()})
    index = write_quantizer_to_faiss(trained["index"], quantizer, table)
    set_search_params(index, nprobe=config.index.nprobe,
                      ef_search=config.index.ef_search or None,
                      rabitq_qb=RABITQ_QB, strict=False)
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
                  "length_bucket": LENGTH_BUCKET,
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
                         INDEX_FILE: file_fingerprint(tmp / INDEX_FILE),
                         **({PASSAGES_FILE: file_fingerprint(tmp / PASSAGES_FILE)}
                            if store_passages else {})},
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
  passages: dict[str, dict] | None  # passage id -> {"id", "title", "text"}

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
          passage = self.passages[hit["id"]]
          hit.update(title=passage.get("title", ""), text=passage.get("text", ""))
        hits.append(hit)
      results.append(hits)
    return results


class BundleError(ValueError):
  """A bundle directory that cannot be served or written: missing, malformed or damaged
  files, or an export target that exists."""


def _check_files(directory: pathlib.Path, manifest: dict, names: Sequence[str]) -> None:
  """Refuses a bundle whose files are not the ones it was exported with, before any of
  them is parsed (a truncated index.faiss must not reach FAISS's reader). Bundles
  written before a file's fingerprint was recorded are not checked for it."""
  recorded = manifest.get("fingerprints") or {}
  problems = []
  for name in names:
    path = directory / name
    if name not in recorded:
      continue
    if not path.is_file():
      problems.append(f"{path}: missing")
    elif (now := file_fingerprint(path)) != recorded[name]:
      problems.append(f"{path}: {directory / MANIFEST} records fingerprint "
                      f"{recorded[name]}, the file now has {now}")
  if problems:
    raise FingerprintMismatchError("bundle files changed since export (" + "; ".join(problems)
                                   + ")")


def _read_manifest(directory: pathlib.Path) -> dict:
  path = directory / MANIFEST
  if not path.is_file():
    raise BundleError(f"{path}: missing; {directory} is not a bundle directory "
                      "(experiments/export.py writes one)")
  try:
    manifest = json.loads(path.read_text(encoding="utf-8"))
  except ValueError as e:
    raise DataFormatError(str(path), f"not a bundle manifest ({e})") from None
  if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
    raise DataFormatError(str(path), "unknown bundle format "
                          f"{manifest.get('format') if isinstance(manifest, dict) else None!r}")
  files = manifest.get("files")
  if (not all(isinstance(manifest.get(k), dict) for k in ("files", "model", "index"))
      or not all(isinstance(files.get(k), str) for k in ("encoder", "index", "ids"))):
    raise DataFormatError(str(path), "not a bundle manifest (its files, model or index "
                          "section is missing)")
  return manifest


def _read_passages(path: pathlib.Path, ids: Sequence[str]) -> dict[str, dict]:
  """passages.jsonl as id -> passage; refuses lines that are not passages and a file
  that lacks an id of the index."""
  passages = {}
  with open(path, encoding="utf-8", errors="strict") as f:
    for number, line in enumerate(f, 1):
      try:
        passage = json.loads(line)
        passages[str(passage["id"])] = passage
      except (ValueError, KeyError, TypeError) as e:
        raise DataFormatError(str(path), f"not a passage line ({type(e).__name__}: {e})",
                              number) from None
  missing = [i for i in ids if i not in passages]
  if missing:
    raise DataFormatError(str(path), f"lacks {len(missing)} of the index's {len(ids)} "
                          f"passage ids (first {missing[0]!r})")
  return passages


def load_bundle(directory: str | os.PathLike) -> Bundle:
  """Loads a bundle written by `export_bundle` with the Flax encoder.

  Every file's fingerprint is checked before the file is parsed.

  Raises:
    FingerprintMismatchError: ids.json, index.faiss, passages.jsonl or the encoder
      weights differ from the fingerprints in bundle.json.
    BundleError, DataFormatError: a missing or malformed bundle file.
  """
  directory = pathlib.Path(directory)
  manifest = _read_manifest(directory)
  files, model = manifest["files"], manifest["model"]
  _check_files(directory, manifest,
               [files["ids"], files["index"]] + ([files["passages"]]
                                                 if files.get("passages") else []))
  encoder_dir = str(directory / files["encoder"])
  module, params = load_encoder(encoder_dir, pooling=model["pooling"],
                                normalize=model["normalize"], dtype=model["dtype"])
  recorded = (manifest.get("fingerprints") or {}).get("encoder")
  if recorded is not None and (now := params_fingerprint(params)) != recorded:
    raise FingerprintMismatchError(
        f"bundle files changed since export ({encoder_dir}: {directory / MANIFEST} records "
        f"fingerprint {recorded}, the file now has {now})")
  try:
    index = load_index(directory / files["index"])
  except ValueError as e:
    raise BundleError(str(e)) from None
  idx = manifest["index"]
  set_search_params(index, nprobe=idx["nprobe"] or None, ef_search=idx["ef_search"] or None,
                    strict=False)
  ids_path = directory / files["ids"]
  try:
    ids = json.loads(ids_path.read_text(encoding="utf-8"))
  except ValueError as e:
    raise DataFormatError(str(ids_path), f"not a JSON list of ids ({e})") from None
  if not isinstance(ids, list) or len(ids) != index.ntotal:
    raise DataFormatError(str(ids_path), f"{len(ids) if isinstance(ids, list) else 'no'} "
                          f"ids for an index of {index.ntotal} vectors")
  passages = None
  if files.get("passages"):
    passages = _read_passages(directory / files["passages"], ids)
  return Bundle(directory, manifest, module, params, load_tokenizer(encoder_dir), index,
                ids, passages)
