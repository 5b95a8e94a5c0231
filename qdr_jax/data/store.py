"""The corpus store: each passage source converted once into memory-mapped Arrow files.

A store directory `<cache root>/<key>/` holds the passages as Arrow files written by
`datasets.Dataset.from_generator` (columns id, title, text and the source line of each
passage), the id lookup (`id_hash.npy`, `id_rows.npy`) and `corpus.json` (row count,
fingerprint, source, and an xxh3 checksum of every file, verified whenever the store is
mapped: a damaged store is moved aside with one warning and converted again). The key hashes the reader, the source's path, size and mtime and
the store version, so an edited source converts again and an unchanged one is mapped.
Later loads map the files (`datasets.Dataset.from_file`): no passage is read into
Python until asked for.

Conversion streams the source through a generator (never a list of all passages),
builds into a temporary sibling directory and renames it into place, so a store is
either absent or complete.

Multi-process jobs: the cache root defaults to the host's home directory, i.e. one
store per host. Process 0 converts first while the others wait at a barrier
(`sync_global_devices`); then every other process maps the store, or converts its own
host's copy when its cache root is not shared with process 0 (concurrent converters on
one host are safe: the first rename wins and the others discard their copy).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from qdr_jax.checksums import file_digest, set_aside
from qdr_jax.data import types
from qdr_jax.data.types import Corpus, DataFormatError

STORE_VERSION = 2  # 2: corpus.json records the files' checksums
META_FILE = "corpus.json"
ENV_CACHE_DIR = "QDR_JAX_CORPUS_CACHE"
# Rows per Arrow record batch: fewer, larger chunks make row lookups cheaper.
_WRITER_BATCH_ROWS = 10_000

Row = dict[str, Any]  # {"id", "title", "text": str, "line": int}


def default_cache_dir() -> str:
  """`$QDR_JAX_CORPUS_CACHE`, else `~/.cache/qdr_jax/corpora` (XDG_CACHE_HOME honoured)."""
  if os.environ.get(ENV_CACHE_DIR):
    return os.environ[ENV_CACHE_DIR]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "qdr_jax", "corpora")


def source_stamp(path: str | os.PathLike) -> list[Any]:
  """Path, size and mtime of a file, or of every file under a directory."""
  path = os.path.abspath(os.fspath(path))
  if os.path.isfile(path):
    st = os.stat(path)
    return [path, st.st_size, st.st_mtime_ns]
  stamp: list[Any] = [path]
  for directory, subdirs, files in sorted(os.walk(path)):
    subdirs.sort()
    for name in sorted(files):
      st = os.stat(os.path.join(directory, name))
      stamp.append([os.path.relpath(os.path.join(directory, name), path), st.st_size,
                    st.st_mtime_ns])
  return stamp


def store_key(kind: str, stamp: Any) -> str:
  spec = json.dumps([STORE_VERSION, types.HASH_NAME, kind, stamp], sort_keys=True)
  return f"{kind.split(':')[0]}-{hashlib.sha1(spec.encode()).hexdigest()[:20]}"


class _RowSource:
  """The generator handed to `datasets`; pickles (and so hashes) as its key alone."""

  def __init__(self, key: str, make_rows: Callable[[], Iterable[Row]]):
    self.key = key
    self.make_rows = make_rows
    self.count = 0

  def __getstate__(self) -> dict[str, str]:
    return {"key": self.key}

  def __call__(self) -> Iterator[Row]:
    for row in self.make_rows():
      self.count += 1
      yield row


def _features() -> Any:
  import datasets  # pylint: disable=g-import-not-at-top
  return datasets.Features({"id": datasets.Value("string"), "title": datasets.Value("string"),
                            "text": datasets.Value("string"), "line": datasets.Value("int64")})


def _format_error(error: BaseException) -> DataFormatError | None:
  """The DataFormatError that `datasets` wrapped in its own error, if any."""
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, DataFormatError):
      return error
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return None


def _generate(tmp: str, source: str, rows: _RowSource) -> list[str]:
  """Writes the rows as Arrow files in `tmp`; returns their names."""
  import datasets  # pylint: disable=g-import-not-at-top
  hf_cache = os.path.join(tmp, "hf")
  try:
    ds = datasets.Dataset.from_generator(rows, features=_features(), cache_dir=hf_cache,
                                         writer_batch_size=_WRITER_BATCH_ROWS)
  except Exception as e:  # pylint: disable=broad-except
    # `datasets` wraps whatever the generator raised (our DataFormatError included) in
    # its own error types; unwrap ours to report file and line, re-raise anything else.
    cause = _format_error(e)
    if cause is not None:
      raise cause from None
    if rows.count == 0:
      raise DataFormatError(source, "corpus is empty") from None
    raise
  shards = [f["filename"] for f in ds.cache_files]
  del ds
  names = []
  for i, shard in enumerate(shards):
    names.append(f"data-{i:05d}.arrow")
    os.replace(shard, os.path.join(tmp, names[-1]))
  shutil.rmtree(hf_cache)
  return names


def _read_tables(directory: str, names: Iterable[str]) -> pa.Table:
  import datasets  # pylint: disable=g-import-not-at-top
  tables = [datasets.Dataset.from_file(os.path.join(directory, n)).data.table for n in names]
  return pa.concat_tables(tables)


def _convert(final: str, source: str, rows: _RowSource, line_kind: str) -> None:
  """Builds the store for `rows` in a temporary directory and renames it to `final`."""
  root = os.path.dirname(final)
  os.makedirs(root, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=root, prefix=f".{os.path.basename(final)}.", suffix=".tmp")
  try:
    names = _generate(tmp, source, rows)
    table = _read_tables(tmp, names)
    if table.num_rows == 0:
      raise DataFormatError(source, "corpus is empty")
    corpus = Corpus.from_arrow(table)
    duplicate = corpus.first_duplicate()
    if duplicate is not None:
      row, first = duplicate
      line = int(table.column("line")[row].as_py())
      problem = f"duplicate passage id {corpus.ids[row]!r} (already passage #{first + 1})"
      if line_kind == "row":
        raise DataFormatError(source, f"row {line}: {problem}")
      raise DataFormatError(source, problem, line)
    lookup = corpus.lookup
    np.save(os.path.join(tmp, types.LOOKUP_KEYS_FILE), lookup.keys, allow_pickle=False)
    np.save(os.path.join(tmp, types.LOOKUP_ROWS_FILE), lookup.rows, allow_pickle=False)
    checked = names + [types.LOOKUP_KEYS_FILE, types.LOOKUP_ROWS_FILE]
    meta = {"version": STORE_VERSION, "hash": types.HASH_NAME, "rows": table.num_rows,
            "files": names, "fingerprint": corpus.fingerprint(), "source": source,
            "checksums": {n: file_digest(os.path.join(tmp, n)) for n in checked}}
    with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=1)
    del corpus, table, lookup
    try:
      os.rename(tmp, final)
    except OSError:
      if not os.path.exists(os.path.join(final, META_FILE)):
        raise
      shutil.rmtree(tmp, ignore_errors=True)  # Another process finished first.
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


class DamagedStoreError(DataFormatError):
  """A store's files differ from the checksums recorded when it was converted."""


