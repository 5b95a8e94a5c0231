"""Retrieval data types shared by every reader, the trainer and the evaluators.

A `Corpus` is an Arrow table (id, title, text), memory-mapped from the on-disk store of
`qdr_jax.data.store` or held in memory for small corpora, plus an id -> row lookup kept
as two numpy arrays (sorted 64-bit id hashes and their rows) instead of a Python dict:
at 21M passages Python lists and a dict cost tens of GB on every process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import xxhash

COLUMNS = ("id", "title", "text")
# Rows converted to Python objects at a time when iterating or hashing.
_CHUNK_ROWS = 8192
LOOKUP_KEYS_FILE = "id_hash.npy"
LOOKUP_ROWS_FILE = "id_rows.npy"


class DataFormatError(ValueError):
  """Malformed input data; the message names the file, the line (if any) and the problem."""

  def __init__(self, path: str, problem: str, line: int | None = None):
    where = f"{path}:{line}" if line is not None else str(path)
    super().__init__(f"{where}: {problem}")
    self.path = str(path)
    self.line = line
    self.problem = problem


def _hash_id(data: bytes) -> int:
  # Module-level so tests can swap in a colliding hash; cached lookups record its name.
  return xxhash.xxh3_64_intdigest(data)


HASH_NAME = "xxh3_64"


def hash_ids(ids: Sequence[str]) -> np.ndarray:
  """(n,) uint64 hashes of the ids' UTF-8 bytes."""
  return np.fromiter((_hash_id(d.encode("utf-8")) for d in ids), dtype=np.uint64,
                     count=len(ids))


class StrColumn(Sequence[str]):
  """Read-only view of one string column; converts to Python only the rows asked for.

  `col[i]` gives a str; `col[a:b]` and `col[int_array]` give a list of str.
  """

  def __init__(self, column: pa.ChunkedArray):
    self._column = column
    lengths = np.fromiter((len(c) for c in column.chunks), dtype=np.int64,
                          count=column.num_chunks)
    self._starts = np.concatenate([[0], np.cumsum(lengths)])

  @property
  def arrow(self) -> pa.ChunkedArray:
    return self._column

  def __len__(self) -> int:
    return int(self._starts[-1])

  def _rows(self, key: Any) -> np.ndarray:
    rows = np.asarray(key)
    if rows.dtype == bool or not np.issubdtype(rows.dtype, np.integer):
      raise TypeError(f"column rows must be integers, got dtype {rows.dtype}")
    rows = rows.astype(np.int64).ravel()
    n = len(self)
    if rows.size and (rows.min() < -n or rows.max() >= n):
      raise IndexError(f"row out of range for a column of {n}")
    return np.where(rows < 0, rows + n, rows)

  def take(self, rows: Any) -> list[str]:
    """Values at `rows`, in that order; reads only the chunks that hold them.

    Done chunk by chunk because a take over a whole chunked column may concatenate
    (copy) every chunk first.
    """
    rows = self._rows(rows)
    if rows.size == 0:
      return []
    chunk = np.searchsorted(self._starts, rows, side="right") - 1
    order = np.argsort(chunk, kind="stable")
    out: list[Any] = [None] * rows.size
    bounds = np.flatnonzero(np.diff(chunk[order])) + 1
    for group in np.split(order, bounds):
      c = int(chunk[group[0]])
      local = rows[group] - self._starts[c]
      values = self._column.chunk(c).take(pa.array(local)).to_pylist()
      for position, value in zip(group.tolist(), values):
        out[position] = value
    return out

  def __getitem__(self, key: Any) -> Any:
    if isinstance(key, (int, np.integer)):
      (row,) = self._rows(key)
      c = int(np.searchsorted(self._starts, row, side="right") - 1)
      return self._column.chunk(c)[int(row - self._starts[c])].as_py()
    if isinstance(key, slice):
      start, stop, step = key.indices(len(self))
      if step == 1:
        return self._column.slice(start, max(stop - start, 0)).to_pylist()
      return self.take(np.arange(start, stop, step))
    return self.take(key)

  def chunks(self, size: int = _CHUNK_ROWS) -> Iterator[list[str]]:
    """The column as consecutive lists of at most `size` values."""
    for array in self._column.chunks:
      for start in range(0, len(array), size):
        yield array.slice(start, size).to_pylist()

  def __iter__(self) -> Iterator[str]:
    for values in self.chunks():
      yield from values

  def __eq__(self, other: object) -> bool:
    if not isinstance(other, Sequence) or isinstance(other, str):
      return NotImplemented
    if len(other) != len(self):
      return False
    if isinstance(other, StrColumn) and other.arrow.type == self._column.type:
      return self._column.equals(other.arrow)
    return all(a == b for a, b in zip(self, other))

  __hash__ = None  # type: ignore[assignment]

  def __repr__(self) -> str:
    head = self[:3]
    return f"StrColumn(len={len(self)}, head={head!r})"


