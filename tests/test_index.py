"""Tests for qdr_jax.index: building, seeding, search parameters, files, sizes, reconstruction."""

import os

import faiss
import numpy as np
import pytest

from qdr_jax.index import (
    build_index,
    bytes_per_vector,
    compression_ratio,
    describe_index,
    load_index,
    num_threads,
    rebuild_index,
    reconstruct_all,
    save_index,
    search,
    set_search_params,
)

D = 32
# One FAISS thread keeps these small builds fast on a busy 2-core machine (no OpenMP spinning).
THREADS = 1


def _unit(rng, n, d=D):
  x = rng.standard_normal((n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def table():
  return _unit(np.random.default_rng(0), 2000)


@pytest.fixture(scope="module")
def queries(table):
  rng = np.random.default_rng(1)
  q = table[:64] + 0.3 * _unit(rng, 64)
  return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def _recall_vs_exact(table, queries, ids, k):
  exact = np.argsort(-(queries @ table.T), axis=1, kind="stable")[:, :k]
  return np.mean([len(set(a) & set(b)) / k for a, b in zip(ids[:, :k], exact)])


def test_flat_search_is_exact(table, queries):
  index = build_index(table, "Flat", threads=THREADS)
  scores, ids = search(index, queries, 10, batch_size=7)  # uneven batches on purpose
  expected = queries @ table.T
  top = np.argsort(-expected, axis=1)[:, :10]
  np.testing.assert_array_equal(ids, top)
  np.testing.assert_allclose(scores, np.take_along_axis(expected, top, axis=1), rtol=1e-5)
  assert scores.dtype == np.float32 and ids.dtype == np.int64


def test_search_pads_missing_results():
  index = build_index(_unit(np.random.default_rng(2), 3), "Flat")
  scores, ids = search(index, _unit(np.random.default_rng(3), 2), 5)
  assert (ids[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
  assert (ids[:, :3] >= 0).all()


def test_l2_metric_scores_are_negated_distances(table, queries):
  index = build_index(table, "Flat", metric="l2")
  scores, ids = search(index, queries, 5)
  dist = ((queries[:, None, :] - table[ids]) ** 2).sum(-1)
  np.testing.assert_allclose(scores, -dist, rtol=1e-4, atol=1e-5)
  assert (np.diff(scores, axis=1) <= 0).all()


@pytest.mark.parametrize(
    "factory, d, nbytes, ratio",
    [
        ("Flat", 384, 1536, 1.0),
        ("IVF16,PQ48x8", 384, 48, 32.0),
        ("IVF16,PQ48", 384, 48, 32.0),
        ("OPQ48,IVF16,PQ48", 384, 48, 32.0),
        ("OPQ48_192,IVF16,PQ48np", 384, 48, 32.0),
        ("PQ48", 384, 48, 32.0),
        ("IVF16_HNSW32,PQ48", 384, 48, 32.0),
        ("HNSW32,PQ48", 384, 48, 32.0),
        ("IVF16,PQ48x4fs", 384, 24, 64.0),
        ("IDMap,Flat", 384, 1536, 1.0),
        ("IVF4096_HNSW32,PQ128", 768, 128, 24.0),
    ],
)
def test_bytes_per_vector_and_compression(factory, d, nbytes, ratio):
  # Code sizes are fixed by the layout, so untrained indexes suffice.
  index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
  assert bytes_per_vector(index) == nbytes
  assert compression_ratio(index) == ratio
  assert compression_ratio(index, d) == ratio


def test_describe_built_ivfpq(table):
  index = build_index(table, "IVF16,PQ8x4", nprobe=3, seed=0, threads=THREADS)
  info = describe_index(index)
  assert info["factory"] == "IVF16,PQ8x4"
  assert info["ntotal"] == 2000 and info["d"] == D and info["metric"] == "ip"
  assert info["nlist"] == 16 and info["nprobe"] == 3 and info["ef_search"] is None
  assert info["bytes_per_vector"] == 4.0 and info["compression_ratio"] == 32.0
  assert info["pq_m"] == 8 and info["pq_nbits"] == 4 and info["opq"] is False


def _coarse_centroids(index):
  ivf = faiss.extract_index_ivf(index)
  return ivf.quantizer.reconstruct_n(0, ivf.nlist)


def _pq_centroids(index):
  return faiss.vector_to_array(faiss.downcast_index(faiss.extract_index_ivf(index)).pq.centroids)


def test_builds_are_deterministic_by_seed(table, queries):
  def build(seed):
    return build_index(table, "IVF16,PQ8x4", seed=seed, nprobe=4, threads=THREADS)

  a, b, c = build(0), build(0), build(1)
  np.testing.assert_array_equal(_coarse_centroids(a), _coarse_centroids(b))
  np.testing.assert_array_equal(_pq_centroids(a), _pq_centroids(b))
  np.testing.assert_array_equal(a.sa_encode(table), b.sa_encode(table))
  for x, y in [(search(a, queries, 10), search(b, queries, 10))]:
    np.testing.assert_array_equal(x[1], y[1])
    np.testing.assert_array_equal(x[0], y[0])
  # Another seed, another clustering (both the coarse and the PQ k-means are seeded).
  assert not np.array_equal(_coarse_centroids(a), _coarse_centroids(c))
  assert not np.array_equal(_pq_centroids(a), _pq_centroids(c))


def test_opq_is_seeded(table):
  def opq_matrix(seed):
    index = build_index(table, "OPQ8,IVF8,PQ8x4", seed=seed, opq_niter=2, threads=THREADS)
    vt = faiss.downcast_VectorTransform(faiss.downcast_index(index).chain.at(0))
    assert vt.pq is None  # the lent PQ is detached after training
    return faiss.vector_to_array(vt.A)

  a = opq_matrix(0)
  np.testing.assert_array_equal(a, opq_matrix(0))
  assert not np.array_equal(a, opq_matrix(5))


def test_train_size_samples_rows_by_seed(table):
  def build(seed):
    return build_index(table, "IVF8,PQ8x4", train_size=300, seed=seed, threads=THREADS)

  np.testing.assert_array_equal(_coarse_centroids(build(3)), _coarse_centroids(build(3)))
  assert not np.array_equal(_coarse_centroids(build(3)), _coarse_centroids(build(4)))
  with pytest.raises(ValueError, match="nlist"):
    build_index(table, "IVF64,PQ8x4", train_size=10)


def test_polysemous_training_off_by_default(table):
  index = build_index(table[:600], "PQ4", threads=THREADS)
  assert faiss.downcast_index(index).do_polysemous_training is False
  index = build_index(table[:600], "IVF4,PQ4", threads=THREADS)
  assert faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training is False


def test_nprobe_reaches_the_index_and_improves_recall(table, queries):
  index = build_index(table, "IVF32,PQ16x4", seed=0, threads=THREADS)
  recalls = []
  for nprobe in (1, 32):
    set_search_params(index, nprobe=nprobe)
    assert faiss.extract_index_ivf(index).nprobe == nprobe
    recalls.append(_recall_vs_exact(table, queries, search(index, queries, 10)[1], 10))
  assert recalls[1] > recalls[0] + 0.1, recalls


def test_search_params_through_opq_and_hnsw(table):
  opq = build_index(table[:800], "OPQ4,IVF8,PQ4x4", opq_niter=1, nprobe=5, threads=THREADS)
  assert faiss.extract_index_ivf(opq).nprobe == 5
  assert describe_index(opq)["opq"] is True

  ivf_hnsw = build_index(
      table[:800], "IVF8_HNSW8,PQ4x4", nprobe=2, ef_search=21, threads=THREADS)
  quantizer = faiss.downcast_index(faiss.extract_index_ivf(ivf_hnsw).quantizer)
  assert quantizer.hnsw.efSearch == 21
  assert describe_index(ivf_hnsw)["ef_search"] == 21

  hnsw_pq = build_index(table[:800], "HNSW8,PQ4x4", ef_search=33, threads=THREADS)
  assert faiss.downcast_index(hnsw_pq).hnsw.efSearch == 33
  # FAISS's factory would have made this L2; build_index keeps the requested metric.
  assert hnsw_pq.metric_type == faiss.METRIC_INNER_PRODUCT

  flat = build_index(table[:10], "Flat")
  with pytest.raises(ValueError, match="no IVF"):
    set_search_params(flat, nprobe=4)
  with pytest.raises(ValueError, match="no HNSW"):
    set_search_params(flat, ef_search=4)
  set_search_params(flat, nprobe=4, ef_search=4, strict=False)  # ignored


def test_build_ignores_parameters_the_layout_lacks(table):
  # One config (nprobe, efSearch, OPQ iterations) must serve every factory string.
  index = build_index(table[:300], "PQ4x4", nprobe=16, ef_search=64, opq_niter=10,
                      threads=THREADS)
  info = describe_index(index)
  assert info["nprobe"] is None and info["ef_search"] is None and info["opq"] is False


def test_build_rejects_bad_input(table):
  with pytest.raises(ValueError, match="2-D"):
    build_index(table[0], "Flat")
  bad = table[:10].copy()
  bad[3, 1] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    build_index(bad, "Flat")
  with pytest.raises(ValueError, match="factory"):
    build_index(table[:10], "NotAnIndex17")
  with pytest.raises(ValueError, match="nprobe must be"):
    build_index(table[:100], "IVF4,PQ4x4", nprobe=0)
  with pytest.raises(ValueError, match="dimension"):
    search(build_index(table[:10], "Flat"), np.zeros((2, D + 1), np.float32), 3)


def test_save_load_round_trip(tmp_path, table, queries):
  index = build_index(table, "OPQ8,IVF16,PQ8x4", opq_niter=2, nprobe=6, threads=THREADS)
  path = tmp_path / "a.faiss"
  save_index(index, path)
  loaded = load_index(path)
  for x, y in zip(search(index, queries, 20), search(loaded, queries, 20)):
    np.testing.assert_array_equal(x, y)
  assert describe_index(loaded) == describe_index(index)
  # FAISS saves OPQ as a plain linear transform; the layout is still recognised and rebuilt.
  assert describe_index(loaded)["factory"] == "OPQ8_32,IVF16,PQ8x4"
  rebuilt = rebuild_index(loaded, table[:500], opq_niter=1, threads=THREADS)
  assert describe_index(rebuilt)["opq"] and describe_index(rebuilt)["nprobe"] == 6
  assert os.listdir(tmp_path) == ["a.faiss"]  # no temp file left behind
  # Overwriting an existing file works too.
  save_index(build_index(table[:50], "Flat"), path)
  assert load_index(str(path)).ntotal == 50


def test_save_into_missing_directory_fails_cleanly(tmp_path):
  index = build_index(np.eye(4, D, dtype=np.float32), "Flat")
  target = tmp_path / "nope" / "x.faiss"
  with pytest.raises(OSError):
    save_index(index, target)
  assert not target.parent.exists()


def test_failed_write_leaves_old_file_and_no_partial(tmp_path, monkeypatch):
  path = tmp_path / "x.faiss"
  save_index(build_index(np.eye(4, D, dtype=np.float32), "Flat"), path)
  before = path.read_bytes()

  def broken_write(index, fname):
    with open(fname, "wb") as f:
      f.write(b"IxF2 partial")
    raise RuntimeError("disk full")

  monkeypatch.setattr(faiss, "write_index", broken_write)
  with pytest.raises(RuntimeError, match="disk full"):
    save_index(build_index(np.eye(8, D, dtype=np.float32), "Flat"), path)
  assert path.read_bytes() == before
  assert os.listdir(tmp_path) == ["x.faiss"]


def test_load_errors_name_the_path(tmp_path, table):
  missing = tmp_path / "missing.faiss"
  with pytest.raises(FileNotFoundError, match="missing.faiss"):
    load_index(missing)
  garbage = tmp_path / "garbage.faiss"
  garbage.write_bytes(b"this is not an index" * 5)
  with pytest.raises(ValueError, match="garbage.faiss"):
    load_index(garbage)
  good = tmp_path / "good.faiss"
  save_index(build_index(table[:200], "PQ4x4", threads=THREADS), good)
  truncated = tmp_path / "truncated.faiss"
  truncated.write_bytes(good.read_bytes()[:100])
  with pytest.raises(ValueError, match="truncated.faiss"):
    load_index(truncated)


def test_reconstruct_all_flat_and_id_map(tmp_path, table):
  x = table[:100]
  flat = faiss.IndexFlatIP(D)
  flat.add(x)
  save_index(flat, tmp_path / "released.faiss")
  np.testing.assert_array_equal(reconstruct_all(load_index(tmp_path / "released.faiss")), x)

  # An id map whose ids are a permutation of the rows: rows come back in id order.
  perm = np.random.default_rng(0).permutation(100).astype(np.int64)
  idmap = faiss.IndexIDMap(faiss.IndexFlatL2(D))
  idmap.add_with_ids(x, perm)  # vector x[i] has id perm[i]
  table_by_id = reconstruct_all(idmap)
  np.testing.assert_array_equal(table_by_id[perm], x)
  vectors, ids = reconstruct_all(idmap, return_ids=True)
  np.testing.assert_array_equal(vectors, x)
  np.testing.assert_array_equal(ids, perm)

  sparse = faiss.IndexIDMap(faiss.IndexFlatIP(D))
  sparse.add_with_ids(x[:3], np.array([10, 20, 30], dtype=np.int64))
  with pytest.raises(ValueError, match="permutation"):
    reconstruct_all(sparse)
  np.testing.assert_array_equal(reconstruct_all(sparse, return_ids=True)[1], [10, 20, 30])

  with pytest.raises(TypeError, match="flat"):
    reconstruct_all(build_index(table[:200], "PQ4x4", threads=THREADS))


def test_rebuild_index_keeps_settings(table, queries):
  old = build_index(table, "IVF16,PQ8x4", nprobe=7, seed=2, threads=THREADS)
  new_table = _unit(np.random.default_rng(9), 1500)
  new = rebuild_index(old, new_table, seed=2, threads=THREADS)
  info_old, info_new = describe_index(old), describe_index(new)
  assert info_new["factory"] == info_old["factory"] and info_new["nprobe"] == 7
  assert info_new["ntotal"] == 1500
  from_string = rebuild_index("IVF16,PQ8x4", new_table, seed=2, nprobe=7, threads=THREADS)
  for x, y in zip(search(new, queries, 5), search(from_string, queries, 5)):
    np.testing.assert_array_equal(x, y)
  with pytest.raises(ValueError, match="dimension"):
    rebuild_index(old, new_table[:, :16])


def test_num_threads_is_restored():
  before = faiss.omp_get_max_threads()
  with num_threads(1):
    assert faiss.omp_get_max_threads() == 1
  assert faiss.omp_get_max_threads() == before
