"""RaBitQ: JAX codes, reconstructions and scores equal FAISS's (with and without IVF and a
random rotation), the straight-through loss scores what the index serves, and dback
trains end to end on an IVF RaBitQ index with checkpoints, learned centroids and export."""

import math

import faiss
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdr_jax import quant
from qdr_jax.config import base_config
from qdr_jax.index.lifecycle import encoded_like_index, placeholder_quantizer
from qdr_jax.index.rules import check_index_for_mode
from qdr_jax.quant import rabitq
from qdr_jax.train.loss import contrastive_loss
from qdr_jax.train.step import pool_bias, pool_targets
from qdr_jax.validation import ConfigError, validate_config

D = 36  # not a multiple of 8: the last code byte is partly padding
METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
FACTORIES = ["RaBitQ", "IVF8,RaBitQ", f"RR{D},RaBitQ", f"RR{D},IVF8,RaBitQ"]


def _data(seed=0, n=500, nq=6):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, D)).astype(np.float32) + 0.3
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  return x, rng.normal(size=(nq, D)).astype(np.float32)


def _build(factory, metric="ip", x=None):
  x = _data()[0] if x is None else x
  index = faiss.index_factory(D, factory, METRICS[metric])
  index.train(x)
  index.add(x)
  inner = quant.faiss_bridge._inner(index)
  if isinstance(inner, faiss.IndexIVF):
    inner.nprobe = inner.nlist  # every list: FAISS scores every row, as `estimate` does
  return index, inner


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("factory", FACTORIES)
def test_jax_codes_and_estimates_equal_faiss(factory, metric):
  x, queries = _data()
  index, inner = _build(factory, metric, x)
  assert quant.supports_straight_through(index)
  raw, lists = quant.stored_codes(index)
  width = -(-D // 8)
  for qb in (0, 4):  # the float query, and FAISS's default 4-bit query
    inner.qb = qb
    q = quant.quantizer_from_faiss(index)
    assert isinstance(q, quant.RaBitQ) and q.qb == qb and q.has_ivf == ("IVF" in factory)
    bits, factors, our_lists = rabitq.encode(q, jnp.asarray(x))
    ours = rabitq.to_faiss_bytes(np.asarray(bits), np.asarray(factors))
    # Sign bits bit for bit (the stored codes and FAISS's own encoder), lists exactly,
    # the float factors to float32 rounding (FAISS sums in another order).
    np.testing.assert_array_equal(ours[:, :width], raw[:, :width])
    np.testing.assert_array_equal(np.asarray(our_lists), lists)
    sa_raw, sa_lists = encoded_like_index(index, x)
    np.testing.assert_array_equal(sa_raw, raw)
    np.testing.assert_array_equal(sa_lists, lists)
    stored_bits, stored_factors, _ = rabitq.split_codes(jnp.asarray(raw), D)
    np.testing.assert_array_equal(stored_bits, bits)
    np.testing.assert_allclose(stored_factors, factors, rtol=1e-5, atol=1e-6)
    # The estimate FAISS's exhaustive search returns, for every row.
    distances, ids = index.search(queries, len(x))
    est = np.asarray(rabitq.estimate(q, jnp.asarray(queries), stored_bits, stored_factors,
                                     jnp.asarray(lists)))
    np.testing.assert_allclose(np.take_along_axis(est, ids, axis=1), distances,
                               rtol=1e-5, atol=5e-5)
  # sa_decode's reconstruction, rotated back.
  decoded = rabitq.reconstruct(q, stored_bits, stored_factors, jnp.asarray(lists))
  want = index.sa_decode(index.sa_encode(x))
  np.testing.assert_allclose(decoded, want, atol=1e-5)


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("factory", ["RaBitQ4", "IVF8,RaBitQ2", f"RR{D},IVF8,RaBitQ3"])
def test_multibit_estimates_equal_faiss(factory, metric):
  """Multi-bit codes read from the index score as FAISS scores them, whatever qb (its
  second stage scores the float query); the loss's form (targets and bias) too."""
  x, queries = _data(2)
  index, inner = _build(factory, metric, x)
  raw, lists = quant.stored_codes(index)
  for qb in (0, 4):
    inner.qb = qb
    q = quant.quantizer_from_faiss(index)
    assert q.nb_bits == int(factory.rstrip("fs")[-1])
    assert raw.shape[1] == rabitq.code_size(D, q.nb_bits)
    bits, factors, extra = rabitq.split_codes(jnp.asarray(raw), D, q.nb_bits)
    np.testing.assert_array_equal(bits, (rabitq.encode(q.replace(nb_bits=1), x)[0]))
    distances, ids = index.search(queries, len(x))
    est = np.asarray(rabitq.estimate(q, jnp.asarray(queries), bits, factors,
                                     jnp.asarray(lists), extra))
    np.testing.assert_allclose(np.take_along_axis(est, ids, axis=1), distances,
                               rtol=1e-5, atol=5e-5)
    if metric == "ip":
      rows, codes = jnp.asarray(x), (jnp.asarray(raw), jnp.asarray(lists))
      served = (queries @ np.asarray(pool_targets(rows, q, None, *codes)).T
                + np.asarray(pool_bias(rows, q, None, *codes)))
      np.testing.assert_allclose(served, est, rtol=1e-5, atol=5e-5)


def test_query_quantization_changes_faiss_scores():
  """The qb=4 comparison above is not the float one again: FAISS's scores differ."""
  _, queries = _data()
  index, inner = _build("IVF8,RaBitQ")
  inner.qb = 0
  float_scores = index.search(queries, 5)[0]
  inner.qb = 4
  assert np.abs(index.search(queries, 5)[0] - float_scores).max() > 1e-3


def test_loss_scores_what_the_index_serves():
  """``q . pool_targets + pool_bias`` is FAISS's score, from stored or recomputed codes;
  the gradient reaches each row unchanged (straight-through) and the learned centroids."""
  x, queries = _data(1)
  index, inner = _build("RR36,IVF8,RaBitQ", x=x)
  inner.qb = 0  # as training builds it (RABITQ_QB)
  q = quant.quantizer_from_faiss(index)
  raw, lists = quant.stored_codes(index)
  distances, ids = index.search(queries, len(x))
  want = np.empty_like(distances)
  np.put_along_axis(want, ids, distances, axis=1)
  rows = jnp.asarray(x)
  for codes, lst in ((jnp.asarray(raw), jnp.asarray(lists)), (None, None)):
    targets = pool_targets(rows, q, None, codes, lst)
    bias = pool_bias(rows, q, None, codes, lst)
    np.testing.assert_allclose(queries @ np.asarray(targets).T + np.asarray(bias), want,
                               rtol=1e-5, atol=5e-5)
  w = jax.random.normal(jax.random.key(0), x.shape)
  grad = jax.grad(lambda r: jnp.sum(w * pool_targets(r, q, None)))(rows)
  np.testing.assert_allclose(grad, w, atol=1e-6)
  assert pool_bias(rows, quant.Quantizer(codebooks=jnp.zeros((4, 2, D // 4))), None) is None
  # Learned centroids get the gradient of the score with the codes held fixed.
  learned = {"centroids": q.coarse_centroids}
  qv = jnp.asarray(queries[0])

  def score_sum(params):
    t = pool_targets(rows, q, params, jnp.asarray(raw), jnp.asarray(lists))
    return jnp.sum(t @ qv + pool_bias(rows, q, params, jnp.asarray(raw), jnp.asarray(lists)))

  score_sum = jax.jit(score_sum)
  g = jax.jit(jax.grad(score_sum))(learned)["centroids"]
  eps = 1e-2
  bumped = learned["centroids"].at[3, 5].add(eps)
  numeric = (score_sum({"centroids": bumped}) - score_sum(learned)) / eps
  assert float(jnp.abs(g).sum()) > 0
  np.testing.assert_allclose(g[3, 5], numeric, rtol=2e-2, atol=1e-3)


def test_quantized_loss_on_known_input():
  """A 4-d RaBitQ by hand: centre c = e1, rows c + (3,-1,2,-2) and c + (1,1,1,1).
  Row 1: ||r||^2 = 18, sum|r| = 8, dp = 18 * 2 / 8 = 4.5, o = (1,-1,1,-1)/2, so the
  reconstruction is (3.25,-2.25,2.25,-2.25) and the bias -(18 - 25 + 1)/2 - 4.5 * 0.5 = 0.75.
  Row 2: dp = 2, o = (1,1,1,1)/2, reconstruction (2,1,1,1), bias -(4 - 7 + 1)/2 - 1 = 0.
  For q = (1,1,0,0) the scores are 1.75 and 3.0, which FAISS returns too; with row 1
  the positive at temperature 1 the loss is log(1 + e^1.25)."""
  c = np.array([1, 0, 0, 0], np.float32)
  rows = np.array([[4, -1, 2, -2], [2, 1, 1, 1]], np.float32)
  query = np.array([[1, 1, 0, 0]], np.float32)
  q = rabitq.RaBitQ(center=jnp.asarray(c))
  targets = pool_targets(jnp.asarray(rows), q, None)
  bias = pool_bias(jnp.asarray(rows), q, None)
  np.testing.assert_allclose(targets, [[3.25, -2.25, 2.25, -2.25], [2, 1, 1, 1]], atol=1e-6)
  np.testing.assert_allclose(bias, [0.75, 0.0], atol=1e-6)
  loss, metrics = contrastive_loss(
      jnp.asarray(query), targets, jnp.array([[True, False]]), jnp.zeros((1, 2), bool),
      jnp.ones(2, bool), temperature=1.0, row_bias=bias)
  assert float(loss) == pytest.approx(math.log1p(math.exp(1.25)), rel=1e-6)
  assert float(metrics["pool_accuracy"]) == 0.0
  index = faiss.IndexRaBitQ(4, faiss.METRIC_INNER_PRODUCT)
  index.train(np.tile(c, (2, 1)))  # the centre is the training mean
  index.qb = 0
  index.add(rows)
  distances, ids = index.search(query, 2)
  np.testing.assert_allclose(distances[0][np.argsort(ids[0])], [1.75, 3.0], atol=1e-6)


def test_placeholder_and_layout_checks():
  p = placeholder_quantizer("IVF8,RaBitQ", D)
  assert isinstance(p, quant.RaBitQ) and p.coarse_centroids.shape == (8, D)
  assert quant.index_params(p, ("centroids",))["centroids"].shape == (8, D)
  assert placeholder_quantizer("RaBitQ", D).center.shape == (D,)
  check_index_for_mode("IVF8,RaBitQ", D, needs_quantizer=True, incremental=True,
                       learn=("centroids",))
  assert quant.supports_straight_through(faiss.index_factory(D, "RaBitQ4"))
  assert not quant.supports_straight_through(faiss.index_factory(D, "RaBitQfs"))
  with pytest.raises(ValueError, match="RaBitQ, which has no codebooks"):
    check_index_for_mode("IVF8,RaBitQ", D, needs_quantizer=True, incremental=False,
                         learn=("codebooks",))
  with pytest.raises(ValueError, match="cannot reproduce"):
    check_index_for_mode("IVF8,RaBitQfs", D, needs_quantizer=True, incremental=False)
  with pytest.raises(ValueError, match="JAX encodes 1-bit RaBitQ only"):
    rabitq.encode(rabitq.RaBitQ(center=jnp.zeros(D), nb_bits=4), jnp.zeros((2, D)))


@pytest.mark.parametrize("overrides,message", [
    ({"loss.distill_weight": 0.5}, r"config.loss.distill_weight=0.5: expected 0 on the RaBitQ"),
    ({"quant.learn": ("codebooks",)}, "RaBitQ, which has no codebooks"),
    ({"index.factory": "IVF8,RaBitQ4"}, r"config.quant.codes='recompute': expected 'index' "
                                         "on the 4-bit RaBitQ index"),
])
def test_validation_refuses_what_rabitq_cannot_train(overrides, message):
  config = base_config()
  config.index.factory = "IVF8,RaBitQ"
  config.index.nprobe = 4
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  with pytest.raises(ConfigError, match=message):
    validate_config(config, dim=D)


def test_dback_trains_on_ivf_rabitq_with_checkpoints_and_export(tiny_config, tmp_path):
  from qdr_jax import experiment, serving
  from qdr_jax.train.restore import restore_trained
  c = tiny_config
  c.index.factory = "IVF4,RaBitQ"
  c.quant.codes = "index"
  c.quant.learn = ("centroids",)
  c.optim.centroid_lr = 1e-2
  c.train.steps = 4
  c.index.rebuild_every = 2
  c.checkpoint.every = 2
  c.checkpoint.keep = 2
  workdir = tmp_path / "run"
  results = experiment.train_and_evaluate(c, workdir)
  assert "after" in results
  saved = restore_trained(workdir, step=4, extra=("index_params",))
  learned = saved["index_params"]["centroids"]
  earlier = restore_trained(workdir, step=2, extra=("index_params",))["index_params"]
  assert not np.allclose(learned, earlier["centroids"])
  assert (np.abs(saved["table"] - restore_trained(workdir, step=2)["table"]).max(1) > 0).sum()
  # The bundle's index holds the learned centroids, serves float queries (qb=0), and
  # stores the codes JAX computes for the trained table.
  bundle = serving.export_bundle(workdir, tmp_path / "bundle")
  index = faiss.read_index(str(bundle / serving.INDEX_FILE))
  q = quant.quantizer_from_faiss(index)
  assert isinstance(q, quant.RaBitQ) and q.qb == 0
  np.testing.assert_array_equal(q.coarse_centroids, learned)
  raw, lists = quant.stored_codes(index)
  bits, _, our_lists = rabitq.encode(q, jnp.asarray(saved["table"]))
  np.testing.assert_array_equal(np.asarray(our_lists), lists)
  np.testing.assert_array_equal(rabitq.split_codes(jnp.asarray(raw), q.dim)[0], bits)
  loaded = serving.load_bundle(bundle)
  assert loaded is not None
  # A resumed run restores the learned centroids into a RaBitQ-shaped state and goes on.
  c.train.steps = 6
  resumed = experiment.train_and_evaluate(c, workdir)
  assert resumed["steps"] == 6
  later = restore_trained(workdir, step=6, extra=("index_params",))["index_params"]
  assert not np.allclose(later["centroids"], learned)


@pytest.mark.parametrize("factory,codes", [("IVF4,RaBitQ", "index"), ("RaBitQ", "recompute"),
                                           ("IVF4,RaBitQ3", "index")])
def test_dback_trains_on_rabitq_through_refreshes(tiny_config, tmp_path, factory, codes):
  """Incremental and full refreshes keep the devices' codes FAISS's (stored codes), and
  the live forward encodes them on the device without IVF."""
  from qdr_jax.data.loader import load_dataset
  from qdr_jax.targets.encoders import embed_passages, load_encoders
  from qdr_jax.targets.table import build_or_load_table
  from qdr_jax.train.loop import train
  from qdr_jax.train.modes import get_mode
  import pathlib
  c = tiny_config
  c.index.factory = factory
  c.quant.codes = codes
  c.train.steps = 8 if codes == "index" else 4
  c.index.rebuild_every = 2
  c.index.full_rebuild_every = 4 if codes == "index" else 0
  dataset = load_dataset(c.data)
  encoders = load_encoders(c.model)
  table0 = np.asarray(build_or_load_table(c, dataset.corpus, pathlib.Path(c.table.cache_dir),
                                          embed_passages(encoders, c)))
  result = train(c, get_mode("dback"), dataset, encoders, table0, tmp_path)
  assert result.step == c.train.steps
  lifecycle = result.lifecycle
  assert isinstance(lifecycle.loss_inputs.quantizer, quant.RaBitQ)
  table = lifecycle.table_to_lead(result.state.table)
  assert (np.abs(table - table0).max(axis=1) > 0).sum() > 50
  if codes == "recompute":
    assert lifecycle.loss_inputs.codes is None
    return
  assert [r.kind for r in lifecycle.history] == ["full", "incremental", "full", "incremental"]
  raw, lists = quant.stored_codes(lifecycle.index)
  device = lifecycle.loss_inputs.codes
  np.testing.assert_array_equal(np.asarray(device["codes"])[:len(table)], raw)
  np.testing.assert_array_equal(np.asarray(device["lists"])[:len(table)], lists)
  # The refreshes re-encoded the moved rows: every row not written since the last one
  # (steps 7 and 8 wrote some) is stored as JAX codes its current value.
  fresh = np.ones(len(table), bool)
  fresh[lifecycle.changed.peek()] = False
  assert 0 < fresh.sum() < len(table)
  want_raw, want_lists = encoded_like_index(lifecycle.index, table[fresh])  # FAISS's encoder
  np.testing.assert_array_equal(raw[fresh], want_raw)
  np.testing.assert_array_equal(lists[fresh], want_lists)
  q = quant.quantizer_from_faiss(lifecycle.index)
  if q.nb_bits == 1:
    bits, _, our_lists = rabitq.encode(q, jnp.asarray(table[fresh]))
    np.testing.assert_array_equal(rabitq.split_codes(jnp.asarray(raw[fresh]), q.dim)[0], bits)
    np.testing.assert_array_equal(np.asarray(our_lists), lists[fresh])