def _string_pieces(array: pa.Array) -> tuple[bytes, memoryview | bytes]:
  """(little-endian int64 lengths, concatenated UTF-8 data) of a string array.

  Both are independent of how the column is chunked, so a fingerprint built from them
  is the same for the in-memory and the stored copy of a corpus.
  """
  if array.null_count:
    raise ValueError("corpus columns must not hold nulls")
  offset_type = np.int64 if pa.types.is_large_string(array.type) else np.int32
  offsets = np.frombuffer(array.buffers()[1], dtype=offset_type)[
      array.offset:array.offset + len(array) + 1].astype(np.int64)
  data = array.buffers()[2]
  body = b"" if data is None else memoryview(data)[offsets[0]:offsets[-1]]
  return np.diff(offsets).astype("<i8").tobytes(), body


def table_fingerprint(table: pa.Table) -> str:
  """Hex digest of every id, title and text (values and order), streamed chunk by chunk."""
  digests = []
  for name in COLUMNS:
    lengths, data = hashlib.blake2b(digest_size=16), hashlib.blake2b(digest_size=16)
    for array in table.column(name).chunks:
      piece_lengths, piece_data = _string_pieces(array)
      lengths.update(piece_lengths)
      data.update(piece_data)
    digests.append(lengths.hexdigest() + data.hexdigest())
  return hashlib.blake2b(f"{table.num_rows}|{'|'.join(digests)}".encode(),
                         digest_size=16).hexdigest()


