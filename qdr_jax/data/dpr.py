"""Reads/writes the DPR data layout (passages TSV, training JSON, QA CSV); builds it from SQuAD."""

from __future__ import annotations

import ast
import csv
import itertools
import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from qdr_jax.data import store
from qdr_jax.data.beir import open_text
from qdr_jax.data.types import Corpus, DataFormatError, Queries, Split

_log = logging.getLogger(__name__)

# Keys DPR files use for a context's passage id (NQ uses passage_id, TriviaQA psg_id).
_CTX_ID_KEYS = ("passage_id", "psg_id")
_CHUNK_CHARS = 1 << 20
# A record this large is certainly malformed; stop reading ahead to find its end.
_MAX_RECORD_CHARS = 1 << 26
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DELIMITERS = frozenset(" \t\n\r,]")


def _allow_long_csv_fields() -> None:
  # Passages can exceed the csv module's 128 KiB default field limit.
  limit = sys.maxsize
  while True:
    try:
      csv.field_size_limit(limit)
      return
    except OverflowError:
      limit //= 2


# ----------------------------------------------------------------------------- passages


def read_dpr_passages(path: str | os.PathLike,
                      cache_dir: str | os.PathLike | None = None) -> Corpus:
  """Reads a DPR passages file such as `psgs_w100.tsv[.gz]`.

  The header row names the columns (`id`, `text`, `title` in any order; `title` is
  optional). Fields follow the csv module's tab dialect, as DPR writes and reads
  them, so quoted fields may contain tabs, newlines and doubled quotes. The file is
  converted once into the corpus store under `cache_dir` (see `qdr_jax.data.store`)
  and memory-mapped from there.

  Raises:
    DataFormatError: bad header, wrong column count, duplicate id or no passages.
  """
  path = os.fspath(path)

  def rows() -> Iterator[dict[str, Any]]:
    _allow_long_csv_fields()
    with open_text(path) as f:
      reader = csv.reader(f, delimiter="\t")
      header = next(reader, None)
      if header is None:
        raise DataFormatError(path, "corpus is empty (no header row)")
      names = [h.strip().lower() for h in header]
      if "id" not in names or "text" not in names:
        raise DataFormatError(path, f"header must name columns 'id' and 'text' (and 'title'), "
                              f"got {header!r}", 1)
      id_col, text_col = names.index("id"), names.index("text")
      title_col = names.index("title") if "title" in names else None
      n_cols = len(names)
      for row in reader:
        if not row:
          continue
        if len(row) != n_cols:
          raise DataFormatError(path, f"expected {n_cols} tab-separated columns, got "
                                f"{len(row)}", reader.line_num)
        yield {"id": row[id_col].strip(), "text": row[text_col],
               "title": row[title_col] if title_col is not None else "",
               "line": reader.line_num}

  return store.cached_corpus(path, "dpr", rows, cache_dir=cache_dir)


def _tsv_field(value: str) -> str:
  """Quotes a field the way the csv module's tab dialect reads it back.

  csv.writer leaves a lone '\r' unquoted when the line terminator is '\n', and
  csv.reader then splits the row there, so fields are quoted here instead.
  """
  if any(c in value for c in '\t\n\r"'):
    return '"' + value.replace('"', '""') + '"'
  return value


def _write_tsv_rows(path: str | os.PathLike, rows: Iterable[Sequence[str]]) -> None:
  with open(path, "w", encoding="utf-8", newline="") as f:
    for row in rows:
      f.write("\t".join(_tsv_field(v) for v in row) + "\n")


def write_dpr_passages(path: str | os.PathLike, corpus: Corpus) -> None:
  """Writes `corpus` as a DPR passages TSV (header `id`, `text`, `title`)."""
  _write_tsv_rows(path, itertools.chain([("id", "text", "title")],
                                        zip(corpus.ids, corpus.texts, corpus.titles)))


# ----------------------------------------------------------------------------- JSON


