"""File outputs that are all or nothing, and the workdir lock of a run.

Atomic writes: a path is either absent, its old content, or complete; a full disk or a
crash midway never leaves a truncated file. The lock: one run at a time per workdir.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pathlib
import tempfile
from typing import Any, Iterator

LOCK_FILE = ".lock"


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


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 1) -> None:
  """``obj`` as JSON, atomically. Serialised before the file is opened, so an object
  JSON cannot hold fails without touching the disk."""
  write_text_atomic(path, json.dumps(obj, indent=indent))


def save_figure_atomic(fig, path: str | os.PathLike, **savefig_kwargs) -> None:
  """``fig.savefig`` to ``path`` atomically; the format comes from ``path``'s suffix (the
  temp file's own suffix would not tell matplotlib)."""
  fmt = pathlib.Path(path).suffix.lstrip(".") or None
  with atomic_path(path) as tmp, open(tmp, "wb") as f:
    fig.savefig(f, format=fmt, **savefig_kwargs)


def check_writable_dir(path: str | os.PathLike) -> None:
  """Refuses, before any work, a directory a run could not create or write: an existing
  file in its place (or in a parent's), a read-only or unwritable parent. Creates nothing.

  Raises:
    NotADirectoryError, PermissionError: naming the path.
  """
  path = pathlib.Path(os.path.abspath(os.fspath(path)))
  existing = path
  while not existing.exists() and existing.parent != existing:
    existing = existing.parent
  if not existing.is_dir():
    where = "" if existing == path else f" (for {path})"
    raise NotADirectoryError(errno.ENOTDIR, f"exists and is not a directory{where}",
                             str(existing))
  if not os.access(existing, os.W_OK | os.X_OK):
    # access() reports a read-only mount (EROFS) as well as missing permissions.
    raise PermissionError(errno.EACCES, "not writable (read-only file system or no write "
                          f"permission){'' if existing == path else f' to create {path}'}",
                          str(existing))


class WorkdirLockedError(RuntimeError):
  """Another live process holds the workdir's lock."""

  def __init__(self, workdir: str | os.PathLike, pid: str):
    self.workdir, self.pid = os.fspath(workdir), pid
    super().__init__(
        f"workdir {self.workdir} is in use by another run (pid {pid}, lock "
        f"{os.path.join(self.workdir, LOCK_FILE)}): wait for it to finish or choose another "
        "workdir.")


@contextlib.contextmanager
def workdir_lock(workdir: str | os.PathLike, *, enabled: bool = True) -> Iterator[None]:
  """Holds an exclusive ``flock`` on ``{workdir}/.lock`` (holding this process's pid)
  while the block runs; a second holder is refused with ``WorkdirLockedError`` naming
  the first's pid.

  The kernel drops a ``flock`` when its process dies, so a crashed or killed run never
  leaves a stale lock; the file itself stays (removing it would race with a new holder).
  ``enabled=False`` (processes other than 0 of a multi-process job) takes nothing.
  """
  if not enabled:
    yield
    return
  path = os.path.join(os.fspath(workdir), LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise
      # The holder writes its pid just after locking: an empty file is a lock just taken.
      holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
      raise WorkdirLockedError(workdir, holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    try:
      yield
    finally:
      os.ftruncate(fd, 0)  # no pid of a finished run left behind
  finally:
    os.close(fd)  # releases the flock