@dataclasses.dataclass(frozen=True)
class IdLookup:
  """Id -> row without a dict: `keys` are the sorted id hashes, `rows` their rows.

  Equal hashes sort by row (a stable sort), and every hit is verified against the id
  string, so hash collisions cost a comparison, never a wrong row.
  """
  keys: np.ndarray  # (N,) uint64, ascending
  rows: np.ndarray  # (N,) int64

  @classmethod
  def build(cls, ids: StrColumn) -> IdLookup:
    hashes = np.empty(len(ids), dtype=np.uint64)
    start = 0
    for values in ids.chunks():
      hashes[start:start + len(values)] = hash_ids(values)
      start += len(values)
    order = np.argsort(hashes, kind="stable")
    return cls(keys=hashes[order], rows=order.astype(np.int64))

  @classmethod
  def load(cls, directory: str | os.PathLike, num_rows: int) -> IdLookup:
    paths = [os.path.join(directory, f) for f in (LOOKUP_KEYS_FILE, LOOKUP_ROWS_FILE)]
    # Memory-mapped, so processes on a host share one copy through the page cache.
    keys, rows = (np.load(p, allow_pickle=False, mmap_mode="r") for p in paths)
    for path, array, dtype in zip(paths, (keys, rows), (np.uint64, np.int64)):
      if array.shape != (num_rows,) or array.dtype != dtype:
        raise ValueError(f"{path}: expected a ({num_rows},) {np.dtype(dtype)} array, got "
                         f"{array.shape} {array.dtype}; delete the corpus cache to rebuild it.")
    return cls(keys=keys, rows=rows)

  def find(self, doc_ids: Sequence[str], ids: StrColumn) -> np.ndarray:
    """(n,) int64 rows of `doc_ids`, -1 where absent."""
    doc_ids = list(doc_ids)
    out = np.full(len(doc_ids), -1, dtype=np.int64)
    if not doc_ids:
      return out
    hashes = hash_ids(doc_ids)
    lo = np.searchsorted(self.keys, hashes, side="left")
    hi = np.searchsorted(self.keys, hashes, side="right")
    single = np.flatnonzero(hi - lo == 1)
    if single.size:  # The common case, verified with one vectorised read.
      rows = np.asarray(self.rows[lo[single]], dtype=np.int64)
      found = ids.take(rows)
      for i, row, value in zip(single.tolist(), rows.tolist(), found):
        if value == doc_ids[i]:
          out[i] = row
    for i in np.flatnonzero(hi - lo > 1).tolist():  # Hash collisions: compare each.
      candidates = np.asarray(self.rows[lo[i]:hi[i]], dtype=np.int64)
      for row, value in zip(candidates.tolist(), ids.take(candidates)):
        if value == doc_ids[i]:
          out[i] = row
          break
    return out

  def first_duplicate(self, ids: StrColumn) -> tuple[int, int] | None:
    """(row, earlier row with the same id) for the earliest repeated id, or None."""
    same = np.flatnonzero(self.keys[1:] == self.keys[:-1])
    if same.size == 0:
      return None
    best: tuple[int, int] | None = None
    starts = same[np.r_[True, np.diff(same) > 1]]
    for start in starts.tolist():
      end = start + 1
      while end < len(self.keys) and self.keys[end] == self.keys[start]:
        end += 1
      rows = np.sort(np.asarray(self.rows[start:end], dtype=np.int64))
      first_row: dict[str, int] = {}
      for row, value in zip(rows.tolist(), ids.take(rows)):
        if value in first_row:
          if best is None or row < best[0]:
            best = (row, first_row[value])
          break
        first_row[value] = row
    return best


class RowOf(Mapping[str, int]):
  """Read-only `id -> row` mapping backed by the corpus lookup (`d in`, `[d]`, `.get`)."""

  def __init__(self, corpus: Corpus):
    self._corpus = corpus

  def __getitem__(self, doc_id: str) -> int:
    row = int(self._corpus.find_rows([doc_id])[0])
    if row < 0:
      raise KeyError(doc_id)
    return row

  def __contains__(self, doc_id: object) -> bool:
    return isinstance(doc_id, str) and self._corpus.find_rows([doc_id])[0] >= 0

  def __len__(self) -> int:
    return len(self._corpus)

  def __iter__(self) -> Iterator[str]:
    return iter(self._corpus.ids)


