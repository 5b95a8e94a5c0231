"""Reads a data set in the BEIR layout (corpus.jsonl, queries.jsonl, qrels/*.tsv)."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

from qdr_jax.data import store
from qdr_jax.data.types import Corpus, DataFormatError, Queries, RetrievalDataset, Split

# BEIR writes the first header; some re-exports use the second.
_QRELS_HEADERS = (("query-id", "corpus-id", "score"), ("query_id", "corpus_id", "score"))


def open_text(path: str | os.PathLike) -> io.TextIOBase:
  """Opens a UTF-8 text file for streaming, transparently decompressing `*.gz`."""
  path = os.fspath(path)
  if path.endswith(".gz"):
    return gzip.open(path, "rt", encoding="utf-8", newline="")
  return open(path, "rt", encoding="utf-8", newline="")


def text_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
  """Yields (1-based line number, line with its ending) of a UTF-8 text file, `*.gz` too.

  Each line is decoded on its own (a text-mode file decodes 8 KiB blocks), so bytes that
  are not UTF-8 raise a DataFormatError naming their line.
  """
  path = os.fspath(path)
  with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
    for line_no, raw in enumerate(f, start=1):
      try:
        yield line_no, raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise DataFormatError(path, f"not UTF-8 text: byte {raw[e.start:e.start + 1]!r} at "
                              f"column {e.start + 1}", line_no) from None


def find_file(directory: str | os.PathLike, name: str) -> str:
  """Returns `directory/name` or `directory/name.gz`, whichever exists."""
  for candidate in (name, name + ".gz"):
    path = os.path.join(directory, candidate)
    if os.path.isfile(path):
      return path
  raise DataFormatError(os.fspath(directory), f"neither {name} nor {name}.gz exists")


def _iter_jsonl(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
  """Yields (1-based line, object) per non-blank line; never holds the whole file."""
  with contextlib.closing(text_lines(path)) as lines:
    for line_no, line in lines:
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataFormatError(path, f"bad JSON: {e.msg} (column {e.colno})", line_no) from None
      if not isinstance(obj, dict):
        raise DataFormatError(path, f"expected a JSON object, got {type(obj).__name__}", line_no)
      if _SURROGATE_ESCAPE.search(line):
        _check_characters(obj, path, line_no)
      yield line_no, obj


# A \uD800-\uDFFF escape: half of a pair, or a lone surrogate JSON lets through but no
# UTF-8 consumer (tokenizer, corpus store) accepts.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _check_characters(obj: dict[str, Any], path: str, line: int) -> None:
  try:
    json.dumps(obj, ensure_ascii=False).encode("utf-8")
  except UnicodeEncodeError as e:
    raise DataFormatError(path, "a \\u escape of a lone surrogate "
                          f"({e.object[e.start:e.end].encode('unicode_escape').decode()}) is "
                          "not a character", line) from None


def _id_field(obj: dict[str, Any], path: str, line: int) -> str:
  if "_id" not in obj:
    raise DataFormatError(path, "missing required field '_id'", line)
  doc_id = obj["_id"]
  # Some BEIR exports write numeric ids; ids are compared as strings everywhere else.
  if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
    raise DataFormatError(path, f"field '_id' must be a string, got {doc_id!r}", line)
  return str(doc_id)


def _str_field(obj: dict[str, Any], key: str, path: str, line: int,
               required: bool = True) -> str:
  if key not in obj or obj[key] is None:
    if required:
      raise DataFormatError(path, f"missing required field {key!r}", line)
    return ""
  value = obj[key]
  if not isinstance(value, str):
    raise DataFormatError(path, f"field {key!r} must be a string, got {type(value).__name__}",
                          line)
  return value


def read_beir_corpus(path: str | os.PathLike,
                     cache_dir: str | os.PathLike | None = None) -> Corpus:
  """Reads a BEIR `corpus.jsonl[.gz]`: one `{"_id", "title", "text"}` object per line.

  `title` may be missing or null (read as ""); `_id` and `text` are required. The file
  is converted once into the corpus store under `cache_dir` (see `qdr_jax.data.store`)
  and memory-mapped from there.
  """
  path = os.fspath(path)

  def rows() -> Iterator[dict[str, Any]]:
    for line, obj in _iter_jsonl(path):
      doc_id = _id_field(obj, path, line)
      text = _str_field(obj, "text", path, line)
      title = _str_field(obj, "title", path, line, required=False)
      yield {"id": doc_id, "title": title, "text": text, "line": line}

  return store.cached_corpus(path, "beir", rows, cache_dir=cache_dir)


def read_beir_queries(path: str | os.PathLike) -> dict[str, str]:
  """Reads a BEIR `queries.jsonl[.gz]` into query id -> text, in file order."""
  path = os.fspath(path)
  queries: dict[str, str] = {}
  first_line: dict[str, int] = {}
  for line, obj in _iter_jsonl(path):
    query_id = _id_field(obj, path, line)
    text = _str_field(obj, "text", path, line)
    if query_id in queries:
      raise DataFormatError(
          path, f"duplicate query id {query_id!r} (first seen on line {first_line[query_id]})",
          line)
    first_line[query_id] = line
    queries[query_id] = text
  return queries


def read_beir_qrels(path: str | os.PathLike, corpus: Corpus,
                    queries: dict[str, str]) -> dict[str, dict[str, int]]:
  """Reads `qrels/{split}.tsv`: header `query-id TAB corpus-id TAB score`, then judgments.

  The header is optional, so files written without one read the same.

  The dict preserves the order in which queries first appear. A repeated
  (query, passage) pair keeps its last score.
  """
  path = os.fspath(path)
  row_of = corpus.row_of
  qrels: dict[str, dict[str, int]] = {}
  with contextlib.closing(text_lines(path)) as lines:
    for line_no, line in lines:
      line = line.rstrip("\r\n")
      if not line.strip():
        continue
      fields = line.split("\t")
      if line_no == 1 and tuple(fld.strip().lower() for fld in fields) in _QRELS_HEADERS:
        continue
      if len(fields) != 3:
        raise DataFormatError(
            path, f"expected 3 tab-separated columns (query-id, corpus-id, score), "
            f"got {len(fields)}", line_no)
      query_id, doc_id, score_text = (fld.strip() for fld in fields)
      try:
        score = int(score_text)
      except ValueError:
        raise DataFormatError(path, f"score {score_text!r} is not an integer", line_no) from None
      if doc_id not in row_of:
        raise DataFormatError(path, f"unknown document id {doc_id!r} (not in the corpus)",
                              line_no)
      if query_id not in queries:
        raise DataFormatError(path, f"unknown query id {query_id!r} (not in the queries file)",
                              line_no)
      qrels.setdefault(query_id, {})[doc_id] = score
  return qrels


def available_splits(root: str | os.PathLike) -> list[str]:
  """Names of the splits that have a `qrels/{split}.tsv` file under `root`."""
  qrels_dir = os.path.join(root, "qrels")
  if not os.path.isdir(qrels_dir):
    return []
  return sorted(name[:-len(".tsv")] for name in os.listdir(qrels_dir) if name.endswith(".tsv"))


def read_beir(root: str | os.PathLike, splits: Sequence[str] | None = None,
              name: str | None = None,
              cache_dir: str | os.PathLike | None = None) -> RetrievalDataset:
  """Reads a BEIR data set directory.

  Args:
    root: directory holding `corpus.jsonl[.gz]`, `queries.jsonl[.gz]` and `qrels/`.
    splits: split names to read (`qrels/{split}.tsv`); None reads every split found.
    name: data set name; defaults to the directory's base name.
    cache_dir: root of the corpus store; None = `store.default_cache_dir()`.

  Returns:
    The data set; each split's queries are those its qrels judge, in order of first
    appearance in the qrels file.

  Raises:
    DataFormatError: on malformed files, naming the file, line and problem.
  """
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise DataFormatError(root, "BEIR data set directory does not exist")
  existing = available_splits(root)
  if splits is None:
    splits = existing
    if not splits:
      raise DataFormatError(os.path.join(root, "qrels"), "no qrels/{split}.tsv files found")
  else:
    if isinstance(splits, str):
      splits = [splits]
    missing = [s for s in splits if s not in existing]
    if missing:
      raise DataFormatError(
          os.path.join(root, "qrels"),
          f"missing split file(s) {', '.join(s + '.tsv' for s in missing)}; "
          f"splits that exist: {existing or 'none'}")

  corpus = read_beir_corpus(find_file(root, "corpus.jsonl"), cache_dir)
  all_queries = read_beir_queries(find_file(root, "queries.jsonl"))
  split_map: dict[str, Split] = {}
  for split in splits:
    qrels = read_beir_qrels(os.path.join(root, "qrels", f"{split}.tsv"), corpus, all_queries)
    query_ids = list(qrels)
    split_map[split] = Split(
        queries=Queries(ids=query_ids, texts=[all_queries[q] for q in query_ids]), qrels=qrels)
  dataset_name = name or os.path.basename(os.path.normpath(root))
  return RetrievalDataset(name=dataset_name, corpus=corpus, splits=split_map)