def _verify_store(directory: str, meta: dict) -> None:
  sums = meta.get("checksums")
  if not isinstance(sums, dict) or not sums:
    raise DamagedStoreError(directory, f"{META_FILE} records no checksums")
  for name, digest in sorted(sums.items()):
    path = os.path.join(directory, name)
    try:
      now = file_digest(path)
    except OSError as e:
      raise DamagedStoreError(path, f"unreadable ({e.strerror or e})") from None
    if now != digest:
      raise DamagedStoreError(path, f"checksum {now} differs from {digest}, recorded in "
                              f"{META_FILE} when the store was converted")


def open_store(directory: str | os.PathLike) -> Corpus:
  """Maps a store directory written by `cached_corpus`, once its files match their
  checksums (`DamagedStoreError` otherwise)."""
  directory = os.fspath(directory)
  meta_path = os.path.join(directory, META_FILE)
  try:
    with open(meta_path, encoding="utf-8") as f:
      meta = json.load(f)
  except ValueError as e:
    raise DamagedStoreError(meta_path, f"not readable JSON ({e})") from None
  if meta.get("version") != STORE_VERSION or meta.get("hash") != types.HASH_NAME:
    raise ValueError(f"{meta_path}: store version {meta.get('version')} / hash "
                     f"{meta.get('hash')}, expected {STORE_VERSION} / {types.HASH_NAME}; "
                     "delete the directory to convert again.")
  _verify_store(directory, meta)
  table = _read_tables(directory, meta["files"])
  if table.num_rows != meta["rows"]:
    raise ValueError(f"{meta_path}: expected {meta['rows']} rows, the Arrow files hold "
                     f"{table.num_rows}; delete the directory to convert again.")
  return Corpus.from_arrow(table, store_dir=directory, fingerprint=meta["fingerprint"])