class Corpus:
  """Passages with a dense row index: row i of the target table embeds passage ids[i].

  `Corpus(ids=..., titles=..., texts=...)` (or `from_lists`) holds small corpora in
  memory; readers return corpora memory-mapped from the store (`from_arrow`).
  """

  def __init__(self, ids: Sequence[str], titles: Sequence[str], texts: Sequence[str]):
    if not (len(ids) == len(titles) == len(texts)):
      raise ValueError("Corpus ids, titles and texts must have the same length.")
    columns = {name: pa.array(list(values), type=pa.string())
               for name, values in zip(COLUMNS, (ids, titles, texts))}
    self._init(pa.table(columns), None, None, None)

  @classmethod
  def from_lists(cls, ids: Sequence[str], titles: Sequence[str],
                 texts: Sequence[str]) -> Corpus:
    return cls(ids=ids, titles=titles, texts=texts)

  @classmethod
  def from_arrow(cls, table: pa.Table, store_dir: str | os.PathLike | None = None,
                 fingerprint: str | None = None) -> Corpus:
    """Wraps a table with string columns id, title, text (other columns are dropped).

    Args:
      table: the passages; memory-mapped tables stay memory-mapped.
      store_dir: the store directory holding the cached lookup arrays, if any.
      fingerprint: the table's `table_fingerprint`, when already known.
    """
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
      raise ValueError(f"corpus table lacks column(s) {missing}; has {table.column_names}")
    corpus = cls.__new__(cls)
    corpus._init(table.select(list(COLUMNS)),
                 None if store_dir is None else os.fspath(store_dir), fingerprint, None)
    return corpus

  def _init(self, table: pa.Table, store_dir: str | None, fingerprint: str | None,
            lookup: IdLookup | None) -> None:
    self._table = table
    self._store_dir = store_dir
    self._fingerprint = fingerprint
    self._lookup = lookup
    self._columns = {name: StrColumn(table.column(name)) for name in COLUMNS}

  @property
  def ids(self) -> StrColumn:
    return self._columns["id"]

  @property
  def titles(self) -> StrColumn:
    return self._columns["title"]

  @property
  def texts(self) -> StrColumn:
    return self._columns["text"]

  @property
  def table(self) -> pa.Table:
    return self._table

  @property
  def store_dir(self) -> str | None:
    """The store directory this corpus is mapped from (None for in-memory corpora)."""
    return self._store_dir

  def __len__(self) -> int:
    return self._table.num_rows

  def __repr__(self) -> str:
    where = self._store_dir or "memory"
    return f"Corpus({len(self)} passages, {where})"

  @property
  def lookup(self) -> IdLookup:
    if self._lookup is None:
      if self._store_dir is not None and os.path.exists(
          os.path.join(self._store_dir, LOOKUP_KEYS_FILE)):
        self._lookup = IdLookup.load(self._store_dir, len(self))
      else:
        self._lookup = IdLookup.build(self.ids)
    return self._lookup

  @property
  def row_of(self) -> Mapping[str, int]:
    """Passage id -> table row, as a read-only view of the lookup."""
    return RowOf(self)

  def find_rows(self, doc_ids: Sequence[str]) -> np.ndarray:
    """(n,) int64 table rows of `doc_ids`; -1 for ids not in the corpus."""
    return self.lookup.find(doc_ids, self.ids)

  def rows(self, doc_ids: Sequence[str]) -> np.ndarray:
    """(n,) int64 table rows of `doc_ids`.

    Raises:
      KeyError: naming the first id that is not in the corpus.
    """
    doc_ids = list(doc_ids)
    rows = self.find_rows(doc_ids)
    missing = np.flatnonzero(rows < 0)
    if missing.size:
      raise KeyError(f"passage id {doc_ids[missing[0]]!r} is not in the corpus "
                     f"({missing.size} of {len(doc_ids)} ids missing)")
    return rows

  def first_duplicate(self) -> tuple[int, int] | None:
    """(row, earlier row with the same id) of the first repeated id, or None."""
    return self.lookup.first_duplicate(self.ids)

  def fingerprint(self) -> str:
    """Digest of every id, title and text; read from the store when it was computed there."""
    if self._fingerprint is None:
      self._fingerprint = table_fingerprint(self._table)
    return self._fingerprint

  def select(self, rows: Any) -> Corpus:
    """A new in-memory corpus of `rows` (an int array), in that order."""
    rows = self.ids._rows(rows)  # pylint: disable=protected-access
    return Corpus(ids=self.ids.take(rows), titles=self.titles.take(rows),
                  texts=self.texts.take(rows))

  def chunks(self, size: int = _CHUNK_ROWS
             ) -> Iterator[tuple[list[str], list[str], list[str]]]:
    """(ids, titles, texts) lists of at most `size` consecutive passages."""
    for start in range(0, len(self), size):
      batch = self._table.slice(start, size)
      yield tuple(batch.column(c).to_pylist() for c in COLUMNS)  # type: ignore[misc]


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
