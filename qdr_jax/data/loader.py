"""Builds a RetrievalDataset from a data config, dispatching to the format readers."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qdr_jax.data import store
from qdr_jax.data.beir import open_text, read_beir
from qdr_jax.data.dpr import (SquadDpr, dpr_records_to_split, read_dpr_passages,
                              read_dpr_train_json, read_qa_csv, squad_to_dpr)
from qdr_jax.data.hf import read_hf_corpus, read_hf_split
from qdr_jax.data.splits import with_dev_split
from qdr_jax.data.types import Corpus, DataFormatError, RetrievalDataset, Split

DEMO_DATA_DIR = Path(__file__).resolve().parent.parent / "demo_data"
_DEMO_PREFIX = "demo:"
_HUB_PREFIX = "hf:"
_FORMATS = ("beir", "dpr", "squad")
# Seed of the SQuAD article split (format=squad): one fixed split, so that runs compare.
SQUAD_SPLIT_SEED = 0
# The dev carve's order (`qdr_jax.data.splits.carve_dev_split`): fixed, so that every
# training seed and mode of a comparison selects on the same queries.
DEV_SPLIT_SEED = 0


def resolve_path(path: str | os.PathLike) -> str:
  """Resolves `demo:NAME` inside the bundled demo data; other paths against the cwd."""
  path = os.fspath(path)
  if path.startswith(_DEMO_PREFIX):
    return str(DEMO_DATA_DIR / path[len(_DEMO_PREFIX):])
  return os.path.abspath(os.path.expanduser(path))


def _get(cfg: Any, key: str, default: Any = None, required: bool = False) -> Any:
  value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
  if required and value in (None, ""):
    raise ValueError(f"Data config key {key!r} is required (config: {sorted(_keys(cfg))}).")
  return value


def _keys(cfg: Any) -> list[str]:
  return list(cfg.keys()) if hasattr(cfg, "keys") else []


def _read_dpr_split(spec: str, corpus: Corpus, split_name: str,
                    allow_missing_positives: bool) -> Split:
  """Reads one DPR-format split; the kind of file follows from the path's form."""
  if spec.startswith(_HUB_PREFIX):
    name, _, hub_split = spec[len(_HUB_PREFIX):].partition(":")
    return read_hf_split(name, corpus, split_name, hub_split=hub_split or None,
                         allow_missing_positives=allow_missing_positives)
  path = resolve_path(spec)
  lower = path.lower()
  if os.path.isdir(path):
    return read_hf_split(path, corpus, split_name,
                         allow_missing_positives=allow_missing_positives)
  if lower.endswith((".json", ".json.gz")):
    return read_dpr_train_json(path, corpus, split_name,
                               allow_missing_positives=allow_missing_positives)
  if lower.endswith((".csv", ".tsv", ".csv.gz", ".tsv.gz")):
    return read_qa_csv(path, split_name)
  raise ValueError(
      f"Data config splits.{split_name}: cannot tell the kind of {spec!r}; expected a "
      "*.json[.gz] DPR file, a *.csv/*.tsv QA file, a save_to_disk directory or hf:NAME[:SPLIT].")


def truncate_corpus(dataset: RetrievalDataset, max_passages: int) -> RetrievalDataset:
  """Keeps at most `max_passages` passages, but always every positive of every split.

  Positives are kept first; the remaining budget is filled with the other passages
  in corpus order, and the kept passages stay in corpus order. Qrels pointing to
  dropped passages (only non-positive judgments can) are removed.
  """
  corpus = dataset.corpus
  if max_passages <= 0 or len(corpus) <= max_passages:
    return dataset
  keep = np.zeros(len(corpus), dtype=bool)
  keep[corpus.rows([d for split in dataset.splits.values()
                    for judged in split.qrels.values() for d, rel in judged.items() if rel > 0])
       ] = True
  budget = max_passages - int(keep.sum())
  if budget > 0:
    others = np.flatnonzero(~keep)[:budget]
    keep[others] = True
  rows = np.flatnonzero(keep)
  new_corpus = corpus.select(rows)  # In memory: at most max_passages passages.
  kept_ids = new_corpus.row_of
  splits = {}
  for name, split in dataset.splits.items():
    qrels = {}
    for query_id, judged in split.qrels.items():
      kept = {d: rel for d, rel in judged.items() if d in kept_ids}
      if kept:
        qrels[query_id] = kept
    splits[name] = Split(queries=split.queries, qrels=qrels, answers=split.answers)
  return RetrievalDataset(name=dataset.name, corpus=new_corpus, splits=splits)


def read_squad_file(path: str, test_fraction: float, seed: int) -> SquadDpr:
  """A SQuAD v1.1 JSON file (``.gz`` too) as passages and DPR records (`squad_to_dpr`);
  a file that is not one is refused naming it."""
  try:
    with open_text(path) as f:
      squad = json.load(f)
  except json.JSONDecodeError as e:
    raise DataFormatError(path, f"not valid JSON ({e.msg})", e.lineno) from e
  except (UnicodeDecodeError, EOFError, gzip.BadGzipFile) as e:
    raise DataFormatError(path, f"not a readable JSON text file ({e})") from None
  if not isinstance(squad, dict) or not isinstance(squad.get("data"), list):
    raise DataFormatError(path, "expected a SQuAD object with a 'data' list of articles")
  try:
    return squad_to_dpr(squad, test_fraction, seed)
  except (KeyError, TypeError, AttributeError, IndexError) as e:
    raise DataFormatError(path, "not a SQuAD v1.1 file: an article, paragraph or question "
                          f"lacks a field or has the wrong type ({type(e).__name__}: {e})"
                          ) from None


