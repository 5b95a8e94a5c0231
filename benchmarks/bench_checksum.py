r"""Seconds to record and to verify the block checksums of a cached table.

  python benchmarks/bench_checksum.py --rows=1000000 --dim=384

Writes a random float32 (rows, dim) table into a temporary directory with its checksums
(`qdr_jax.checksums.save_table_with_sums`), then times, separately: hashing the table in
memory (what the writer adds), `verify_table` with the file in the page cache (a rerun
soon after), the plain ``np.save`` of the same array for scale, and, unless --no_cold,
`verify_table` after the file was evicted from the page cache (``posix_fadvise``
DONTNEED; a cold start, bound by the disk). Prints JSON.
"""

import json
import os
import pathlib
import tempfile
import time

import numpy as np
from absl import app, flags

from qdr_jax.checksums import DEFAULT_BLOCK_ROWS, array_sums, save_table_with_sums, verify_table

_ROWS = flags.DEFINE_integer("rows", 1_000_000, "Table rows.")
_DIM = flags.DEFINE_integer("dim", 384, "Table dimension.")
_BLOCK_ROWS = flags.DEFINE_integer("block_rows", DEFAULT_BLOCK_ROWS, "Rows per checksum block.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timings per measure (the best is kept).")
_COLD = flags.DEFINE_bool("cold", True, "Also time a verification after evicting the file.")


def _best(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def _evict(path: pathlib.Path) -> None:
  with open(path, "rb") as f:
    os.fsync(f.fileno())
    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def main(argv):
  del argv
  rows, dim, block_rows = _ROWS.value, _DIM.value, _BLOCK_ROWS.value
  table = np.random.default_rng(0).standard_normal((rows, dim), dtype=np.float32)
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "table.npy"
    start = time.perf_counter()
    save_table_with_sums(path, table, block_rows)
    write_s = time.perf_counter() - start
    hash_s = _best(lambda: array_sums(table, block_rows), _REPEATS.value)
    plain_s = _best(lambda: np.save(pathlib.Path(tmp) / "plain.npy", table), 1)
    assert verify_table(path) is None
    warm_s = _best(lambda: verify_table(path), _REPEATS.value)
    cold_s = None
    if _COLD.value:
      _evict(path)
      start = time.perf_counter()
      assert verify_table(path) is None
      cold_s = time.perf_counter() - start
  gib = table.nbytes / 2**30
  print(json.dumps({
      "rows": rows, "dim": dim, "block_rows": block_rows, "gib": round(gib, 3),
      "hash_in_memory_s": round(hash_s, 3), "save_with_sums_s": round(write_s, 3),
      "plain_np_save_s": round(plain_s, 3), "verify_page_cache_s": round(warm_s, 3),
      "verify_cold_s": None if cold_s is None else round(cold_s, 3),
      "hash_gib_per_s": round(gib / hash_s, 2)}, indent=1))


if __name__ == "__main__":
  app.run(main)
