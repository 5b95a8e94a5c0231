"""The index lifecycle: streamed builds equal one-shot builds, concurrent seed builds equal
sequential ones and the first index can be adopted from them, incremental refreshes touch
only the moved rows (in FAISS and on the devices), unchanged tables are not rebuilt."""

import faiss
import jax
import numpy as np
import pytest

from qdr_jax import sharding
from qdr_jax.config import base_config
from qdr_jax.index import lifecycle as index_lifecycle
from qdr_jax.index.build import build_quantized, build_quantized_seeds
from qdr_jax.index.lifecycle import IndexLifecycle, encoded_like_index, pq_codebook_shape
from qdr_jax.index.searching import search
from qdr_jax.quant import stored_codes

ROWS, DIM = 3000, 32


@pytest.fixture(autouse=True)
def _small_stream_chunks(monkeypatch):
  monkeypatch.setattr(index_lifecycle, "STREAM_ROWS", 700)  # several chunks, the last one short


def _index_cfg(factory="IVF16,PQ8x8", **overrides):
  c = base_config().index
  c.factory = factory
  c.nprobe = 4
  c.rebuild_every = 5
  c.full_rebuild_every = 10
  for name, value in overrides.items():
    c[name] = value
  return c


def _table(seed=0):
  x = np.random.default_rng(seed).standard_normal((ROWS, DIM)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _lifecycle(cfg, *, quantize=True, codes_from_index=True, learn_index=False):
  mesh = sharding.make_mesh(base_config().sharding)
  return IndexLifecycle(cfg, mesh=mesh, num_rows=ROWS,
                        padded_rows=sharding.padded_rows(ROWS, mesh), quantize=quantize,
                        codes_from_index=codes_from_index, learn_index=learn_index), mesh


def _device_codes(lifecycle):
  return {name: np.asarray(jax.device_get(a))[:ROWS]
          for name, a in lifecycle.loss_inputs.codes.items()}


@pytest.mark.parametrize("factory", ["IVF16,PQ8x8", "OPQ8,IVF16,PQ8x8", "IVF16_HNSW8,PQ8x8"])
def test_streamed_build_equals_one_shot_build(factory):
  table = _table()
  cfg = _index_cfg(factory, train_size=2000)
  lifecycle, mesh = _lifecycle(cfg)
  device_table = sharding.put_rows(table, mesh, True, ROWS)
  lifecycle.build(device_table)
  reference = build_quantized(table, cfg, cfg.seed)
  queries = _table(1)[:50]
  for got, want in zip(search(lifecycle.index, queries, 20), search(reference, queries, 20)):
    np.testing.assert_array_equal(got, want)
  codes, lists = stored_codes(reference)
  device = _device_codes(lifecycle)
  np.testing.assert_array_equal(device["codes"], codes)
  np.testing.assert_array_equal(device["lists"], lists)


def _bytes(index) -> np.ndarray:
  return faiss.serialize_index(index)


@pytest.mark.parametrize("factory", ["IVF16,PQ8x8", "OPQ8,IVF16,PQ8x8"])
def test_evaluation_builds_from_the_devices_equal_host_builds(factory):
  """`built_index` with any seed (the evaluation's index seeds) over the device table,
  alone or built two at a time (`built_indexes`), is `build_quantized` of the host table
  with that seed, byte for byte, and leaves the run's own index alone."""
  table = _table()
  cfg = _index_cfg(factory, train_size=2000, seed=1)
  lifecycle, mesh = _lifecycle(cfg, quantize=False)
  device_table = sharding.put_rows(table, mesh, True, ROWS)
  seeds = [0, 2, 3]
  one_by_one = [_bytes(lifecycle.built_index(device_table, seed)) for seed in seeds]
  together = [_bytes(index) for index in lifecycle.built_indexes(device_table, seeds, 2)]
  assert lifecycle.index is None
  for seed, alone, grouped in zip(seeds, one_by_one, together):
    want = _bytes(build_quantized(table, cfg, seed))
    np.testing.assert_array_equal(alone, want)
    np.testing.assert_array_equal(grouped, want)
  assert not np.array_equal(one_by_one[0], one_by_one[1])  # the seed is used: can fail


# OPQ's rotation depends on the thread count: its seeds are built one after another.
@pytest.mark.parametrize("factory", ["IVF16,PQ8x8", "OPQ8,IVF16,PQ8x8", "PQ8x8"])
def test_concurrent_seed_builds_equal_sequential_builds(factory):
  table = _table()
  cfg = _index_cfg(factory, train_size=2000)
  seeds = [0, 1, 2]
  threads = faiss.omp_get_max_threads()
  concurrent = list(build_quantized_seeds(table, cfg, seeds, concurrent=3))
  assert faiss.omp_get_max_threads() == threads  # the workers set only their own
  for seed, index in zip(seeds, concurrent):
    np.testing.assert_array_equal(_bytes(index), _bytes(build_quantized(table, cfg, seed)))
  # Different seeds, different indexes: the comparison above can fail.
  assert not np.array_equal(_bytes(concurrent[0]), _bytes(concurrent[1]))


def test_adopting_the_evaluation_build_equals_building_the_first_index():
  table = _table()
  cfg = _index_cfg("IVF16,PQ8x8", train_size=2000, seed=1)
  built, _ = _lifecycle(cfg)
  built.build(table)
  adopted, _ = _lifecycle(cfg)
  evaluation_builds = list(build_quantized_seeds(table, cfg, [0, 1, 2], concurrent=3))
  adopted.adopt(evaluation_builds[1], moved_since=False)
  np.testing.assert_array_equal(_bytes(adopted.index), _bytes(built.index))
  for name, codes in _device_codes(built).items():
    np.testing.assert_array_equal(_device_codes(adopted)[name], codes)
  assert not len(adopted.changed)  # nothing to re-encode at the first refresh
  with pytest.raises(ValueError, match="holds 2999 rows, the table 3000"):
    _lifecycle(cfg)[0].adopt(build_quantized(table[:-1], cfg, 1), moved_since=False)


def test_incremental_refresh_touches_only_moved_rows():
  table = _table()
  cfg = _index_cfg()
  lifecycle, mesh = _lifecycle(cfg)
  device_table = sharding.put_rows(table, mesh, True, ROWS)
  lifecycle.build(device_table)
  before = _device_codes(lifecycle)

  moved = np.sort(np.random.default_rng(1).choice(ROWS, 150, replace=False))
  new_table = table.copy()
  new_table[moved] = -new_table[moved]  # far enough to change codes and lists
  device_table = sharding.put_rows(new_table, mesh, True, ROWS)
  lifecycle.note_updated(moved)
  assert lifecycle.maybe_refresh(4, device_table) is None  # not due
  assert lifecycle.maybe_refresh(5, device_table) == "incremental"
  assert lifecycle.history[-1].rows == moved.size  # only the moved rows were re-encoded

  after = _device_codes(lifecycle)
  untouched = np.setdiff1d(np.arange(ROWS), moved)
  for name in ("codes", "lists"):
    np.testing.assert_array_equal(after[name][untouched], before[name][untouched])
  assert (after["lists"][moved] != before["lists"][moved]).mean() > 0.5
  # The devices hold exactly what FAISS now stores, for every row.
  codes, lists = stored_codes(lifecycle.index)
  np.testing.assert_array_equal(after["codes"], codes)
  np.testing.assert_array_equal(after["lists"], lists)
  # ...which is what a fresh add of the new table to the same quantizer stores.
  want_codes, want_lists = encoded_like_index(lifecycle.index, new_table)
  np.testing.assert_array_equal(codes, want_codes)
  np.testing.assert_array_equal(lists, want_lists)


def test_unchanged_table_is_not_rebuilt():
  table = _table()
  lifecycle, mesh = _lifecycle(_index_cfg(), quantize=False)
  device_table = sharding.put_rows(table, mesh, True, ROWS)
  lifecycle.build(device_table)
  index = lifecycle.index
  assert lifecycle.maybe_refresh(5, device_table) == "skipped"
  assert lifecycle.maybe_refresh(10, device_table) == "skipped"  # a full one too
  assert lifecycle.index is index and lifecycle.loss_inputs.quantizer is None


def test_full_refresh_retrains_and_clears_moved_rows():
  table = _table()
  lifecycle, mesh = _lifecycle(_index_cfg())
  lifecycle.build(sharding.put_rows(table, mesh, True, ROWS))
  lifecycle.note_updated(np.arange(10))
  new_table = _table(2)
  assert lifecycle.maybe_refresh(10, sharding.put_rows(new_table, mesh, True, ROWS)) == "full"
  assert len(lifecycle.changed) == 0
  codes, _ = stored_codes(build_quantized(new_table, lifecycle.cfg, lifecycle.cfg.seed))
  np.testing.assert_array_equal(_device_codes(lifecycle)["codes"], codes)


@pytest.mark.parametrize("factory,nbits", [("IVF16,PQ8x8", 8), ("PQ8x8", 8),
                                           ("IVF16,PQ8x4fs", 4), ("PQ8x4fs", 4)])
def test_encoded_like_index_matches_sa_encode_layout(factory, nbits):
  table = _table()
  index = build_quantized(table, _index_cfg(factory), 0)
  codes, lists = encoded_like_index(index, table[:100])
  assert codes.shape == (100, 8) and codes.max() < 2 ** nbits
  if "IVF" in factory:
    assert lists.max() < 16 and len(np.unique(lists)) > 1
  assert pq_codebook_shape(factory, DIM) == (8, 2 ** nbits, DIM // 8)


_EXACT_SEARCH_SCRIPT = r"""
import jax
import numpy as np
from qdr_jax import sharding
from qdr_jax.config import base_config
from qdr_jax.index.exact import exact_search
cfg = base_config().sharding
cfg.num_devices = 0
mesh = sharding.make_mesh(cfg)
assert mesh.devices.size == 4
rng = np.random.default_rng(0)
table = rng.standard_normal((1001, 16)).astype(np.float32)  # padded to 1004 rows
queries = rng.standard_normal((300, 16)).astype(np.float32)  # two query batches
device_table = sharding.put_rows(table, mesh, True, sharding.padded_rows(1001, mesh))
scores, ids = exact_search(device_table, queries, 50, mesh, 1001, batch_size=256)
want = np.argsort(-(queries @ table.T), axis=1, kind="stable")[:, :50]
np.testing.assert_array_equal(ids, want)
np.testing.assert_allclose(scores, np.take_along_axis(queries @ table.T, want, 1), rtol=1e-5)
# Scored a block at a time: 251 rows per device in blocks of 60 (the last one overlaps the
# one before) and of 30 (fewer rows per block than k).
for block_rows in (60, 30):
  blocked = exact_search(device_table, queries, 50, mesh, 1001, block_rows=block_rows)
  np.testing.assert_array_equal(blocked[1], want)
  np.testing.assert_allclose(blocked[0], scores, rtol=1e-6)
# A bfloat16 table is scored as its float32 values, one block converted at a time: the
# compiled search needs no more scratch than for a float32 table (XLA would otherwise
# hoist the cast of the whole shard out of the block loop).
bf16_table = sharding.put_rows(table, mesh, True, device_table.shape[0], dtype="bfloat16")
rounded = np.asarray(bf16_table, np.float32)[:1001]
blocked = exact_search(bf16_table, queries, 50, mesh, 1001, block_rows=60)
want = np.argsort(-(queries @ rounded.T), axis=1, kind="stable")[:, :50]
np.testing.assert_array_equal(blocked[1], want)
from qdr_jax.index import exact
fn = exact._search_fn(mesh, 50, 80000, 20000, 1000)  # compiled only: large enough to hoist
q = jax.ShapeDtypeStruct((256, 16), np.float32, sharding=sharding.replicated(mesh))
temp = lambda dtype: fn.lower(jax.ShapeDtypeStruct(
    (80000, 16), dtype, sharding=device_table.sharding), q).compile().memory_analysis(
        ).temp_size_in_bytes
assert temp("bfloat16") <= temp("float32"), (temp("bfloat16"), temp("float32"))
print("ok")
"""


def test_exact_search_on_the_mesh_equals_brute_force():
  """Every device's top-k merged equals the top-k of the whole table, scored whole or in
  row blocks; padding rows lose."""
  import os
  import subprocess
  import sys
  env = dict(os.environ, XLA_FLAGS=" ".join(
      [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=4"]))
  proc = subprocess.run([sys.executable, "-c", _EXACT_SEARCH_SCRIPT], capture_output=True,
                        text=True, timeout=300, env=env)
  assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def _resident_kib(table: np.memmap) -> int:
  """KiB of ``table``'s file mapping counted in this process's RSS (Linux smaps)."""
  address = np.frombuffer(table._mmap, np.uint8).ctypes.data  # pylint: disable=protected-access
  inside = False
  with open("/proc/self/smaps") as f:
    for line in f:
      head = line.split()[0]
      if "-" in head and all(c in "0123456789abcdef-" for c in head):
        start, stop = (int(x, 16) for x in head.split("-"))
        inside = start <= address < stop
      elif inside and head == "Rss:":
        return int(line.split()[1])
  raise AssertionError("the table's mapping is not in /proc/self/smaps")


def test_a_build_over_a_memory_mapped_table_leaves_its_pages_unmapped(tmp_path):
  # Before training, process 0 builds the first index from the host table (a memory-mapped
  # .npy at scale): reading it chunk by chunk must not leave the whole file resident.
  np.save(tmp_path / "table.npy", _table())
  table = np.load(tmp_path / "table.npy", mmap_mode="r")
  cfg = _index_cfg(train_size=2000)
  lifecycle, _ = _lifecycle(cfg)
  lifecycle.build(table)
  assert _resident_kib(table) == 0
  reference = build_quantized(_table(), cfg, cfg.seed)
  queries = _table(1)[:50]
  for got, want in zip(search(lifecycle.index, queries, 20), search(reference, queries, 20)):
    np.testing.assert_array_equal(got, want)
