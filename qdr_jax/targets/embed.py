"""Pipelined, data-parallel encoding of many texts: into memory (queries) or a resumable .npy (a corpus).

Texts are cut into windows (for a corpus: fixed chunks of global rows), tokenized once per
window in a background thread, sorted by length across the window and cut into batches
padded only to the next multiple of ``bucket`` tokens. Full batches have ``batch_size``
rows; a window's last batch is padded to a multiple of ``row_bucket`` rows only, so the
number of distinct shapes (compilations) stays small without encoding empty rows. Each
batch is split over this process's local devices, and batch i+1 is dispatched before batch
i's result is fetched, so tokenizing, writing and device work overlap.

A window's embeddings depend only on its texts and the batching (not on which process
computes it, nor on what ran before a restart), which is what makes ``embed_corpus``
resumable and its output the same bits for any number of processes with the same local
devices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import pathlib
import queue
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from qdr_jax import distributed
from qdr_jax.checksums import ALGORITHM, block_digest, set_aside, verify_table, write_sums
from qdr_jax.io_utils import write_text_atomic
from qdr_jax.models.staged import make_staged_apply, use_staged_forward
from qdr_jax.models.tokenization import LENGTH_BUCKET, passage_inputs
from qdr_jax.sharding import DATA_AXIS

ApplyFn = Callable[..., jax.Array]
# Batches tokenized ahead of the devices: enough to hide a window's tokenization behind
# the previous window's last batches, small enough to bound host memory.
_QUEUE_BATCHES = 16


def make_apply(module) -> ApplyFn:
  """``(params, input_ids, attention_mask, token_type_ids) -> (B, d)`` for a Flax encoder."""

  def apply(params, input_ids, attention_mask, token_type_ids):
    return module.apply({"params": params}, input_ids, attention_mask, token_type_ids)

  return apply


def make_corpus_apply(module) -> ApplyFn:
  """The jitted forward corpus embedding runs, ``make_apply``'s signature: on CPU the
  staged one (`qdr_jax.models.staged`, its attention core compiled apart), elsewhere one
  jitted graph."""
  if use_staged_forward():
    return make_staged_apply(module)
  return jax.jit(make_apply(module))


@dataclasses.dataclass(frozen=True)
class Batching:
  """How a window of texts becomes device batches.

  Attributes:
    max_length: truncation length in tokens.
    batch_size: rows of a full batch, over all local devices (rounded up to a multiple of
      the local device count).
    bucket: padded lengths are multiples of this (and at most ``max_length``).
    row_bucket: a window's last batch is padded to a multiple of this many rows.
  """
  max_length: int
  batch_size: int
  bucket: int = LENGTH_BUCKET
  row_bucket: int = 8


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def window_batches(tokenizer, texts: Sequence[str], pair_texts: Sequence[str] | None,
                   batching: Batching, num_devices: int
                   ) -> Iterator[tuple[np.ndarray, tuple[np.ndarray, ...]]]:
  """Tokenizes a window once and yields ``(rows, (input_ids, mask, token_types))`` batches.

  ``rows`` are window-relative row numbers, in increasing token length; the token arrays
  have at least ``rows.size`` rows (padding rows are all-pad and masked out).
  """
  if not len(texts):
    return
  enc = tokenizer(list(texts), list(pair_texts) if pair_texts is not None else None,
                  truncation=True, max_length=batching.max_length, padding=False,
                  return_attention_mask=False, return_token_type_ids=True)
  ids = enc["input_ids"]
  types = enc.get("token_type_ids") or [[0] * len(x) for x in ids]
  lengths = np.fromiter(map(len, ids), np.int64, len(ids))
  order = np.argsort(lengths, kind="stable")
  full = _round_up(batching.batch_size, num_devices)
  row_multiple = math.lcm(batching.row_bucket, num_devices)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  for start in range(0, order.size, full):
    rows = order[start:start + full]
    height = full if rows.size == full else min(full, _round_up(rows.size, row_multiple))
    longest = int(lengths[rows].max())
    width = min(_round_up(longest, batching.bucket), max(batching.max_length, longest))
    input_ids = np.full((height, width), pad_id, np.int32)
    mask = np.zeros((height, width), np.int32)
    token_types = np.zeros((height, width), np.int32)
    for r, i in enumerate(rows):
      n = lengths[i]
      input_ids[r, :n] = ids[i]
      mask[r, :n] = 1
      token_types[r, :n] = types[i]
    yield rows, (input_ids, mask, token_types)


class _Prefetch:
  """Runs an iterator in a daemon thread behind a bounded queue.

  Errors in the thread are re-raised in the consumer; closing (also on the consumer's
  errors) stops the thread at its next item.
  """
  _END = object()

  def __init__(self, items: Iterable[Any], maxsize: int = _QUEUE_BATCHES):
    self._queue: queue.Queue = queue.Queue(maxsize)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, args=(items,), daemon=True)
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def _run(self, items):
    try:
      for item in items:
        if not self._put(item):
          return
      self._put(self._END)
    except BaseException as e:  # re-raised by the consumer  # pylint: disable=broad-except
      self._put(e)

  def __iter__(self):
    while True:
      item = self._queue.get()
      if item is self._END:
        return
      if isinstance(item, BaseException):
        raise item
      yield item

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()


def local_mesh() -> Mesh:
  """A 1-D mesh over this process's own devices: embedding needs no other process."""
  return Mesh(np.asarray(jax.local_devices()), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def _windows(tokenizer, windows: Iterable[tuple[Any, Sequence[str], Sequence[str] | None]],
             batching: Batching, num_devices: int):
  for key, texts, pairs in windows:
    for rows, tokens in window_batches(tokenizer, texts, pairs, batching, num_devices):
      yield key, rows, tokens


def _encode_stream(encode: Callable, params: Any, batches: Iterable, mesh: Mesh
                   ) -> Iterator[tuple[Any, np.ndarray, np.ndarray]]:
  """``(key, rows, embeddings)`` per batch; batch i is fetched after batch i+1 is dispatched."""
  params = jax.device_put(params, NamedSharding(mesh, P()))
  split = NamedSharding(mesh, P(DATA_AXIS))
  pending = None
  for key, rows, tokens in batches:
    out = encode(params, *(jax.device_put(t, split) for t in tokens))
    if pending is not None:
      yield pending[0], pending[1], np.asarray(pending[2], np.float32)[:pending[1].size]
    pending = (key, rows, out)
  if pending is not None:
    yield pending[0], pending[1], np.asarray(pending[2], np.float32)[:pending[1].size]


def embed_texts(apply_fn: ApplyFn | None, params: Any, tokenizer, texts: Sequence[str], *,
                pair_texts: Sequence[str] | None = None, max_length: int, batch_size: int,
                bucket: int = LENGTH_BUCKET, row_bucket: int = 8, chunk_size: int = 4096,
                desc: str = "embed", progress: bool = True,
                jitted: Callable | None = None) -> np.ndarray:
  """Encodes ``texts`` (optionally as sentence pairs) into a float32 (N, d) array.

  Args:
    apply_fn: encoder apply function (see ``make_apply``); jitted here unless ``jitted``
      (an already-jitted version, to share compilations between calls) is given.
    params: encoder parameters.
    tokenizer: a Hugging Face (fast) tokenizer.
    texts: first segments; ``pair_texts`` second segments or None.
    max_length, batch_size, bucket, row_bucket: see ``Batching``.
    chunk_size: texts tokenized and length-sorted together (one window).
  """
  encode = jitted or jax.jit(apply_fn)
  n = len(texts)
  if not n:
    raise ValueError("embed_texts got no texts.")
  batching = Batching(max_length, batch_size, bucket, row_bucket)
  mesh = local_mesh()
  windows = ((start, texts[start:start + chunk_size],
              pair_texts[start:start + chunk_size] if pair_texts is not None else None)
             for start in range(0, n, chunk_size))
  out: np.ndarray | None = None
  bar = tqdm(total=n, desc=desc, unit="text", disable=not progress, leave=False)
  with _Prefetch(_windows(tokenizer, windows, batching, mesh.devices.size)) as batches:
    for start, rows, emb in _encode_stream(encode, params, batches, mesh):
      if out is None:
        out = np.empty((n, emb.shape[1]), dtype=np.float32)
      out[start + rows] = emb
      bar.update(rows.size)
  bar.close()
  return out


# ---- Corpus embedding into a resumable .npy ------------------------------------------


def _sync(name: str) -> None:
  distributed.barrier(name)


def partial_path(path: pathlib.Path) -> pathlib.Path:
  """Where ``embed_corpus`` writes until every chunk is done."""
  return path.with_name(path.name + ".partial")


def _manifests(path: pathlib.Path) -> list[pathlib.Path]:
  return sorted(path.parent.glob(f"{path.name}.done-p*.json"))


def _manifest_path(path: pathlib.Path, process: int) -> pathlib.Path:
  return path.with_name(f"{path.name}.done-p{process}.json")


def _read_manifest_sums(file: pathlib.Path, spec: dict) -> dict[int, str] | None:
  """Checksum of each chunk a manifest records as done, or None if it is unreadable or
  for another layout."""
  try:
    data = json.loads(file.read_text())
  except (OSError, ValueError):
    return None
  if not isinstance(data, dict) or {k: data.get(k) for k in spec} != spec:
    return None
  sums = data.get("sums", {})
  return {int(c): sums[str(c)] for c in data.get("done", []) if str(c) in sums}


def _read_manifest(file: pathlib.Path, spec: dict) -> set[int] | None:
  """The chunks a manifest records, or None if it is unreadable or for another layout."""
  sums = _read_manifest_sums(file, spec)
  return None if sums is None else set(sums)


def _chunk_sums(path: pathlib.Path, spec: dict) -> dict[int, str]:
  """Every process's recorded chunks and their checksums."""
  sums: dict[int, str] = {}
  for file in _manifests(path):
    sums.update(_read_manifest_sums(file, spec) or {})
  return sums


def _done_chunks(path: pathlib.Path, spec: dict) -> set[int]:
  return set(_chunk_sums(path, spec))


def _prepare(path: pathlib.Path, rows: int, dim: int, spec: dict) -> None:
  """Lead process: a partial file of the right shape, and only manifests that match it."""
  partial = partial_path(path)
  ok = False
  if partial.exists():
    try:
      ok = np.load(partial, mmap_mode="r", allow_pickle=False).shape == (rows, dim)
    except (OSError, ValueError):
      ok = False
  stale = [f for f in _manifests(path) if not ok or _read_manifest(f, spec) is None]
  for file in stale:
    file.unlink()
  if not ok:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Writes the header and sizes the (sparse) file once, before any process writes rows.
    created = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(rows, dim))
    created.flush()
    del created


