"""Index learning (config.quant.learn): learned codebooks, IVF centroids and OPQ rotation
round-trip through FAISS, get exact gradients, stay orthonormal, are written back (with
the whole table re-encoded) at every refresh, and end up in checkpoints and bundles."""

import json
import shutil

import faiss
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from qdr_jax import quant, sharding
from qdr_jax.config import base_config
from qdr_jax.index import lifecycle as index_lifecycle
from qdr_jax.index.build import build_quantized
from qdr_jax.index.lifecycle import IndexLifecycle, encoded_like_index, placeholder_quantizer
from qdr_jax.train import optim
from qdr_jax.train.modes import get_mode, mode_from_config
from qdr_jax.train.step import _update_index_params, pool_targets
from qdr_jax.validation import ConfigError, validate_config

ROWS, DIM = 2000, 32
_encode_with_lists = jax.jit(quant.encode_with_lists)


def _table(seed=0, rows=ROWS):
  x = np.random.default_rng(seed).standard_normal((rows, DIM)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(autouse=True)
def _small_stream_chunks(monkeypatch):
  monkeypatch.setattr(index_lifecycle, "STREAM_ROWS", 700)  # several chunks, the last one short


def _index_cfg(factory):
  c = base_config().index
  c.factory = factory
  c.nprobe = 4
  c.rebuild_every = 3
  c.full_rebuild_every = 0
  return c


def _moved(q: quant.Quantizer, learn, seed=1) -> dict:
  """``q``'s ``learn`` parameters moved far enough to change many codes and lists."""
  key = jax.random.key(seed)
  out = {}
  for name, value in quant.index_params(q, learn).items():
    key, sub = jax.random.split(key)
    moved = value + 0.3 * jnp.std(value) * jax.random.normal(sub, value.shape)
    out[name] = quant.orthogonalize(moved) if name == "rotation" else moved
  return out


FACTORIES = [("PQ8x8", ("codebooks",)),
             ("IVF16,PQ8x8", ("codebooks", "centroids")),
             ("OPQ8,IVF16,PQ8x8", ("codebooks", "centroids", "rotation"))]


@pytest.mark.parametrize("factory,learn", FACTORIES)
def test_write_back_round_trips_and_faiss_codes_equal_jax_codes(factory, learn):
  table = _table()
  index = build_quantized(table, _index_cfg(factory), 0)
  q = quant.quantizer_from_faiss(index)
  learned = _moved(q, learn)
  q_new = quant.with_index_params(q, learned)
  assert quant.write_quantizer_to_faiss(index, q_new, table) is index
  back = quant.quantizer_from_faiss(index)
  for name, value in quant.index_params(back, learn).items():
    np.testing.assert_array_equal(value, learned[name])  # float32 copied bit for bit
  want_codes, want_lists = (np.asarray(a) for a in _encode_with_lists(q_new, table))
  codes, lists = quant.stored_codes(index)
  sa_codes, sa_lists = encoded_like_index(index, table)  # FAISS's sa_encode
  old_codes = quant.stored_codes(build_quantized(table, _index_cfg(factory), 0))[0]
  assert (codes != old_codes).any(axis=1).mean() > 0.5  # the new parameters re-encoded
  # Exact ties between two codewords are the only way JAX and FAISS may differ.
  for got_codes, got_lists in ((codes, lists), (sa_codes, sa_lists)):
    np.testing.assert_array_equal(got_lists, want_lists)
    assert (got_codes != want_codes).mean() < 1e-3
  np.testing.assert_array_equal(codes, sa_codes)
  # A saved and read-back index (FAISS reads OPQ back as a LinearTransform) keeps them.
  read = quant.quantizer_from_faiss(faiss.deserialize_index(faiss.serialize_index(index)))
  for name, value in quant.index_params(read, learn).items():
    np.testing.assert_array_equal(value, learned[name])
  # Reconstructions in the original space equal FAISS's (rotation applied back).
  index_ivf = faiss.extract_index_ivf(index) if "IVF" in factory else None
  if index_ivf is not None:
    index_ivf.make_direct_map()
  np.testing.assert_allclose(index.reconstruct_n(0, 50),
                             quant.decode(q_new, jnp.asarray(codes[:50]), lists[:50]),
                             atol=1e-5)


def test_hnsw_coarse_quantizer_is_rebuilt_over_written_centroids():
  table = _table()
  index = build_quantized(table, _index_cfg("IVF16_HNSW8,PQ8x8"), 0)
  q = quant.quantizer_from_faiss(index)
  learned = _moved(q, ("centroids",))
  quant.write_quantizer_to_faiss(index, quant.with_index_params(q, learned), table)
  hnsw = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
  assert hnsw.ntotal == 16
  # The graph routes to the new centroids: each finds itself.
  _, ids = hnsw.search(np.asarray(learned["centroids"]), 1)
  np.testing.assert_array_equal(ids[:, 0], np.arange(16))


def test_write_back_refuses_a_non_orthonormal_rotation():
  table = _table()
  index = build_quantized(table, _index_cfg("OPQ8,IVF16,PQ8x8"), 0)
  q = quant.quantizer_from_faiss(index)
  with pytest.raises(ValueError, match="not orthonormal"):
    quant.write_quantizer_to_faiss(index, q.replace(rotation=q.rotation * 1.1), table)


def test_reconstruction_gradients_match_finite_differences():
  table = _table()
  index = build_quantized(table, _index_cfg("OPQ8,IVF16,PQ8x8"), 0)
  q = quant.quantizer_from_faiss(index)
  codes, lists = quant.stored_codes(index)
  rows = jnp.asarray(table[:40])
  codes, lists = jnp.asarray(codes[:40], jnp.uint8), jnp.asarray(lists[:40])
  w = jnp.asarray(np.random.default_rng(2).standard_normal(rows.shape), jnp.float32)
  learned = quant.index_params(q, quant.INDEX_PARAMS)

  def f(params):
    return jnp.sum(w * pool_targets(rows, q, params, codes, lists))

  check_grads(f, (learned,), order=1, modes=["rev"], eps=1e-2, atol=2e-2, rtol=2e-2)
  grads = jax.grad(f)(learned)
  # Only the lists the rows use get a centroid gradient; every parameter gets one.
  used = np.zeros(16, bool)
  used[np.asarray(lists)] = True
  g_c = np.abs(np.asarray(grads["centroids"])).sum(1)
  assert (g_c[~used] == 0).all() and (g_c[used] > 0).all()
  assert all(float(jnp.abs(g).sum()) > 0 for g in grads.values())


@pytest.mark.parametrize("scale", [1e-3, 10.0])  # Newton-Schulz near, the SVD far away
def test_orthogonalize_is_the_polar_factor(scale):
  base = np.linalg.qr(np.random.default_rng(0).standard_normal((DIM, DIM)))[0]
  r = base + scale * np.random.default_rng(1).standard_normal((DIM, DIM))
  u, _, vt = np.linalg.svd(r)
  got = np.asarray(jax.jit(quant.orthogonalize)(jnp.asarray(r, jnp.float32)))
  np.testing.assert_allclose(got, u @ vt, atol=2e-5)


def test_rotation_stays_orthonormal_after_many_updates():
  cfg = base_config().optim
  cfg.rotation_lr = 1e-2
  cfg.warmup_steps = 0
  learn = ("codebooks", "rotation")
  tx, schedules = optim.make_index_optimizer(cfg, 500, learn)
  assert set(schedules) == set(learn)
  params = {"codebooks": jnp.zeros((8, 16, 4)),
            "rotation": quant.orthogonalize(jax.random.normal(jax.random.key(0), (DIM, DIM)))}

  class _State:  # the two fields _update_index_params reads
    def __init__(self, p, s):
      self.index_params, self.index_opt_state = p, s

  @jax.jit
  def step(params, opt_state, key):
    grads = jax.tree.map(lambda p: jax.random.normal(key, p.shape), params)
    return _update_index_params(_State(params, opt_state), grads, tx)

  opt_state = tx.init(params)
  start = params["rotation"]
  for i in range(500):
    params, opt_state = step(params, opt_state, jax.random.key(i))
  r = np.asarray(params["rotation"], np.float64)
  assert np.linalg.norm(r @ r.T - np.eye(DIM)) < 1e-5
  assert np.abs(r - np.asarray(start)).max() > 0.1  # it did move


def test_lifecycle_refresh_writes_learned_parameters_and_reencodes_everything():
  table = _table()
  mesh = sharding.make_mesh(base_config().sharding)
  lifecycle = IndexLifecycle(_index_cfg("OPQ8,IVF16,PQ8x8"), mesh=mesh, num_rows=ROWS,
                             padded_rows=sharding.padded_rows(ROWS, mesh), quantize=True,
                             codes_from_index=True, learn_index=True)
  device_table = sharding.put_rows(table, mesh, True, ROWS)
  lifecycle.build(device_table)
  q = lifecycle.loss_inputs.quantizer
  learned = _moved(q, quant.INDEX_PARAMS)
  lifecycle.note_updated(np.arange(5))  # a few moved rows: the refresh still does all
  assert lifecycle.maybe_refresh(2, device_table, learned) is None
  assert lifecycle.maybe_refresh(3, device_table, learned) == "learned"
  assert lifecycle.history[-1].rows == ROWS and len(lifecycle.changed) == 0
  synced = lifecycle.loss_inputs.quantizer
  for name, value in quant.index_params(synced, quant.INDEX_PARAMS).items():
    np.testing.assert_array_equal(value, learned[name])
  codes, lists = quant.stored_codes(lifecycle.index)
  device = {n: np.asarray(jax.device_get(a))[:ROWS]
            for n, a in lifecycle.loss_inputs.codes.items()}
  np.testing.assert_array_equal(device["codes"], codes)
  np.testing.assert_array_equal(device["lists"], lists)
  want_codes, want_lists = _encode_with_lists(synced, table)
  np.testing.assert_array_equal(lists, want_lists)
  assert (codes != np.asarray(want_codes)).mean() < 1e-3


@pytest.mark.parametrize("factory", ["PQ8x4fs", "IVF16,PQ8x4fs"])
def test_the_served_index_of_a_fast_scan_family_is_rewritten_and_refilled(factory):
  # After training the served index takes the training's quantizer and every row again
  # (`write_index_params`): FAISS's fast-scan indexes crash on the empty add in between.
  table = _table()
  mesh = sharding.make_mesh(base_config().sharding)
  lifecycle = IndexLifecycle(_index_cfg(factory), mesh=mesh, num_rows=ROWS,
                             padded_rows=sharding.padded_rows(ROWS, mesh), quantize=True,
                             codes_from_index=True, learn_index=False)
  device_table = sharding.put_rows(table, mesh, True, ROWS)
  lifecycle.build(device_table)
  before = faiss.serialize_index(lifecycle.index)
  lifecycle.write_index_params(device_table, None, sync=False)
  assert lifecycle.index.ntotal == ROWS
  np.testing.assert_array_equal(faiss.serialize_index(lifecycle.index), before)


def test_placeholder_quantizer_has_the_index_shapes():
  table = _table()
  q = quant.quantizer_from_faiss(build_quantized(table, _index_cfg("OPQ8,IVF16,PQ8x8"), 0))
  p = placeholder_quantizer("OPQ8,IVF16,PQ8x8", DIM)
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q)):
    assert a.shape == b.shape