def iter_json_array(path: str | os.PathLike) -> Iterator[tuple[int, int, Any]]:
  """Streams the elements of a file holding one JSON array.

  DPR training files are gigabytes; decoding element by element keeps only one
  chunk of text and the current element in memory.

  Yields:
    (1-based line where the element starts, element index, decoded element).

  Raises:
    DataFormatError: the file is not a well-formed JSON array.
  """
  path = os.fspath(path)
  decoder = json.JSONDecoder()
  with open_text(path) as f:
    buf, pos, line, eof = "", 0, 1, False

    def read_more(min_chars: int) -> None:
      nonlocal buf, pos, eof
      chunk = f.read(max(min_chars, _CHUNK_CHARS))
      if not chunk:
        eof = True
      buf = buf[pos:] + chunk
      pos = 0

    def advance(new_pos: int) -> None:
      nonlocal pos, line
      line += buf.count("\n", pos, new_pos)
      pos = new_pos

    def next_char() -> str:
      """Skips whitespace; returns the next character, or '' at end of file."""
      while True:
        advance(_WHITESPACE.match(buf, pos).end())
        if pos < len(buf):
          return buf[pos]
        if eof:
          return ""
        read_more(0)

    c = next_char()
    if c != "[":
      found = "an empty file" if not c else repr(c)
      raise DataFormatError(path, f"expected a JSON array of records, found {found}", line)
    advance(pos + 1)
    index = 0
    c = next_char()
    if c == "]":
      advance(pos + 1)
    else:
      while True:
        while True:
          try:
            obj, end = decoder.raw_decode(buf, pos)
            # Objects, arrays and strings end at their closing character; a bare
            # number or literal is only complete once a delimiter follows it.
            if eof or buf[pos] in '{["' or (end < len(buf) and buf[end] in _DELIMITERS):
              break
          except json.JSONDecodeError as e:
            if eof or len(buf) - pos > _MAX_RECORD_CHARS:
              raise DataFormatError(path, f"bad JSON in record {index}: {e.msg}",
                                    line + buf.count("\n", pos, e.pos)) from None
          # Doubling the window keeps re-parsing of a long record linear overall.
          read_more(len(buf) - pos)
        start_line = line
        advance(end)
        yield start_line, index, obj
        index += 1
        c = next_char()
        if c == ",":
          advance(pos + 1)
          next_char()
        elif c == "]":
          advance(pos + 1)
          break
        elif not c:
          raise DataFormatError(path, "unexpected end of file inside the JSON array", line)
        else:
          raise DataFormatError(path, f"expected ',' or ']' after record {index - 1}, "
                                f"found {c!r}", line)
    if next_char():
      raise DataFormatError(path, "unexpected data after the JSON array", line)