@contextlib.contextmanager
def _exclusive(lock_path: pathlib.Path, take: bool) -> Iterator[None]:
  """Holds an exclusive ``flock`` on ``lock_path`` if ``take`` (released on exit or death)."""
  if not take:
    yield
    return
  lock_path.parent.mkdir(parents=True, exist_ok=True)
  with open(lock_path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


class _ChunkWriter:
  """Writes a process's rows into the shared table; records each chunk once it is whole.

  A chunk is gathered in a buffer and written with one positioned write (``os.pwrite``)
  when complete, not through a memory map: the rows written then live in the kernel's page
  cache, not in this process's resident memory, which stays at one chunk whatever the
  table's size.
  """

  def __init__(self, partial: pathlib.Path, path: pathlib.Path, process: int, spec: dict,
               on_chunk: Callable[[int], None] | None):
    header = np.lib.format.open_memmap(partial, mode="r")
    self.offset, self.dim = int(header.offset), int(header.shape[1])
    del header
    self.fd = os.open(partial, os.O_WRONLY)
    self.spec, self.on_chunk = spec, on_chunk
    self.manifest = _manifest_path(path, process)
    self.sums = _read_manifest_sums(self.manifest, spec) or {}
    self.partial = partial
    self.buffers: dict[int, tuple[np.ndarray, int]] = {}  # chunk -> (rows, rows written)
    self.computed = 0

  def __call__(self, chunk: int, first_row: int, rows: np.ndarray, emb: np.ndarray,
               chunk_size: int) -> None:
    buffer, written = self.buffers.get(chunk, (None, 0))
    if buffer is None:
      buffer = np.empty((chunk_size, self.dim), np.float32)
    buffer[rows - first_row] = emb
    written += rows.size
    if written < chunk_size:
      self.buffers[chunk] = (buffer, written)
      return
    self.buffers.pop(chunk, None)
    if not np.isfinite(buffer).all():
      # A NaN table would poison every later run that reads the cache.
      bad = first_row + np.flatnonzero(~np.isfinite(buffer).all(axis=1))
      raise FloatingPointError(
          f"{self.partial}: the passage encoder gave NaN or infinite vectors for "
          f"{bad.size} rows (rows {', '.join(map(str, bad[:5]))}"
          f"{', ...' if bad.size > 5 else ''}); nothing of them is cached")
    os.pwrite(self.fd, buffer.tobytes(), self.offset + first_row * self.dim * 4)
    os.fsync(self.fd)  # the rows reach the file before the manifest says they did
    self.sums[chunk] = block_digest(buffer)
    write_text_atomic(self.manifest, json.dumps(
        {**self.spec, "done": sorted(self.sums),
         "sums": {str(c): d for c, d in sorted(self.sums.items())}}))
    self.computed += 1
    if self.on_chunk is not None:
      self.on_chunk(chunk)

  def close(self) -> None:
    os.close(self.fd)


# An adapted chunk size cuts a corpus into at least this many chunks (resumption keeps
# all but the one in progress) and holds at most _MAX_CHUNK_ROWS rows (bounded memory).
_MIN_CHUNKS = 16
_MAX_CHUNK_ROWS = 16384


def resumable_chunk_rows(rows: int, configured: int, batch_size: int) -> int:
  """Rows per chunk of ``embed_corpus``: ``configured`` when > 0, else adapted to the
  corpus: at least ``_MIN_CHUNKS`` chunks of whole batches, at most ``_MAX_CHUNK_ROWS``
  rows (a fixed large chunk would make a corpus smaller than it restart from zero)."""
  if configured > 0:
    return configured
  return max(1, min(_MAX_CHUNK_ROWS, _round_up(-(-rows // _MIN_CHUNKS), batch_size)))


def chunk_block(num_chunks: int, process: int, count: int) -> range:
  """The contiguous block of chunks (so of rows) that ``process`` of ``count`` embeds."""
  return range(process * num_chunks // count, (process + 1) * num_chunks // count)


def embed_corpus(encode: Callable, params: Any, tokenizer, corpus, path: str | os.PathLike,
                 *, batching: Batching, passage_style: str, chunk_rows: int,
                 progress: bool = True,
                 on_chunk: Callable[[int], None] | None = None) -> dict:
  """Embeds every passage of ``corpus`` into the float32 (N, d) ``.npy`` at ``path``.

  Rows are cut into chunks of ``chunk_rows`` global rows; each JAX process embeds its own
  contiguous block of chunks on its local devices and writes them into one shared
  memory-mapped file, ``path + ".partial"`` (its header written by process 0 before anyone
  writes, so no process ever holds more than a batch of the table and nothing is copied
  at the end). After each chunk is flushed, the process records it in its JSON manifest
  (atomic writes); a rerun skips the recorded chunks. When every process is done (a
  barrier), process 0 checks all chunks are recorded and renames the file to ``path``, so
  ``path`` only ever holds a complete table. All processes must call this; the cache
  directory must be shared by them.

  Args:
    encode: jitted ``(params, input_ids, attention_mask, token_type_ids) -> (B, d)``.
    params: encoder parameters (host or local arrays).
    tokenizer: Hugging Face fast tokenizer.
    corpus: has ``titles``/``texts`` sliceable by row ranges (read one chunk at a time).
    path: the final ``.npy`` path.
    batching: batch shapes (see ``Batching``).
    passage_style: ``concat`` or ``pair`` (see ``passage_inputs``).
    chunk_rows: rows per chunk: the unit of resumption and of length sorting.
    progress: show a progress bar (on process 0 only).
    on_chunk: called with a chunk's number once it is recorded (tests).

  Returns:
    ``{"rows", "dim", "chunks", "computed", "computed_rows", "skipped", "seconds",
    "cached"}``: ``computed`` (``computed_rows``) counts the chunks (rows) this process
    embedded in this call, ``skipped`` its chunks found done; ``cached`` says another job
    completed the table while this one waited for it.
  """
  path = pathlib.Path(path)
  rows = len(corpus)
  if rows == 0:
    raise ValueError("embed_corpus got an empty corpus.")
  if chunk_rows < 1:
    raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}.")
  mesh = local_mesh()
  devices = mesh.devices.size
  probe = jax.ShapeDtypeStruct((math.lcm(batching.row_bucket, devices), batching.bucket),
                               np.int32)
  dim = int(jax.eval_shape(encode, params, probe, probe, probe).shape[-1])
  num_chunks = -(-rows // chunk_rows)
  # A resumed run must cut the same batches, or its chunks would differ in the last bits.
  spec = {"rows": rows, "dim": dim, "chunk_rows": chunk_rows, **dataclasses.asdict(batching),
          "checksum": ALGORITHM}
  process, count = jax.process_index(), jax.process_count()
  block = chunk_block(num_chunks, process, count)
  stats = {"rows": rows, "dim": dim, "chunks": num_chunks, "computed": 0,
           "computed_rows": 0, "skipped": len(block), "seconds": 0.0, "cached": False}
  # One job at a time per table: another job sharing the cache waits, then finds it done.
  with _exclusive(path.with_name(path.name + ".lock"), process == 0):
    if process == 0 and path.exists() and (problem := verify_table(path)) is not None:
      set_aside(path, problem)
    if process == 0 and not path.exists():
      _prepare(path, rows, dim, spec)
    _sync(f"embed_corpus open {path.name}")
    if path.exists():  # completed by another job while this one waited for the lock
      return {**stats, "cached": True}
    partial = partial_path(path)
    if not partial.exists():
      raise FileNotFoundError(f"{partial}: process 0 created it but process {process} cannot "
                              "see it; the table cache directory must be shared by all "
                              "processes.")
    done = _done_chunks(path, spec)
    todo = [c for c in block if c not in done]
    start_time = time.perf_counter()
    write_chunks = _ChunkWriter(partial, path, process, spec, on_chunk)
    sizes = {c: min(chunk_rows, rows - c * chunk_rows) for c in block}

    def windows():
      for c in todo:
        start, stop = c * chunk_rows, c * chunk_rows + sizes[c]
        texts, pairs = passage_inputs(corpus.titles[start:stop], corpus.texts[start:stop],
                                      passage_style)
        yield c, texts, pairs

    bar = tqdm(total=sum(sizes.values()), initial=sum(sizes[c] for c in block if c in done),
               desc="corpus", unit="passage", disable=not progress or process != 0)
    with _Prefetch(_windows(tokenizer, windows(), batching, devices)) as batches:
      try:
        for c, chunk_row_ids, emb in _encode_stream(encode, params, batches, mesh):
          write_chunks(c, c * chunk_rows, c * chunk_rows + chunk_row_ids, emb, sizes[c])
          bar.update(chunk_row_ids.size)
      finally:
        write_chunks.close()
    bar.close()
    stats.update(computed=write_chunks.computed, skipped=len(block) - len(todo),
                 computed_rows=sum(sizes[c] for c in todo),
                 seconds=time.perf_counter() - start_time)
    _sync(f"embed_corpus written {path.name}")
    # Every process checks, so that all of them fail together rather than wait for process 0.
    sums = _chunk_sums(path, spec)
    missing = sorted(set(range(num_chunks)) - set(sums))
    if missing:
      raise RuntimeError(f"{partial}: chunks {missing[:10]} of {num_chunks} are not recorded "
                         "as done after every process finished.")
    _sync(f"embed_corpus checked {path.name}")
    if process == 0:
      # The record before the table: a table on disk always has its checksums.
      write_sums(path, (rows, dim), np.float32, chunk_rows, sums)
      os.replace(partial, path)
      for file in _manifests(path):
        file.unlink()
    _sync(f"embed_corpus renamed {path.name}")
  return stats
