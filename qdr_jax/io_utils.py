"""Atomic file writes: a path is either absent, its old content, or complete."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
  """Yields a temp path beside ``path``; on success it is fsynced and renamed onto ``path``.

  Any exception removes the temp file and leaves ``path`` untouched, so a crash or a
  failed write never leaves a half-written file behind.
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  os.close(fd)
  try:
    os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; results are meant to be shared.
    yield tmp
    with open(tmp, "rb") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
