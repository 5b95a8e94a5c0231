"""JAX product quantization against real trained FAISS indexes (qdr_jax.quant)."""

from __future__ import annotations

import dataclasses

import faiss
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdr_jax import quant

N_VECTORS = 10000  # >= 39 * 256, so FAISS's PQ k-means trains without warnings.
N_QUERIES = 24
NLIST = 16
TOPK = 10

# Jitted once and shared: eager op-by-op dispatch compiles every primitive separately.
_encode_with_lists = jax.jit(quant.encode_with_lists)
_assign_coarse = jax.jit(quant.assign_coarse)
_encode = jax.jit(quant.encode)
_decode = jax.jit(quant.decode)
_quantize = jax.jit(quant.quantize)
_adc_scores = jax.jit(quant.adc_scores)


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  factory: str
  d: int
  metric: int = faiss.METRIC_INNER_PRODUCT
  by_residual: bool = True
  hnsw: bool = False
  # Replace k-means coarse centroids by data points of unequal norms, so IP and L2
  # assignment disagree (IP-trained IVF centroids come out unit-norm, where they agree).
  uneven_centroids: bool = False


CASES = [
    Case("pq", "PQ8np", 64),
    Case("ivfpq", "IVF16,PQ8np", 32),
    Case("ivfpq_direct", "IVF16,PQ8np", 32, by_residual=False),
    Case("opq_ivfpq", "OPQ8,IVF16,PQ8np", 32),
    Case("ivf_hnsw_pq", "IVF16_HNSW32,PQ8np", 32, hnsw=True),
    Case("ivfpq_l2", "IVF16,PQ8np", 32, metric=faiss.METRIC_L2),
    Case("ivfpq_uneven", "IVF16,PQ8np", 32, uneven_centroids=True),
]
IP_CASES = [c for c in CASES if c.metric == faiss.METRIC_INNER_PRODUCT]


def _clustered(rng: np.random.Generator, n: int, d: int, centers: np.ndarray) -> np.ndarray:
  """Unit-norm vectors around random centers, like normalised sentence embeddings."""
  x = centers[rng.integers(0, len(centers), n)] + 0.35 * rng.normal(size=(n, d))
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  return x.astype(np.float32)


@pytest.fixture(scope="module")
def data():
  out = {}
  for d in sorted({c.d for c in CASES}):
    rng = np.random.default_rng(d)
    centers = rng.normal(size=(24, d)) / np.sqrt(d)
    out[d] = (_clustered(rng, N_VECTORS, d, centers), _clustered(rng, N_QUERIES, d, centers))
  return out


def _build(case: Case, x: np.ndarray) -> faiss.Index:
  """A trained, populated FAISS index; k-means iterations cut down to keep tests fast."""
  if case.uneven_centroids:
    rng = np.random.default_rng(0)
    centroids = x[rng.choice(len(x), NLIST, replace=False)]
    centroids = centroids * rng.uniform(0.3, 2.0, size=(NLIST, 1)).astype(np.float32)
    coarse = faiss.IndexFlatIP(case.d)
    coarse.add(centroids)  # a trained quantizer with nlist entries: IVF skips k-means
    index = faiss.IndexIVFPQ(coarse, case.d, NLIST, 8, 8, faiss.METRIC_INNER_PRODUCT)
  else:
    index = faiss.index_factory(case.d, case.factory, case.metric)
  if isinstance(index, faiss.IndexPreTransform):
    opq = faiss.downcast_VectorTransform(index.chain.at(0))
    opq.niter, opq.niter_pq_0 = 5, 8
  if "IVF" in case.factory:
    ivf = faiss.extract_index_ivf(index)
    ivf.by_residual = case.by_residual
    ivf.cp.niter = 8
    pq = faiss.downcast_index(ivf).pq
  else:
    pq = faiss.downcast_index(index).pq
  pq.cp.niter = 8
  index.train(x)
  index.add(x)
  if "IVF" in case.factory:
    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = NLIST  # probe every list: search is then exhaustive over the codes
    ivf.make_direct_map()
    if case.hnsw:
      faiss.downcast_index(ivf.quantizer).hnsw.efSearch = 64
  return index


