"""Block checksums of the ``.npy`` tables the library caches, recorded when a table is
written and verified before it is used again.

A cached table is trusted by every later run; a few rows overwritten on disk (all values
still finite) would train and evaluate on wrong vectors without any other sign. The data
after the ``.npy`` header is cut into blocks of ``block_rows`` rows, each hashed with
xxh3-64 as it is written; the digests, the shape and the dtype live in a JSON file beside
the table (`sums_path`). `verify_table` reads the file once, block by block (a bounded
buffer, not a memory map), and names what differs: a missing or unreadable record, a
header or a size that does not match it, the blocks whose bytes changed.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from collections.abc import Mapping, Sequence

import numpy as np
import xxhash
from absl import logging

from qdr_jax.io_utils import write_json_atomic

ALGORITHM = "xxh3_64"
# Rows per block when the writer does not choose (a table written whole, not by chunks).
DEFAULT_BLOCK_ROWS = 16384


def sums_path(path: str | os.PathLike) -> pathlib.Path:
  """The checksum record of the table at ``path``."""
  path = pathlib.Path(path)
  return path.with_name(path.name + ".xxh3.json")


def block_digest(rows: np.ndarray) -> str:
  """xxh3-64 hex digest of a block's bytes (C order)."""
  return xxhash.xxh3_64_hexdigest(np.ascontiguousarray(rows).data)


def array_sums(array: np.ndarray, block_rows: int = DEFAULT_BLOCK_ROWS) -> list[str]:
  """The digest of each ``block_rows`` rows of ``array``."""
  return [block_digest(array[start:start + block_rows])
          for start in range(0, array.shape[0], block_rows)]


def write_sums(path: str | os.PathLike, shape: Sequence[int], dtype: np.dtype,
               block_rows: int, blocks: Sequence[str] | Mapping[int, str]) -> None:
  """Records ``blocks`` (a list, or a mapping block number -> digest covering every
  block) as the checksums of the table at ``path``."""
  count = -(-int(shape[0]) // block_rows)
  if isinstance(blocks, Mapping):
    blocks = [blocks[i] for i in range(count)]
  if len(blocks) != count:
    raise ValueError(f"{path}: {len(blocks)} block checksums for {count} blocks")
  write_json_atomic(sums_path(path), {
      "algorithm": ALGORITHM, "shape": [int(s) for s in shape],
      "dtype": np.dtype(dtype).str, "block_rows": int(block_rows), "blocks": list(blocks)})


def save_table_with_sums(path: str | os.PathLike, array: np.ndarray,
                         block_rows: int = DEFAULT_BLOCK_ROWS) -> None:
  """Writes ``array`` as ``.npy`` at ``path`` (absent or complete) and its checksums,
  the record first, so that the table never exists without one."""
  from qdr_jax.io_utils import atomic_path  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  array = np.ascontiguousarray(array)
  write_sums(path, array.shape, array.dtype, block_rows, array_sums(array, block_rows))
  with atomic_path(path) as tmp, open(tmp, "wb") as f:
    np.save(f, array, allow_pickle=False)


def verify_table(path: str | os.PathLike, buffer_bytes: int = 64 << 20) -> str | None:
  """What is wrong with the table at ``path`` against its checksum record; None if
  every block matches.

  Reads the whole file once (blocks of the record's size, at most ``buffer_bytes`` at a
  time); never unpickles.
  """
  path = pathlib.Path(path)
  record_path = sums_path(path)
  try:
    record = json.loads(record_path.read_text())
    shape, dtype = tuple(record["shape"]), np.dtype(record["dtype"])
    block_rows, blocks = int(record["block_rows"]), list(record["blocks"])
    if record.get("algorithm") != ALGORITHM or block_rows < 1 or len(shape) != 2:
      raise ValueError("unknown layout")
  except FileNotFoundError:
    return f"has no checksum record ({record_path.name})"
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"its checksum record {record_path.name} is unreadable ({e})"
  try:
    with open(path, "rb") as f:
      version = np.lib.format.read_magic(f)
      read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                     else np.lib.format.read_array_header_2_0)
      header_shape, fortran, header_dtype = read_header(f)
      offset = f.tell()
  except (OSError, ValueError) as e:
    return f"is not a readable .npy file ({e})"
  if tuple(header_shape) != shape or header_dtype != dtype or fortran:
    return (f"its header says {header_dtype} {tuple(header_shape)}, its checksum record "
            f"{dtype} {shape}")
  row_bytes = int(shape[1]) * dtype.itemsize
  expected = offset + int(shape[0]) * row_bytes
  size = os.path.getsize(path)
  if size != expected:
    return f"has {size} bytes, {expected} expected (truncated or extended)"
  if len(blocks) != -(-int(shape[0]) // block_rows):
    return f"its checksum record {record_path.name} has {len(blocks)} blocks"
  bad = []
  step = max(1, min(block_rows, buffer_bytes // max(row_bytes, 1)))
  buffer = bytearray(step * row_bytes)
  view = memoryview(buffer)
  with open(path, "rb") as f:
    f.seek(offset)
    for b, digest in enumerate(blocks):
      rows = min(block_rows, int(shape[0]) - b * block_rows)
      hasher = xxhash.xxh3_64()
      while rows > 0:
        n = min(step, rows) * row_bytes
        if f.readinto(view[:n]) != n:
          return "ended early while it was read"
        hasher.update(view[:n])
        rows -= n // row_bytes
      if hasher.hexdigest() != digest:
        bad.append(b)
  if bad:
    listed = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
    return (f"{len(bad)} of {len(blocks)} blocks of {block_rows} rows differ from the "
            f"checksums recorded when it was written (blocks {listed})")
  return None


def file_digest(path: str | os.PathLike, buffer_bytes: int = 16 << 20) -> str:
  """xxh3-64 hex digest of a whole file, read in bounded blocks."""
  hasher = xxhash.xxh3_64()
  buffer = bytearray(buffer_bytes)
  view = memoryview(buffer)
  with open(path, "rb") as f:
    while n := f.readinto(view):
      hasher.update(view[:n])
  return hasher.hexdigest()


def set_aside(path: str | os.PathLike, problem: str, what: str = "cached table"
              ) -> pathlib.Path:
  """Renames a damaged cache entry (a table and its record, or a directory) out of the
  way, with one warning naming it; the caller rebuilds it. Nothing is deleted: the user
  may want to look at it."""
  path = pathlib.Path(path)
  aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
  n = 1
  while aside.exists():
    aside = aside.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}-{n}")
    n += 1
  os.replace(path, aside)
  record = sums_path(path)
  if record.exists():
    os.replace(record, sums_path(aside))
  logging.warning("%s %s %s; moved it to %s and rebuilding it", what, path, problem,
                  aside.name)
  return aside
