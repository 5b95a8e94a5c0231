"""Read and write retrieval runs in the TREC format: `qid Q0 docid rank score tag` per line.

Writing is deterministic: queries in sorted id order, passages by score descending with ties
broken by passage id ascending, ranks from 1, scores printed with `repr` so they read back
exactly. Files are written atomically (temp file in the same directory, then os.replace).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from qdr_jax.data.types import DataFormatError
from qdr_jax.io_utils import write_text_atomic


def write_trec_run(
    path: str | os.PathLike, run: Mapping[str, Mapping[str, float]], tag: str = "qdr_jax"
) -> None:
  """Writes `run` (query id -> {passage id: score}) as a TREC run file.

  Raises:
    ValueError: the tag or an id is empty or contains whitespace (it would split the columns).
  """
  if not tag or any(c.isspace() for c in tag):
    raise ValueError(f"tag must be a non-empty string without whitespace, got {tag!r}.")
  lines = []
  for qid in sorted(run, key=str):
    qid_s = str(qid)
    _check_id(qid_s, "query id")
    ranked = sorted(((str(d), float(s)) for d, s in run[qid].items()), key=lambda p: (-p[1], p[0]))
    for rank, (doc, score) in enumerate(ranked, start=1):
      _check_id(doc, "passage id")
      lines.append(f"{qid_s} Q0 {doc} {rank} {score!r} {tag}\n")
  write_text_atomic(os.fspath(path), "".join(lines))


def read_trec_run(path: str | os.PathLike) -> dict[str, dict[str, float]]:
  """Reads a TREC run file into query id -> {passage id: score}.

  Blank lines are skipped. The rank column is checked to be an integer but not used: the
  scores define the order, as in trec_eval.

  Raises:
    FileNotFoundError: no such file.
    DataFormatError (a ValueError): a line without 6 columns, a score that is not a number, a
      rank that is not an integer, or a (query, passage) pair listed twice; the message
      names the file and line.
  """
  path = os.fspath(path)
  run: dict[str, dict[str, float]] = {}
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, start=1):
      fields = line.split()
      if not fields:
        continue
      if len(fields) != 6:
        raise DataFormatError(
            path, f"expected 6 columns 'qid Q0 docid rank score tag', got {len(fields)}: "
            f"{line.rstrip()!r}", line_no)
      qid, _, doc, rank, score, _ = fields
      try:
        int(rank)
      except ValueError:
        raise DataFormatError(path, f"rank {rank!r} is not an integer", line_no) from None
      try:
        value = float(score)
      except ValueError:
        raise DataFormatError(path, f"score {score!r} is not a number", line_no) from None
      docs = run.setdefault(qid, {})
      if doc in docs:
        raise DataFormatError(path, f"passage {doc!r} listed twice for query {qid!r}", line_no)
      docs[doc] = value
  return run


def _check_id(value: str, what: str) -> None:
  if not value or any(c.isspace() for c in value):
    raise ValueError(f"{what} {value!r} is empty or contains whitespace; TREC runs cannot hold it.")
