"""FAISS index files: write one atomically, read one back with a clear error."""

from __future__ import annotations

import os

import faiss

from qdr_jax.io_utils import atomic_path


def save_index(index: faiss.Index, path: str | os.PathLike) -> None:
  """Writes `index` to `path` atomically: a temp file in the same directory, then os.replace.

  A failed write leaves neither a partial file nor a changed `path`.
  """
  with atomic_path(path) as tmp:
    faiss.write_index(index, tmp)


def load_index(path: str | os.PathLike, *, mmap: bool = False) -> faiss.Index:
  """Reads an index written by `save_index` (or any FAISS index file).

  Args:
    path: the index file.
    mmap: memory-map the file instead of reading it (large flat indexes).

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file is not a readable FAISS index (truncated, corrupt, other format).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"FAISS index file not found: {path}")
  flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
  try:
    return faiss.read_index(path, flags)
  except RuntimeError as e:
    detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    raise ValueError(f"{path}: not a readable FAISS index ({detail})") from e