def _process_role() -> tuple[bool, bool]:
  """(several processes, this is process 0), without starting a backend early."""
  jax = sys.modules.get("jax")  # Not imported: no distributed runtime, and no import cost.
  if jax is None or not jax.distributed.is_initialized() or jax.process_count() == 1:
    return False, True
  return True, jax.process_index() == 0


def cached_corpus(source: str | os.PathLike, kind: str,
                  make_rows: Callable[[], Iterable[Row]], *,
                  cache_dir: str | os.PathLike | None = None, stamp: Any = None,
                  line_kind: str = "line") -> Corpus:
  """The corpus of `source`, converted into the store on first use and mapped after.

  Args:
    source: the passage file or directory; named in errors and stamped into the key.
    kind: the reader (and any option that changes its output), part of the key.
    make_rows: returns a fresh iterator of `{"id", "title", "text", "line"}` rows in
      corpus order; it may raise DataFormatError for malformed input.
    cache_dir: the cache root; None or "" = `default_cache_dir()`.
    stamp: what identifies the source's content; default `source_stamp(source)`.
    line_kind: "line" if `line` is a 1-based file line, "row" if a 0-based row number.

  Raises:
    DataFormatError: malformed input, an empty corpus or a repeated passage id.
  """
  source = os.fspath(source)
  key = store_key(kind, source_stamp(source) if stamp is None else stamp)
  final = os.path.join(os.fspath(cache_dir or default_cache_dir()), key)

  several, lead = _process_role()

  def load() -> Corpus:
    if not os.path.exists(os.path.join(final, META_FILE)):
      _convert(final, source, _RowSource(key, make_rows), line_kind)
    try:
      return open_store(final)
    except DamagedStoreError as e:
      if several and not lead:  # process 0 set it aside and converted it already
        raise
      set_aside(final, f"is damaged ({e})", what="corpus store")
    _convert(final, source, _RowSource(key, make_rows), line_kind)
    return open_store(final)

  if not several:
    return load()
  from qdr_jax import distributed  # pylint: disable=g-import-not-at-top
  if lead:
    try:
      return load()
    finally:  # Even on an error, so that the others go on (and raise it themselves).
      distributed.barrier(f"qdr_jax corpus {key}")
  distributed.barrier(f"qdr_jax corpus {key}")
  return load()


def store_corpus(corpus: Corpus, source: str | os.PathLike, kind: str, *,
                 cache_dir: str | os.PathLike | None = None, stamp: Any = None) -> Corpus:
  """Puts an in-memory corpus built from `source` into the store (errors name rows)."""

  def make_rows() -> Iterator[Row]:
    row = 0
    for ids, titles, texts in corpus.chunks():
      for doc_id, title, text in zip(ids, titles, texts):
        yield {"id": doc_id, "title": title, "text": text, "line": row}
        row += 1

  return cached_corpus(source, kind, make_rows, cache_dir=cache_dir, stamp=stamp,
                       line_kind="row")