def write_dpr_json(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> None:
  """Writes DPR training records as one JSON array, a record per line."""
  with open(path, "w", encoding="utf-8") as f:
    f.write("[")
    for i, record in enumerate(records):
      f.write(",\n" if i else "\n")
      f.write(json.dumps(record, ensure_ascii=False))
    f.write("\n]\n")


class SplitBuilder:
  """Collects queries with positive passage ids and answers into a Split.

  Shared by the DPR JSON and Hugging Face readers so both treat ids, duplicates
  and missing positives the same way.
  """

  def __init__(self, corpus: Corpus, path: str, allow_missing_positives: bool):
    self._row_of = corpus.row_of
    self._path = path
    self._allow_missing = allow_missing_positives
    self.ids: list[str] = []
    self.texts: list[str] = []
    self.qrels: dict[str, dict[str, int]] = {}
    self.answers: dict[str, list[str]] = {}
    self.missing_positives = 0
    self._seen: set[str] = set()

  def add(self, query_id: str, text: str, positive_ids: Iterable[str],
          answers: Sequence[str] | None, where: str, line: int | None = None) -> None:
    """Adds one query; `where` locates it in error messages (e.g. 'record 3')."""
    if query_id in self._seen:
      raise DataFormatError(self._path, f"{where}: duplicate query id {query_id!r}", line)
    self._seen.add(query_id)
    positives: dict[str, int] = {}
    for doc_id in positive_ids:
      if doc_id not in self._row_of:
        if not self._allow_missing:
          raise DataFormatError(
              self._path, f"{where}: positive passage id {doc_id!r} is not in the corpus "
              "(pass allow_missing_positives=True to skip such positives)", line)
        self.missing_positives += 1
        continue
      positives[doc_id] = 1
    self.ids.append(query_id)
    self.texts.append(text)
    # Queries left without positives stay (answers can still judge them) but get no qrels.
    if positives:
      self.qrels[query_id] = positives
    if answers is not None:
      self.answers[query_id] = list(answers)

  def build(self, with_answers: bool) -> Split:
    if self.missing_positives:
      _log.warning("%s: skipped %d positive passage ids that are not in the corpus.",
                   self._path, self.missing_positives)
    return Split(queries=Queries(ids=self.ids, texts=self.texts), qrels=self.qrels,
                 answers=self.answers if with_answers else None)


def _answer_list(value: Any, path: str, where: str, line: int | None) -> list[str]:
  if not isinstance(value, (list, tuple)) or not all(isinstance(a, str) for a in value):
    raise DataFormatError(path, f"{where}: 'answers' must be a list of strings, got {value!r}",
                          line)
  return list(value)


def _ctx_id(ctx: Any, path: str, where: str, line: int) -> str:
  if not isinstance(ctx, dict):
    raise DataFormatError(path, f"{where}: positive ctx must be an object, got {ctx!r}", line)
  for key in _CTX_ID_KEYS:
    if ctx.get(key) is not None:
      return str(ctx[key]).strip()
  raise DataFormatError(path, f"{where}: positive ctx has no 'passage_id' or 'psg_id' "
                        f"(keys: {sorted(ctx)})", line)


def dpr_records_to_split(records: Iterable[tuple[int | None, int, Any]], corpus: Corpus,
                         path: str, split_name: str = "train",
                         allow_missing_positives: bool = False) -> tuple[Split, int]:
  """Turns DPR training records into a Split.

  Args:
    records: (line, index, record) triples as `iter_json_array` yields them.
    corpus: the passages; positive ctx ids are looked up in it.
    path: file name for error messages.
    split_name: query ids are synthesised as `{split_name}-{index}`.
    allow_missing_positives: skip (and count) positives not in the corpus instead of
      raising.

  Returns:
    The split (qrels: positive ctx ids with relevance 1; answers when the records
    carry them) and the number of skipped positives.
  """
  builder = SplitBuilder(corpus, path, allow_missing_positives)
  any_answers = False
  for line, index, record in records:
    where = f"record {index}"
    if not isinstance(record, dict):
      raise DataFormatError(path, f"{where}: expected a JSON object, got "
                            f"{type(record).__name__}", line)
    question = record.get("question")
    if not isinstance(question, str):
      problem = ("missing required field 'question'" if question is None
                 else f"field 'question' must be a string, got {question!r}")
      raise DataFormatError(path, f"{where}: {problem}", line)
    if "positive_ctxs" not in record:
      raise DataFormatError(path, f"{where}: missing required field 'positive_ctxs'", line)
    ctxs = record["positive_ctxs"]
    if not isinstance(ctxs, list):
      raise DataFormatError(path, f"{where}: 'positive_ctxs' must be a list", line)
    answers = None
    if record.get("answers") is not None:
      answers = _answer_list(record["answers"], path, where, line)
      any_answers = True
    builder.add(f"{split_name}-{index}", question,
                [_ctx_id(ctx, path, where, line) for ctx in ctxs], answers, where, line)
  split = builder.build(with_answers=any_answers)
  # Records without answers in a file that has some count as having none.
  if split.answers is not None:
    for query_id in split.queries.ids:
      split.answers.setdefault(query_id, [])
  return split, builder.missing_positives


def read_dpr_train_json(path: str | os.PathLike, corpus: Corpus, split_name: str = "train",
                        allow_missing_positives: bool = False) -> Split:
  """Reads a DPR training/dev JSON file (a list of question records).

  Each record is `{question, answers, positive_ctxs: [{passage_id|psg_id, title,
  text}], negative_ctxs, hard_negative_ctxs}`; only the positives and answers are
  kept. Query ids are `{split_name}-{index}`. The file is streamed, and may be gzipped.

  Raises:
    DataFormatError: malformed JSON or records, or (unless allow_missing_positives)
      a positive whose id is not in the corpus.
  """
  path = os.fspath(path)
  split, _ = dpr_records_to_split(iter_json_array(path), corpus, path, split_name,
                                  allow_missing_positives)
  return split


# ----------------------------------------------------------------------------- QA CSV


def read_qa_csv(path: str | os.PathLike, split_name: str = "test") -> Split:
  """Reads a DPR QA file (`nq-test.csv`): question TAB python-list-of-answers, no header.

  Answer lists are parsed with `ast.literal_eval`, never evaluated. Query ids are
  `{split_name}-{index}`. The split has answers and empty qrels.

  Raises:
    DataFormatError: wrong column count or an answer field that is not a list of
      strings.
  """
  path = os.fspath(path)
  _allow_long_csv_fields()
  ids: list[str] = []
  texts: list[str] = []
  answers: dict[str, list[str]] = {}
  with open_text(path) as f:
    reader = csv.reader(f, delimiter="\t")
    for row in reader:
      if not row:
        continue
      line = reader.line_num
      if len(row) != 2:
        raise DataFormatError(path, f"expected 2 tab-separated columns (question, answers), "
                              f"got {len(row)}", line)
      question, answers_text = row
      try:
        parsed = ast.literal_eval(answers_text.strip())
      except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        raise DataFormatError(path, f"answers field is not a Python list literal "
                              f"({type(e).__name__}): {answers_text[:80]!r}", line) from None
      query_id = f"{split_name}-{len(ids)}"
      answers[query_id] = _answer_list(parsed, path, "answers field", line)
      ids.append(query_id)
      texts.append(question)
  return Split(queries=Queries(ids=ids, texts=texts), qrels={}, answers=answers)


def write_qa_csv(path: str | os.PathLike, questions: Sequence[str],
                 answers: Sequence[Sequence[str]]) -> None:
  """Writes a DPR QA file that `read_qa_csv` (and DPR's own reader) reads back."""
  if len(questions) != len(answers):
    raise ValueError("questions and answers must have the same length.")
  _write_tsv_rows(path, ((q, repr(list(a))) for q, a in zip(questions, answers)))


# ----------------------------------------------------------------------------- SQuAD


class SquadDpr(NamedTuple):
  """SQuAD converted to the DPR layout; records are DPR training JSON records."""
  corpus: Corpus
  train_records: list[dict[str, Any]]
  test_records: list[dict[str, Any]]
  train_titles: list[str]
  test_titles: list[str]


def squad_to_dpr(squad_json: Mapping[str, Any], test_fraction: float = 0.25,
                 seed: int = 0) -> SquadDpr:
  """Converts SQuAD v1.1 JSON to passages plus DPR records, split by article.

  Every paragraph becomes a passage (ids "1", "2", ... in file order; title = the
  article title with underscores as spaces). Every question becomes a record whose
  one positive ctx is its own paragraph. Whole articles go to the test side so no
  test question's paragraph topic is seen in training.

  Args:
    squad_json: the parsed SQuAD file (`{"data": [{"title", "paragraphs": [...]}]}`).
    test_fraction: share of articles for the test side; with at least two articles
      each side gets one or more.
    seed: seeds the article permutation, so the split is deterministic.
  """
  if not 0.0 <= test_fraction <= 1.0:
    raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}.")
  articles = squad_json["data"]
  n = len(articles)
  n_test = int(round(test_fraction * n))
  if n > 1 and 0.0 < test_fraction < 1.0:
    n_test = min(max(n_test, 1), n - 1)
  order = np.random.default_rng(seed).permutation(n)
  is_test = np.zeros(n, dtype=bool)
  is_test[order[:n_test]] = True

  ids: list[str] = []
  titles: list[str] = []
  texts: list[str] = []
  train: list[dict[str, Any]] = []
  test: list[dict[str, Any]] = []
  for a, article in enumerate(articles):
    title = article.get("title", "").replace("_", " ")
    for paragraph in article["paragraphs"]:
      passage_id = str(len(ids) + 1)
      ids.append(passage_id)
      titles.append(title)
      texts.append(paragraph["context"])
      ctx = {"passage_id": passage_id, "title": title, "text": paragraph["context"]}
      for qa in paragraph["qas"]:
        # SQuAD dev lists up to three annotators' answers, often identical.
        answers = list(dict.fromkeys(ans["text"] for ans in qa["answers"]))
        record = {"question": qa["question"].strip(), "answers": answers,
                  "positive_ctxs": [ctx], "negative_ctxs": [], "hard_negative_ctxs": [],
                  "squad_id": qa.get("id")}
        (test if is_test[a] else train).append(record)
  corpus = Corpus(ids=ids, titles=titles, texts=texts)
  all_titles = [article.get("title", "").replace("_", " ") for article in articles]
  return SquadDpr(corpus=corpus, train_records=train, test_records=test,
                  train_titles=[t for t, te in zip(all_titles, is_test) if not te],
                  test_titles=[t for t, te in zip(all_titles, is_test) if te])