@pytest.fixture(scope="module")
def indexes(data):
  # One OpenMP thread: FAISS's k-means with 2 threads is several times slower on a
  # shared, loaded 2-core machine.
  threads = faiss.omp_get_max_threads()
  faiss.omp_set_num_threads(1)
  try:
    yield {c.name: _build(c, data[c.d][0]) for c in CASES}
  finally:
    faiss.omp_set_num_threads(threads)


def _setup(case, data, indexes):
  x, queries = data[case.d]
  index = indexes[case.name]
  return index, quant.quantizer_from_faiss(index), x, queries


def _check_codes(case: Case, jax_codes, jax_lists, codes, lists):
  jax_codes, jax_lists = np.asarray(jax_codes), np.asarray(jax_lists)
  if case.hnsw:
    # HNSW's approximate coarse search may pick another list than the exact JAX one.
    same = jax_lists == lists
    assert same.mean() >= 0.99
    np.testing.assert_array_equal(jax_codes[same], codes[same])
  else:
    np.testing.assert_array_equal(jax_lists, lists)
    np.testing.assert_array_equal(jax_codes, codes)


# --------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_quantizer_fields(case, data, indexes):
  _, q, _, _ = _setup(case, data, indexes)
  assert q.codebooks.shape == (8, 256, case.d // 8)
  assert q.codebooks.dtype == jnp.float32
  assert q.dim == case.d
  is_ivf = "IVF" in case.factory
  assert q.has_ivf == is_ivf
  assert q.by_residual == (is_ivf and case.by_residual)
  if is_ivf:
    assert q.coarse_centroids.shape == (NLIST, case.d)
  assert q.coarse_metric == ("ip" if case.metric == faiss.METRIC_INNER_PRODUCT else "l2")
  assert (q.rotation is not None) == case.factory.startswith("OPQ")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_codes_match_stored_codes(case, data, indexes):
  index, q, x, _ = _setup(case, data, indexes)
  codes, lists = quant.stored_codes(index)
  assert codes.shape == (N_VECTORS, 8) and lists.shape == (N_VECTORS,)
  jax_codes, jax_lists = _encode_with_lists(q, x)
  _check_codes(case, jax_codes, jax_lists, codes, lists)
  # The single-purpose functions agree with the combined one.
  np.testing.assert_array_equal(_assign_coarse(q, x), jax_lists)
  np.testing.assert_array_equal(_encode(q, x), jax_codes)
  # FAISS's own encoder (sa_encode) agrees too, as a check on stored_codes.
  if not case.hnsw and "IVF" not in case.factory:
    np.testing.assert_array_equal(index.sa_encode(x[:100]), codes[:100])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_reconstruction_matches_faiss(case, data, indexes):
  index, q, x, _ = _setup(case, data, indexes)
  codes, lists = quant.stored_codes(index)
  faiss_rec = index.reconstruct_n(0, N_VECTORS)
  ours = _decode(q, jnp.asarray(codes), jnp.asarray(lists))
  np.testing.assert_allclose(ours, faiss_rec, atol=1e-5)
  x_hat = np.asarray(_quantize(q, x))
  same = np.asarray(_assign_coarse(q, x)) == lists
  np.testing.assert_allclose(x_hat[same], faiss_rec[same], atol=1e-5)


@pytest.mark.parametrize("case", IP_CASES, ids=lambda c: c.name)
def test_adc_scores_match_faiss_search(case, data, indexes):
  index, q, _, queries = _setup(case, data, indexes)
  dist, ids = index.search(queries, TOPK)
  assert (ids >= 0).all()
  codes, lists = quant.stored_codes(index)
  rec = index.reconstruct_n(0, N_VECTORS)
  from_codes = np.asarray(_adc_scores(q, queries, jnp.asarray(codes),
                                                    jnp.asarray(lists)))
  from_rec = np.asarray(_adc_scores(q, queries, jnp.asarray(rec)))
  rows = np.arange(N_QUERIES)[:, None]
  np.testing.assert_allclose(from_codes[rows, ids], dist, atol=1e-4)
  np.testing.assert_allclose(from_rec[rows, ids], dist, atol=1e-4)
  # And the search really is the top-k of the JAX scores (nprobe = nlist).
  np.testing.assert_allclose(np.sort(from_codes, axis=1)[:, ::-1][:, :TOPK], dist, atol=1e-4)


# --------------------------------------------------------------------------- conventions


def test_opq_rotation_convention(data, indexes):
  case = next(c for c in CASES if c.name == "opq_ivfpq")
  index, q, x, _ = _setup(case, data, indexes)
  a = np.asarray(q.rotation)
  np.testing.assert_allclose(a @ a.T, np.eye(case.d), atol=1e-5)
  assert not np.allclose(a, a.T, atol=1e-3)  # else the orientation test below proves nothing
  transform = faiss.downcast_VectorTransform(index.chain.at(0))
  applied = transform.apply(x[:50])
  np.testing.assert_allclose(np.asarray(jax.jit(quant.rotate)(q, x[:50])), applied, atol=1e-5)
  np.testing.assert_allclose(x[:50] @ a.T, applied, atol=1e-5)
  assert not np.allclose(x[:50] @ a, applied, atol=1e-3)
  np.testing.assert_allclose(np.asarray(jax.jit(quant.unrotate)(q, applied)), x[:50], atol=1e-5)
  np.testing.assert_allclose(transform.reverse_transform(applied), x[:50] @ a.T @ a, atol=1e-5)


def test_ip_coarse_assignment_is_max_inner_product(data, indexes):
  case = next(c for c in CASES if c.name == "ivfpq_uneven")
  index, q, x, _ = _setup(case, data, indexes)
  assert q.coarse_metric == "ip"
  _, lists = quant.stored_codes(index)
  c = np.asarray(q.coarse_centroids)
  np.testing.assert_array_equal(np.argmax(x @ c.T, axis=1), lists)
  # With centroids of unequal norms, L2 assignment would pick other lists for many rows.
  l2 = np.argmin(((x[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
  assert (l2 != lists).mean() > 0.05
  l2_quantizer = q.replace(coarse_metric="l2")
  np.testing.assert_array_equal(_assign_coarse(l2_quantizer, x), l2)


@pytest.mark.parametrize("case", [c for c in CASES if "IVF" in c.factory and not c.hnsw],
                         ids=lambda c: c.name)
def test_coarse_scores_probe_the_lists_faiss_probes(case, data, indexes):
  """The top-nprobe lists by ``coarse_scores`` are those FAISS's coarse search visits."""
  index, q, _, queries = _setup(case, data, indexes)
  ivf = faiss.extract_index_ivf(index)
  nprobe = 4
  rotated = queries if q.rotation is None else np.asarray(quant.rotate(q, queries))
  _, faiss_lists = ivf.quantizer.search(np.ascontiguousarray(rotated, dtype=np.float32), nprobe)
  scores = np.asarray(jax.jit(quant.coarse_scores)(q, queries))
  ours = np.argsort(-scores, axis=1, kind="stable")[:, :nprobe]
  np.testing.assert_array_equal(np.sort(ours, axis=1), np.sort(faiss_lists, axis=1))


def test_residual_encoding(data, indexes):
  case = next(c for c in CASES if c.name == "ivfpq")
  index, q, x, _ = _setup(case, data, indexes)
  codes, lists = quant.stored_codes(index)
  residual = x - np.asarray(q.coarse_centroids)[lists]
  pq = faiss.downcast_index(faiss.extract_index_ivf(index)).pq
  np.testing.assert_array_equal(pq.compute_codes(residual), codes)


def test_unsupported_indexes_raise():
  with pytest.raises(ValueError, match="at most 8 bits"):
    quant.quantizer_from_faiss(faiss.IndexPQ(16, 4, 10, faiss.METRIC_INNER_PRODUCT))
  with pytest.raises(ValueError, match="Unsupported index"):
    quant.quantizer_from_faiss(faiss.IndexFlatIP(16))
  with pytest.raises(ValueError, match="not trained"):
    quant.quantizer_from_faiss(faiss.index_factory(16, "IVF4,PQ4np", faiss.METRIC_INNER_PRODUCT))


# --------------------------------------------------------------------------- STE and jit


def test_straight_through_forward_and_gradient(data, indexes):
  case = next(c for c in CASES if c.name == "opq_ivfpq")
  _, q, x, _ = _setup(case, data, indexes)
  x = jnp.asarray(x[:256])
  w = jax.random.normal(jax.random.key(0), x.shape)
  ste = jax.jit(quant.straight_through)
  np.testing.assert_array_equal(ste(q, x), _quantize(q, x))

  grad_x, grad_q = jax.jit(jax.grad(lambda x, q: jnp.sum(w * quant.straight_through(q, x)),
                                    argnums=(0, 1)))(x, q)
  np.testing.assert_allclose(grad_x, w, rtol=0, atol=0)
  # Codebooks receive the gradient of the reconstruction with the codes held fixed.
  codes, lists = _encode_with_lists(q, x)
  expected = jax.jit(jax.grad(lambda q: jnp.sum(w * quant.decode(q, codes, lists))))(q)
  np.testing.assert_allclose(grad_q.codebooks, expected.codebooks, atol=1e-5)
  assert float(jnp.abs(grad_q.codebooks).sum()) > 0

  grad_frozen = jax.jit(jax.grad(lambda q: jnp.sum(w * quant.straight_through(q, x, False))))(q)
  assert float(jnp.abs(grad_frozen.codebooks).sum()) == 0
  jac = jax.jit(jax.jacfwd(lambda v: quant.straight_through(q, v)))(x[:2])
  np.testing.assert_array_equal(jac.reshape(2 * case.d, 2 * case.d), np.eye(2 * case.d))


def test_quantizer_is_a_pytree_that_optax_can_update(data, indexes):
  import optax  # pylint: disable=import-outside-toplevel

  case = next(c for c in CASES if c.name == "ivfpq")
  _, q, x, queries = _setup(case, data, indexes)
  leaves = jax.tree.leaves(q)
  assert len(leaves) == 2  # codebooks, coarse centroids; rotation None; statics excluded
  params = q.codebooks
  opt = optax.adam(1e-3)
  state = opt.init(params)
  codes, lists = _encode_with_lists(q, x[:512])

  @jax.jit
  def step(params, state):
    def loss(cb):
      qq = q.replace(codebooks=cb)
      return -jnp.mean(quant.adc_scores(qq, queries, codes, lists))

    g = jax.grad(loss)(params)
    updates, state = opt.update(g, state)
    return optax.apply_updates(params, updates), state

  new, _ = step(params, state)
  assert new.shape == params.shape and not np.allclose(new, params)
  # Whole-quantizer tree maps (as optax does on params) keep the static fields.
  assert jax.tree.map(lambda _: None, q).by_residual
  zeros = jax.tree.map(jnp.zeros_like, q)
  assert zeros.coarse_metric == "ip" and float(jnp.abs(zeros.codebooks).sum()) == 0


# --------------------------------------------------------------------------- write-back


@pytest.mark.parametrize("case", IP_CASES, ids=lambda c: c.name)
def test_write_codebooks_round_trip(case, data, indexes):
  index, q, x, queries = _setup(case, data, indexes)
  index = faiss.clone_index(index)
  old_codes, _ = quant.stored_codes(index)
  noise = jax.random.normal(jax.random.key(1), q.codebooks.shape)
  q_new = q.replace(codebooks=q.codebooks + 0.3 * jnp.std(q.codebooks) * noise)

  written = quant.write_codebooks_to_faiss(index, q_new, x)
  assert written is index and index.ntotal == N_VECTORS
  np.testing.assert_array_equal(quant.quantizer_from_faiss(index).codebooks, q_new.codebooks)

  codes, lists = quant.stored_codes(index)
  jax_codes, jax_lists = _encode_with_lists(q_new, x)
  _check_codes(case, jax_codes, jax_lists, codes, lists)
  assert (codes != old_codes).any()  # the new codebooks really re-encoded the vectors

  if "IVF" in case.factory:
    faiss.extract_index_ivf(index).make_direct_map()
  np.testing.assert_allclose(_decode(q_new, jnp.asarray(codes), jnp.asarray(lists)),
                             index.reconstruct_n(0, N_VECTORS), atol=1e-5)
  dist, ids = index.search(queries, TOPK)
  scores = np.asarray(_adc_scores(q_new, queries, jnp.asarray(codes), jnp.asarray(lists)))
  np.testing.assert_allclose(scores[np.arange(N_QUERIES)[:, None], ids], dist, atol=1e-4)


def test_write_back_rejects_changed_coarse_centroids(data, indexes):
  case = next(c for c in CASES if c.name == "ivfpq")
  index, q, x, _ = _setup(case, data, indexes)
  moved = q.replace(coarse_centroids=q.coarse_centroids + 0.1)
  with pytest.raises(ValueError, match="coarse_centroids"):
    quant.write_codebooks_to_faiss(faiss.clone_index(index), moved, x)