def read_squad(path: str, name: str, test_fraction: float, seed: int,
               cache_dir: str | os.PathLike | None = None) -> RetrievalDataset:
  """SQuAD v1.1 JSON converted exactly as ``experiments/convert_squad.py`` writes it:
  paragraphs as passages, train/test split by article, answers kept for matching.

  The passages (every paragraph, whatever the split) go into the corpus store like any
  other corpus, so later loads map them; the questions are read from the JSON each time.
  """
  converted = read_squad_file(path, test_fraction, seed)
  corpus = store.store_corpus(converted.corpus, path, "squad", cache_dir=cache_dir)
  splits = {split: dpr_records_to_split(((None, i, r) for i, r in enumerate(records)),
                                        corpus, path, split)[0]
            for split, records in (("train", converted.train_records),
                                   ("test", converted.test_records))}
  return RetrievalDataset(name=name, corpus=corpus, splits=splits)


def read_corpus(spec: str, cache_dir: str | os.PathLike | None = None) -> Corpus:
  """Reads the `corpus` of a dpr config: a passages TSV, a save_to_disk directory or
  `hf:NAME[:SPLIT]` (split default 'train')."""
  if spec.startswith(_HUB_PREFIX):
    hub_name, _, split = spec[len(_HUB_PREFIX):].partition(":")
    return read_hf_corpus(hub_name, split or "train", cache_dir)
  path = resolve_path(spec)
  if os.path.isdir(path):
    return read_hf_corpus(path, cache_dir=cache_dir)
  return read_dpr_passages(path, cache_dir)


def load_dataset(cfg: Any) -> RetrievalDataset:
  """Loads the data set a config describes.

  Config keys:
    name: the data set's name.
    format: 'beir', 'dpr' or 'squad'.
    root: (beir) the BEIR directory, e.g. 'demo:scifact'; (squad) the SQuAD v1.1 JSON
      (.gz), e.g. 'demo:squad/dev-v1.1.json.gz'.
    test_fraction: (squad) share of articles in the test split (`SQUAD_SPLIT_SEED`).
    dev_split, dev_queries: (optional) the selection split; when the data set has no split
      of that name, ``dev_queries`` queries of ``train_split`` are carved into it with no
      positive shared with the remaining training queries (`qdr_jax.data.splits`).
    splits: (beir, optional) split names to read, default all; (dpr) a mapping from
      split name to a path: `*.json[.gz]` DPR JSON, `*.csv`/`*.tsv` QA file, a
      `save_to_disk` directory, or `hf:NAME[:SPLIT]` for the hub.
    corpus: (dpr) the passages: a TSV, a `save_to_disk` directory or `hf:NAME[:SPLIT]`.
    cache_dir: (optional) root of the corpus store, "" = `~/.cache/qdr_jax/corpora`
      (see `qdr_jax.data.store`); corpora are converted there once and memory-mapped.
    max_passages: (optional) cap on the corpus size, 0 = all; positives are kept.
    allow_missing_positives: (optional, dpr) skip positives absent from the corpus.

  Paths starting with `demo:` resolve inside `qdr_jax/demo_data/`; other relative
  paths resolve against the current directory.

  Raises:
    ValueError: a missing or unknown config value (naming the key).
    DataFormatError: malformed data files.
  """
  name = _get(cfg, "name", required=True)
  fmt = _get(cfg, "format", required=True)
  cache_dir = _get(cfg, "cache_dir", "") or None
  splits_cfg = _get(cfg, "splits")
  if fmt == "beir":
    if hasattr(splits_cfg, "keys") and not list(splits_cfg.keys()):
      splits_cfg = None  # an empty mapping (the base config's default) means all splits
    if isinstance(splits_cfg, str):
      splits_cfg = [splits_cfg]
    elif splits_cfg is not None and not isinstance(splits_cfg, Sequence):
      raise ValueError("Data config key 'splits' must be a list of split names for format "
                       f"'beir', got {type(splits_cfg).__name__}.")
    dataset = read_beir(resolve_path(_get(cfg, "root", required=True)),
                        splits=list(splits_cfg) if splits_cfg else None, name=name,
                        cache_dir=cache_dir)
  elif fmt == "dpr":
    corpus = read_corpus(str(_get(cfg, "corpus", required=True)), cache_dir)
    if not splits_cfg or not (isinstance(splits_cfg, Mapping) or hasattr(splits_cfg, "items")):
      raise ValueError("Data config key 'splits' must map split names to paths for format "
                       "'dpr'.")
    allow_missing = bool(_get(cfg, "allow_missing_positives", False))
    splits = {split: _read_dpr_split(str(spec), corpus, split, allow_missing)
              for split, spec in splits_cfg.items()}
    dataset = RetrievalDataset(name=name, corpus=corpus, splits=splits)
  elif fmt == "squad":
    dataset = read_squad(resolve_path(_get(cfg, "root", required=True)), name,
                         float(_get(cfg, "test_fraction", 0.25)), SQUAD_SPLIT_SEED,
                         cache_dir)
  else:
    raise ValueError(f"Data config key 'format' is {fmt!r}; expected one of {list(_FORMATS)}.")
  num_dev = int(_get(cfg, "dev_queries", 0) or 0)
  try:
    splits = with_dev_split(dataset.splits, train_split=str(_get(cfg, "train_split", "train")),
                            dev_split=str(_get(cfg, "dev_split", "") or ""),
                            num_queries=num_dev, seed=DEV_SPLIT_SEED)
  except ValueError as e:
    raise ValueError(f"Data config key 'dev_queries' is {num_dev}: {e}.") from None
  dataset = RetrievalDataset(name=dataset.name, corpus=dataset.corpus, splits=splits)
  return truncate_corpus(dataset, int(_get(cfg, "max_passages", 0) or 0))