def test_modes_with_learned_index_parameters():
  assert get_mode("jpq").learn == ("codebooks",)
  mode = get_mode("query_only", ("rotation", "codebooks"))
  assert mode.learn == ("codebooks", "rotation") and mode.quantize and not mode.update_rows
  assert get_mode("dback", True).learn == ("codebooks",)  # True: the codebooks
  assert get_mode("jpq", ("centroids",)).learn == ("codebooks", "centroids")
  with pytest.raises(ValueError, match="config.quant.learn.*dback_no_ste"):
    get_mode("dback_no_ste", ("codebooks",))
  with pytest.raises(ValueError, match="config.quant.learn.*posthoc"):
    get_mode("posthoc", ("codebooks",))
  with pytest.raises(ValueError, match="config.quant.learn holds"):
    get_mode("dback", ("codebook",))
  config = base_config()
  config.quant.learn = ("centroids", "codebooks")
  assert mode_from_config(config).learn == ("codebooks", "centroids")


@pytest.mark.parametrize("factory,learn,message", [
    ("PQ8x8", ("centroids",), "config.quant.learn has 'centroids' but index factory 'PQ8x8' "
                              "has no IVF"),
    ("IVF16,PQ8x8", ("rotation",), "config.quant.learn has 'rotation' but index factory "
                                   "'IVF16,PQ8x8' has no OPQ"),
    ("IVF16,SQ8", ("codebooks",), "config.quant.learn=.* is impossible"),
    ("OPQ8,IVF16,PQ8x8", (1,), r"config.quant.learn=\(1,\): expected a tuple"),
])
def test_config_refuses_what_cannot_be_learned(tiny_config, factory, learn, message):
  tiny_config.index.factory = factory
  tiny_config.index.nprobe = 1
  tiny_config.quant.learn = learn
  with pytest.raises(ConfigError, match=message):
    validate_config(tiny_config, dim=DIM)


