"""In-memory retrieval data types shared by every reader, the trainer and the evaluators."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from functools import cached_property

import numpy as np


class DataFormatError(ValueError):
  """Malformed input data; the message names the file, the line (if any) and the problem."""

  def __init__(self, path: str, problem: str, line: int | None = None):
    where = f"{path}:{line}" if line is not None else str(path)
    super().__init__(f"{where}: {problem}")
    self.path = str(path)
    self.line = line
    self.problem = problem


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Passages with a dense row index: row i of the target table embeds passage ids[i]."""

  ids: Sequence[str]
  titles: Sequence[str]
  texts: Sequence[str]

  def __post_init__(self):
    if not (len(self.ids) == len(self.titles) == len(self.texts)):
      raise ValueError("Corpus ids, titles and texts must have the same length.")

  def __len__(self) -> int:
    return len(self.ids)

  @cached_property
  def row_of(self) -> Mapping[str, int]:
    """Passage id -> table row."""
    return {doc_id: row for row, doc_id in enumerate(self.ids)}

  def rows(self, doc_ids: Sequence[str]) -> np.ndarray:
    return np.asarray([self.row_of[d] for d in doc_ids], dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class Queries:
  ids: Sequence[str]
  texts: Sequence[str]

  def __post_init__(self):
    if len(self.ids) != len(self.texts):
      raise ValueError("Query ids and texts must have the same length.")

  def __len__(self) -> int:
    return len(self.ids)


@dataclasses.dataclass(frozen=True)
class Split:
  """Queries of one split with what makes a passage relevant to them.

  qrels: query id -> {passage id: relevance}; relevance > 0 marks labelled positives
    (used as training positives and for ranking metrics). May be empty for QA test sets.
  answers: query id -> answer strings for DPR-style answer matching, or None when the
    split is judged by qrels only.
  """

  queries: Queries
  qrels: Mapping[str, Mapping[str, int]]
  answers: Mapping[str, Sequence[str]] | None = None

  @property
  def judged_by_answers(self) -> bool:
    return self.answers is not None

  def positives(self, query_id: str) -> list[str]:
    return [d for d, rel in self.qrels.get(query_id, {}).items() if rel > 0]


@dataclasses.dataclass(frozen=True)
class RetrievalDataset:
  name: str
  corpus: Corpus
  splits: Mapping[str, Split]

  def split(self, name: str) -> Split:
    if name not in self.splits:
      raise KeyError(f"Dataset {self.name!r} has no split {name!r}; it has {sorted(self.splits)}.")
    return self.splits[name]
