"""Reads one split of a Hugging Face `datasets` data set (saved to disk or on the hub)."""

from __future__ import annotations

import os
from typing import Any

from qdr_jax.data import store
from qdr_jax.data.dpr import SplitBuilder
from qdr_jax.data.types import Corpus, DataFormatError, Split

_QUESTION_COLUMNS = ("question", "query")
_QUERY_ID_COLUMNS = ("query_id", "qid")
# Columns holding a list of positive passage ids.
_ID_LIST_COLUMNS = ("positive_passage_ids", "positive_ids", "positive_pids",
                    "positive_doc_ids", "positive_docids")
# Columns holding a list of positive contexts (dicts with an id key, or bare ids).
_CTX_COLUMNS = ("positive_ctxs", "positive_passages", "positives")
_CTX_ID_KEYS = ("passage_id", "psg_id", "docid", "doc_id", "id")
_BATCH_ROWS = 1024
# Corpus columns: the passage id, its body and (optional) title.
_PASSAGE_ID_COLUMNS = ("id", "_id", "docid", "doc_id", "passage_id", "pid")
_PASSAGE_TEXT_COLUMNS = ("text", "contents", "passage")


def _load(path_or_hub_name: str, split_name: str, hub_split: str | None) -> Any:
  # Imported here: importing `datasets` takes about a second.
  import datasets  # pylint: disable=g-import-not-at-top

  if os.path.isdir(path_or_hub_name):
    ds = datasets.load_from_disk(path_or_hub_name)
    if isinstance(ds, datasets.DatasetDict):
      if split_name in ds:
        return ds[split_name]
      if len(ds) == 1:
        return next(iter(ds.values()))
      raise DataFormatError(path_or_hub_name, f"saved DatasetDict has no split {split_name!r}; "
                            f"it has {sorted(ds)}")
    return ds
  return datasets.load_dataset(path_or_hub_name, split=hub_split or split_name)


def _first_present(columns: list[str], candidates: tuple[str, ...]) -> str | None:
  return next((c for c in candidates if c in columns), None)


def _ctx_ids(value: Any) -> list[str]:
  """Positive ids from a list of contexts, in any of the shapes `datasets` returns."""
  if value is None:
    return []
  if isinstance(value, dict):
    # A `Sequence` of structs comes back as a struct of lists.
    key = next((k for k in _CTX_ID_KEYS if k in value), None)
    if key is None:
      raise ValueError(f"positive contexts have no id key ({', '.join(_CTX_ID_KEYS)}); "
                       f"keys: {sorted(value)}")
    return [str(v).strip() for v in value[key]]
  ids = []
  for ctx in value:
    if isinstance(ctx, dict):
      key = next((k for k in _CTX_ID_KEYS if ctx.get(k) is not None), None)
      if key is None:
        raise ValueError(f"positive context has no id key ({', '.join(_CTX_ID_KEYS)}); "
                         f"keys: {sorted(ctx)}")
      ids.append(str(ctx[key]).strip())
    else:
      ids.append(str(ctx).strip())
  return ids


def _answers(value: Any) -> list[str]:
  if value is None:
    return []
  if isinstance(value, str):
    return [value]
  if isinstance(value, dict):  # SQuAD-style {"text": [...], "answer_start": [...]}.
    value = value.get("text", [])
  if not all(isinstance(a, str) for a in value):
    raise ValueError(f"'answers' must hold strings, got {value!r}")
  return list(value)