def test_tiny_run_learns_all_three_and_bundle_carries_them(tiny_config, tmp_path):
  from qdr_jax import experiment, serving
  from qdr_jax.train.restore import restore_trained
  tiny_config.index.factory = "OPQ4,IVF4,PQ4x8"
  tiny_config.quant.learn = ("codebooks", "centroids", "rotation")
  tiny_config.optim.codebook_lr = tiny_config.optim.centroid_lr = 1e-2
  tiny_config.optim.rotation_lr = 1e-2
  tiny_config.train.steps = 4
  tiny_config.index.rebuild_every = 2
  tiny_config.checkpoint.every = 2
  workdir = tmp_path / "run"
  tiny_config.checkpoint.keep = 2
  results = experiment.train_and_evaluate(tiny_config, workdir)
  assert "after" in results
  saved = restore_trained(workdir, step=4, extra=("index_params",))
  learned = saved["index_params"]
  assert sorted(learned) == ["centroids", "codebooks", "rotation"]
  r = learned["rotation"].astype(np.float64)
  assert np.linalg.norm(r @ r.T - np.eye(len(r))) < 1e-5
  # They train: step 2's differ from step 4's ...
  earlier = restore_trained(workdir, step=2, extra=("index_params",))["index_params"]
  for name in learned:
    assert not np.allclose(learned[name], earlier[name]), name
  # ... and the exported index carries them, the whole table encoded with them.
  bundle = serving.export_bundle(workdir, tmp_path / "bundle")
  index = faiss.read_index(str(bundle / serving.INDEX_FILE))
  q = quant.quantizer_from_faiss(index)
  for name, value in quant.index_params(q, quant.INDEX_PARAMS).items():
    np.testing.assert_array_equal(value, learned[name])
  codes, lists = quant.stored_codes(index)
  want_codes, want_lists = _encode_with_lists(q, saved["table"])
  np.testing.assert_array_equal(lists, want_lists)
  assert (codes != np.asarray(want_codes)).mean() < 1e-3

  # A checkpoint without its index (multi-process ones used to leave it out) cannot
  # serve its learned parameters: the export is refused rather than rebuilt by k-means.
  old = tmp_path / "without_index"
  shutil.copytree(workdir, old)
  step = old / "checkpoints" / "4"
  shutil.rmtree(step / "index")
  meta = json.loads((step / "meta" / "metadata").read_text())
  del meta["index_crc32"], meta["index_changed_rows"]
  (step / "meta" / "metadata").write_text(json.dumps(meta))
  with pytest.raises(serving.BundleError, match=r"checkpoints/4: holds learned index "
                     r"parameters \['centroids', 'codebooks', 'rotation'\] but no FAISS index"):
    serving.export_bundle(old, tmp_path / "refused")
  assert not (tmp_path / "refused").exists()


def test_resume_refuses_a_checkpoint_from_before_index_params(tmp_path):
  """A run that learned codebooks before quant.learn saved them as ``codebooks``; resuming
  it is refused with a message naming the change (not an Orbax error)."""
  from qdr_jax.train import loop
  from qdr_jax.train.checkpoint import Checkpointer
  from qdr_jax.train.resume import MetadataMismatchError, make_metadata
  config = base_config()
  config.train.mode = "jpq"
  state = {"table": np.zeros((8, 4), np.float32), "codebooks": np.zeros((2, 4, 2), np.float32)}
  meta = make_metadata(config, step=1, corpus_size=8, table_rows=8, dim=4,
                       table_dtype="float32", has_codebooks=True)
  del meta["index_params"]  # as written before quant.learn
  with Checkpointer(tmp_path, keep=2) as ckpt:
    ckpt.save(state, meta)
    ckpt.wait_until_finished()
  with Checkpointer(tmp_path, read_only=True) as ckpt:
    new_state = type("S", (), {"table": state["table"]})()
    with pytest.raises(MetadataMismatchError, match="written before config.quant.learn"):
      loop._resume(config, ckpt, new_state, None, 8, None, {})