def read_hf_split(path_or_hub_name: str | os.PathLike, corpus: Corpus, split_name: str,
                  hub_split: str | None = None,
                  allow_missing_positives: bool = False) -> Split:
  """Reads one split of a `datasets` data set such as `coign/dback_nq`.

  Expected columns: the question (`question` or `query`); the positives, either as
  ids (`positive_passage_ids`, `positive_ids`, ...) or as contexts (`positive_ctxs`,
  a list of dicts with `passage_id`); optionally `answers` and a query id column
  (`query_id` or `qid`, else ids are `{split_name}-{row}`).

  Args:
    path_or_hub_name: a directory written by `save_to_disk` (read with
      `datasets.load_from_disk`), or a hub data set name (`datasets.load_dataset`).
    corpus: the passages the positive ids refer to.
    split_name: the split's name in the returned data set, and the split to pick
      from a saved DatasetDict or the hub.
    hub_split: the hub split to load when it differs from `split_name`.
    allow_missing_positives: skip (and count) positives not in the corpus instead of
      raising.

  Raises:
    DataFormatError: a required column is missing (naming the columns found), or a
      row is malformed.
  """
  source = os.fspath(path_or_hub_name)
  ds = _load(source, split_name, hub_split)
  columns = list(ds.column_names)
  question_col = _first_present(columns, _QUESTION_COLUMNS)
  positives_col = _first_present(columns, _ID_LIST_COLUMNS + _CTX_COLUMNS)
  if question_col is None or positives_col is None:
    wanted = (f"a question column ({' or '.join(_QUESTION_COLUMNS)})" if question_col is None
              else f"a positives column ({', '.join(_ID_LIST_COLUMNS + _CTX_COLUMNS)})")
    raise DataFormatError(source, f"missing {wanted}; columns found: {columns}")
  answers_col = "answers" if "answers" in columns else None
  id_col = _first_present(columns, _QUERY_ID_COLUMNS)
  wanted_cols = [c for c in (question_col, positives_col, answers_col, id_col) if c]

  builder = SplitBuilder(corpus, source, allow_missing_positives)
  row = 0
  # Batches keep memory flat for large splits instead of materialising whole columns.
  for batch in ds.select_columns(wanted_cols).iter(batch_size=_BATCH_ROWS):
    for i in range(len(batch[question_col])):
      where = f"row {row}"
      question = batch[question_col][i]
      if not isinstance(question, str):
        raise DataFormatError(source, f"{where}: column {question_col!r} must hold strings, "
                              f"got {question!r}")
      try:
        positive_ids = _ctx_ids(batch[positives_col][i])
        answers = _answers(batch[answers_col][i]) if answers_col else None
      except (TypeError, ValueError) as e:
        raise DataFormatError(source, f"{where}: {e}") from None
      query_id = str(batch[id_col][i]) if id_col else f"{split_name}-{row}"
      builder.add(query_id, question, positive_ids, answers, where)
      row += 1
  return builder.build(with_answers=answers_col is not None)


def read_hf_corpus(path_or_hub_name: str | os.PathLike, split: str = "train",
                   cache_dir: str | os.PathLike | None = None) -> Corpus:
  """Reads passages from a `datasets` data set (a `save_to_disk` directory or a hub name).

  Columns: the id (`id`, `_id`, `docid`, ...; numbers are read as strings), the text
  (`text`, `contents` or `passage`) and optionally `title`. The rows are copied once
  into the corpus store under `cache_dir` (see `qdr_jax.data.store`), batch by batch.

  Raises:
    DataFormatError: a missing column (naming the columns found), a null or non-string
      value, a repeated id (naming the row) or no passages.
  """
  source = os.fspath(path_or_hub_name)
  ds = _load(source, split, None)
  columns = list(ds.column_names)
  id_col = _first_present(columns, _PASSAGE_ID_COLUMNS)
  text_col = _first_present(columns, _PASSAGE_TEXT_COLUMNS)
  if id_col is None or text_col is None:
    wanted = (f"an id column ({', '.join(_PASSAGE_ID_COLUMNS)})" if id_col is None
              else f"a text column ({', '.join(_PASSAGE_TEXT_COLUMNS)})")
    raise DataFormatError(source, f"missing {wanted}; columns found: {columns}")
  title_col = "title" if "title" in columns else None
  wanted_cols = [c for c in (id_col, text_col, title_col) if c]
  if os.path.isdir(source):
    stamp = [store.source_stamp(source), split]
  else:  # A hub data set: its files in the `datasets` cache say which revision it is.
    stamp = [source, split, [store.source_stamp(f["filename"]) for f in ds.cache_files]]

  def rows():
    row = 0
    for batch in ds.select_columns(wanted_cols).iter(batch_size=_BATCH_ROWS):
      for i, doc_id in enumerate(batch[id_col]):
        text = batch[text_col][i]
        title = batch[title_col][i] if title_col else ""
        if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
          raise DataFormatError(source, f"row {row}: column {id_col!r} must hold strings or "
                                f"integers, got {doc_id!r}")
        for col, value in ((text_col, text), ("title", title)):
          if not isinstance(value, str):
            raise DataFormatError(source, f"row {row}: column {col!r} must hold strings, "
                                  f"got {value!r}")
        yield {"id": str(doc_id).strip(), "title": title, "text": text, "line": row}
        row += 1

  return store.cached_corpus(source, f"hf:{split}", rows, cache_dir=cache_dir, stamp=stamp,
                             line_kind="row")
