"""The jitted train step: gradients through the split encode/update, row updates, schedules."""

import functools
import faiss
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdr_jax import sharding
from qdr_jax.config import base_config
from qdr_jax.models import BertEncoder, EncoderConfig, init_params
from qdr_jax.negatives.pool import build_pool
from qdr_jax.quant import quantize, quantizer_from_faiss
from qdr_jax.train import optim
from qdr_jax.train.state import init_state
from qdr_jax.train.loss import contrastive_loss
from qdr_jax.train.modes import get_mode
from qdr_jax.train.step import make_step_functions, pool_targets

DIM, ROWS, BATCH, SEQ = 32, 512, 4, 8


def _setup(mode_name="dback", steps=10, factory="PQ4x8np", **settings):
  """The step's pieces on a tiny encoder and table; ``settings`` ("loss.distill_weight":
  2.0, ...) are further config values. The factory's "np" skips FAISS's polysemous
  training, which nothing here uses and which takes seconds even on 512 rows."""
  config = base_config()
  for key, value in settings.items():
    section, name = key.split(".")
    config[section][name] = value
  config.train.steps = steps
  config.loss.temperature = 0.1
  config.optim.warmup_steps = 0  # so the first step already moves
  config.optim.encoder_lr = 1e-3
  config.optim.row_lr = 1e-2
  config.optim.codebook_lr = 1e-2
  config.sharding.num_devices = 1
  name, _, learned = mode_name.partition("+")  # "dback+codebooks": dback learning codebooks
  mode = get_mode(name, tuple(learned.split("+")) if learned else ())
  module = BertEncoder(EncoderConfig.tiny(pooling="mean", normalize=True))
  params = init_params(module, jax.random.key(0))
  rng = np.random.default_rng(0)
  table = rng.normal(size=(ROWS, DIM)).astype(np.float32)
  index = faiss.index_factory(DIM, factory, faiss.METRIC_INNER_PRODUCT)
  index.train(table)
  index.add(table)
  quantizer = quantizer_from_faiss(index)
  mesh = sharding.make_mesh(config.sharding)
  encoder_tx, _ = optim.make_encoder_optimizer(config.optim, steps)
  row_tx = optim.make_row_transform(config.optim)
  row_lr = optim.make_schedule(config.optim.row_lr, config.optim, steps)
  cb_tx = (optim.make_index_optimizer(config.optim, steps, mode.learn)[0]
           if mode.learns_index else None)
  state = init_state(config, mode, params, table, quantizer, mesh, encoder_tx, row_tx, cb_tx)
  apply = lambda p, **t: module.apply({"params": p}, t["input_ids"], t["attention_mask"],
                                      t["token_type_ids"])
  fns = make_step_functions(apply, mode, config, encoder_tx, row_tx, row_lr, cb_tx)
  tokens = {"input_ids": jnp.asarray(rng.integers(1, 100, (BATCH, SEQ)), jnp.int32),
            "attention_mask": jnp.ones((BATCH, SEQ), jnp.int32),
            "token_type_ids": jnp.zeros((BATCH, SEQ), jnp.int32)}
  pool = build_pool(rng.integers(0, ROWS, (BATCH, 5)),
                    [np.array([i]) for i in range(BATCH)], pool_size=16, num_rows=ROWS,
                    max_positives=1, rng=rng, fill_valid=False)
  return config, mode, module, params, table, quantizer, state, fns, tokens, pool, apply


def test_step_changes_exactly_the_pooled_rows():
  *_, table, quantizer, state, fns, tokens, pool, _ = _setup()
  q, vjp = fns.encode(state.params, tokens)
  arrays = {k: jnp.asarray(v) for k, v in pool.arrays().items()}
  new_state, metrics = fns.update(state, vjp, q, arrays, quantizer)
  new_table = np.asarray(new_state.table)
  changed = np.flatnonzero(np.any(new_table != table, axis=1))
  assert set(changed.tolist()) == set(pool.row_ids[pool.valid].tolist())
  # Per-row optimizer state moved for those rows only, and counts them.
  counts = np.asarray(new_state.row_opt_state.count)
  assert set(np.flatnonzero(counts).tolist()) == set(changed.tolist())
  assert int(new_state.step) == 1 and np.isfinite(metrics["loss"])


def test_split_step_gradient_equals_direct_gradient():
  """encode's VJP pulled back in update == jax.grad of the whole loss w.r.t. params."""
  config, mode, module, params, table, quantizer, state, fns, tokens, pool, apply = _setup()
  arrays = {k: jnp.asarray(v) for k, v in pool.arrays().items()}
  rows = jnp.asarray(table)[arrays["row_ids"]]

  def full_loss(p):
    targets = pool_targets(rows, quantizer, None)
    return contrastive_loss(apply(p, **tokens), targets, arrays["positive_mask"],
                            arrays["hidden_mask"], arrays["valid"],
                            temperature=config.loss.temperature)[0]

  direct = jax.grad(full_loss)(params)
  q, vjp = fns.encode(params, tokens)
  g_q = jax.grad(lambda q: contrastive_loss(
      q, pool_targets(rows, quantizer, None), arrays["positive_mask"], arrays["hidden_mask"],
      arrays["valid"], temperature=config.loss.temperature)[0])(q)
  (split,) = vjp(g_q)
  # float32 sums of terms up to ~100 in another order: the error scales with the largest
  # gradient entry, so small entries get that much absolute slack.
  scale = max(float(np.abs(np.asarray(b)).max()) for b in jax.tree.leaves(split))
  for a, b in zip(jax.tree.leaves(direct), jax.tree.leaves(split)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                               atol=max(1e-5, 1e-6 * scale))


def test_pool_targets_forward_is_reconstruction_and_gradient_identity():
  *_, table, quantizer, _state, _fns, _tokens, _pool, _ = _setup()
  rows = jnp.asarray(table[:10])
  np.testing.assert_allclose(pool_targets(rows, quantizer, None), quantize(quantizer, rows),
                             atol=1e-6)
  w = jnp.asarray(np.random.default_rng(3).normal(size=rows.shape), jnp.float32)
  grad = jax.grad(lambda x: jnp.sum(w * pool_targets(x, quantizer, None)))(rows)
  np.testing.assert_allclose(grad, w, atol=1e-6)
  # Codebooks get a gradient through the reconstruction when learned.
  g_cb = jax.grad(lambda cb: jnp.sum(w * pool_targets(rows, quantizer, {"codebooks": cb})))(
      quantizer.codebooks)
  assert float(jnp.abs(g_cb).sum()) > 0


@pytest.mark.parametrize("mode_name", ["dback", "dback_no_ste", "jpq", "query_only"])
def test_modes_update_what_they_should(mode_name):
  _, mode, _, params, table, quantizer, state, fns, tokens, pool, _ = _setup(mode_name)
  q, vjp = fns.encode(state.params, tokens)
  arrays = {k: jnp.asarray(v) for k, v in pool.arrays().items()}
  codebooks_before = None if state.index_params is None else np.asarray(
      state.index_params["codebooks"])
  new_state, _ = fns.update(state, vjp, q, arrays, quantizer)
  table_moved = not np.array_equal(np.asarray(new_state.table), table)
  params_moved = any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(params), jax.tree.leaves(jax.device_get(new_state.params))))
  assert table_moved == mode.update_rows
  assert params_moved == mode.update_encoder
  if mode.learn_codebooks:
    assert not np.array_equal(np.asarray(new_state.index_params["codebooks"]),
                              codebooks_before)


def test_schedule_values():
  config = base_config()
  config.optim.warmup_steps = 10
  config.optim.end_lr_fraction = 0.1
  sched = optim.make_schedule(1.0, config.optim, total_steps=110)
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(float(sched(5)), 0.5, rtol=1e-6)
  np.testing.assert_allclose(float(sched(10)), 1.0, rtol=1e-6)
  # Cosine half-way through the decay: end + (peak - end) / 2.
  np.testing.assert_allclose(float(sched(60)), 0.55, rtol=1e-5)
  np.testing.assert_allclose(float(sched(110)), 0.1, rtol=1e-5)
  config.optim.schedule = "linear"
  lin = optim.make_schedule(1.0, config.optim, total_steps=110)
  np.testing.assert_allclose(float(lin(60)), 0.55, rtol=1e-5)
  config.optim.schedule = "constant"
  const = optim.make_schedule(2.0, config.optim, total_steps=110)
  np.testing.assert_allclose([float(const(s)) for s in (5, 50, 109)], [1.0, 2.0, 2.0])


def test_index_codes_give_the_served_reconstruction():
  """Decoding the codes FAISS stores equals re-encoding rows the index was built from."""
  from qdr_jax.quant import stored_codes
  *_, table, quantizer, _state, _fns, _tokens, _pool, _ = _setup()
  index = faiss.index_factory(DIM, "PQ4x8np", faiss.METRIC_INNER_PRODUCT)
  index.train(table)
  index.add(table)
  quantizer = quantizer_from_faiss(index)
  codes, lists = stored_codes(index)
  rows = jnp.asarray(table[:50])
  served = pool_targets(rows, quantizer, None, jnp.asarray(codes[:50], jnp.uint8),
                        jnp.asarray(lists[:50]))
  np.testing.assert_allclose(served, pool_targets(rows, quantizer, None), atol=1e-5)
  w = jnp.ones_like(rows)
  grad = jax.grad(lambda x: jnp.sum(w * pool_targets(x, quantizer, None,
                                                     jnp.asarray(codes[:50]), None)))(rows)
  np.testing.assert_allclose(grad, w)


def test_pseudo_positive_term_adds_its_loss():
  """Pseudo-queries labelled with their own passage (the batch's last two) get their own
  contrastive term, averaged on its own and added to the training queries'; the encoder,
  the rows and the learned codebooks all move."""
  config, _, _, _, table, quantizer, state, fns, tokens, pool, _ = _setup(
      "dback+codebooks", **{"negatives.pseudo_queries": 2,
                            "negatives.pseudo_query_source": "positive"})
  q, vjp = fns.encode(state.params, tokens)
  arrays = {k: jnp.asarray(v) for k, v in pool.arrays().items()}
  before = jax.device_get(state)
  new_state, metrics = fns.update(state, vjp, q, arrays, quantizer)
  after = jax.device_get(new_state)
  rows = jnp.asarray(table)[arrays["row_ids"]]
  targets = pool_targets(rows, quantizer, None)
  part = lambda queries: contrastive_loss(
      q[queries], targets, arrays["positive_mask"][queries], arrays["hidden_mask"][queries],
      arrays["valid"], temperature=config.loss.temperature)[0]
  np.testing.assert_allclose(metrics["contrastive_loss"], part(slice(0, 2)), rtol=1e-5)
  np.testing.assert_allclose(metrics["pseudo_loss"], part(slice(2, 4)), rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], part(slice(0, 2)) + part(slice(2, 4)),
                             rtol=1e-5)
  moved = lambda a, b: any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a),
                                                                     jax.tree.leaves(b)))
  assert moved(before.index_params, after.index_params)
  assert moved(before.params, after.params) and moved(before.table, after.table)


# --- bfloat16 tables --------------------------------------------------------------------

def test_stochastic_round_is_unbiased_and_deterministic():
  x = jnp.asarray(np.random.default_rng(0).normal(0, 0.05, 64), jnp.float32)
  lower = x.astype(jnp.bfloat16)  # rounding to nearest gives one of the two neighbours
  spacing = np.asarray(jnp.abs(x), np.float32)  # bfloat16 spacing at x: 2^(e - 7)
  spacing = 2.0 ** (np.floor(np.log2(spacing)) - 7)
  keys = jax.random.split(jax.random.key(3), 4096)
  draws = np.asarray(jax.vmap(lambda k: optim.stochastic_round_bf16(x, k))(keys), np.float32)
  xs = np.asarray(x)
  # Every draw is x's lower or upper bfloat16 neighbour...
  assert np.all(np.abs(draws - xs) < spacing)
  assert np.all((draws == np.floor(xs / spacing) * spacing)
                | (draws == np.ceil(xs / spacing) * spacing))
  # ...and their mean is x: a draw's error has std <= spacing / 2, so the mean of 4096
  # has std <= spacing / 128; 5 of those bound every one of the 64 elements.
  assert np.all(np.abs(draws.mean(0) - xs) < 5 * spacing / 128)
  # Plain rounding's bias is up to half a spacing; check the test could see it.
  assert np.abs(np.asarray(lower, np.float32) - xs).max() > 0.2 * spacing.max() / 2
  # The same key gives the same bits; another key other bits; bfloat16 values stay put.
  np.testing.assert_array_equal(optim.stochastic_round_bf16(x, keys[0]),
                                optim.stochastic_round_bf16(x, keys[0]))
  assert not np.array_equal(draws[0], draws[1])
  exact = lower.astype(jnp.float32)
  np.testing.assert_array_equal(optim.stochastic_round_bf16(exact, keys[5]), lower)
  special = jnp.asarray([jnp.nan, jnp.inf, -jnp.inf, 0.0], jnp.float32)
  np.testing.assert_array_equal(
      np.asarray(optim.stochastic_round_bf16(special, keys[0]), np.float32),
      np.asarray(special))


def _row_runs(row_optimizer: str, unit_rows: bool, steps: int = 5, rows: int = 256,
              dim: int = 32, lr: float = 1e-4, seeds: int = 8):
  """Displacements of ``rows`` table rows after ``steps`` row updates at the demo's row lr
  from rows of magnitude ~0.05 (bfloat16-exact at the start; unit rows of 384 when
  ``unit_rows``), by table kind, all fed the same gradients; also the final states.
  Stochastic rounding runs with ``seeds`` keys."""
  from qdr_jax.train.state import TrainState
  rng = np.random.default_rng(0)
  start = rng.normal(0, 0.05, (rows, dim))
  if unit_rows:  # unit rows of MiniLM's width, whose entries are ~0.05 too
    start = rng.normal(size=(rows, 384))
    start /= np.linalg.norm(start, axis=1, keepdims=True)
  start = np.asarray(jnp.asarray(start, jnp.bfloat16), np.float32)
  grads = rng.normal(size=(steps,) + start.shape).astype(np.float32)
  row_tx = optim.make_row_transform(ml_config(row_optimizer))
  out = {}
  kinds = [("f32", jnp.float32, None, 0), ("nearest", jnp.bfloat16, None, 0),
           ("master", jnp.bfloat16, "master", 0)]
  kinds += [(f"stochastic{seed}", jnp.bfloat16, "stochastic", seed) for seed in range(seeds)]
  for kind, dtype, rounding, seed in kinds:
    table = jnp.asarray(start, dtype)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=None, encoder_opt_state=None,
                       table=table,
                       row_opt_state=optim.init_row_state(row_tx, table, rounding == "master"),
                       index_params=None, index_opt_state=None, rng=jax.random.key(seed))
    for g in grads:
      state = _row_update(state, jnp.asarray(g), row_tx, lr, rounding)
    out[kind] = (np.asarray(state.table, np.float32) - start, state)
  return out


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _row_update(state, g, row_tx, lr, rounding):
  from qdr_jax.train.step import _update_rows
  ids = jnp.arange(g.shape[0])
  table, row_state = _update_rows(state, ids, jnp.ones(g.shape[0], bool),
                                  state.table.astype(jnp.float32), g, row_tx, lr, rounding)
  return state.replace(step=state.step + 1, table=table, row_opt_state=row_state)


def ml_config(row_optimizer: str):
  config = base_config().optim
  config.row_optimizer = row_optimizer
  return config


@pytest.mark.parametrize("row_optimizer,unit_rows",
                         [("adam", False), ("sgd", False), ("adam", True)])
def test_bf16_table_rows_follow_float32_at_small_lr(row_optimizer, unit_rows):
  runs = _row_runs(row_optimizer, unit_rows)
  d32 = runs["f32"][0]
  norm32 = np.linalg.norm(d32)

  def along(d):  # the displacement's component along the float32 one, as a fraction
    return float(np.sum(d * d32) / norm32 ** 2)

  if row_optimizer == "adam":
    # Rounding to nearest drops Adam's steps of ~lr wherever |x| >= 2^-5 (the bug): rows
    # follow the float32 update far less. (SGD's larger-gradient entries still move.)
    assert along(runs["nearest"][0]) < 0.75
  # Stochastic rounding follows in expectation: each run is unbiased along the float32
  # update and moves every row; the mean over 8 keys has the float32 update's norm within
  # 10% (one run's norm is up to ~30% larger: its rounding noise, which averages out).
  d_sr = np.stack([runs[f"stochastic{seed}"][0] for seed in range(8)])
  for d in d_sr:
    assert abs(along(d) - 1) < 0.1
    assert np.all(np.any(d != 0, axis=1))
  assert abs(np.linalg.norm(d_sr.mean(0)) / norm32 - 1) < 0.1
  # Master copies take exactly the float32 steps; the table is them rounded to nearest.
  d_master, master_state = runs["master"]
  f32_table = np.asarray(runs["f32"][1].table)
  np.testing.assert_array_equal(np.asarray(master_state.row_opt_state.master), f32_table)
  np.testing.assert_array_equal(np.asarray(master_state.table),
                                np.asarray(jnp.asarray(f32_table, jnp.bfloat16)))
  assert abs(along(d_master) - 1) < 0.1
  # The optimizer state is the float32 run's (it never sees the table's rounding here:
  # the gradients are given).
  for a, b in zip(jax.tree.leaves(runs["f32"][1].row_opt_state),
                  jax.tree.leaves(master_state.row_opt_state.opt)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_stochastic_rounding_bits_come_from_the_key_and_step():
  """The same state rounds the same way (a resumed run redraws the same bits); another
  step or key rounds otherwise."""
  from qdr_jax.train.state import TrainState
  from qdr_jax.train.step import _update_rows
  rng = np.random.default_rng(1)
  rows = jnp.asarray(rng.normal(0, 0.05, (64, 32)), jnp.bfloat16)
  grads = jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)
  row_tx = optim.make_row_transform(ml_config("sgd"))

  def table_after(step, seed):
    state = TrainState(step=jnp.asarray(step, jnp.int32), params=None, encoder_opt_state=None,
                       table=rows, row_opt_state=optim.init_row_state(row_tx, rows),
                       index_params=None, index_opt_state=None, rng=jax.random.key(seed))
    return np.asarray(_update_rows(state, jnp.arange(64), jnp.ones(64, bool),
                                   rows.astype(jnp.float32), grads, row_tx, 1e-4,
                                   "stochastic")[0], np.float32)

  first = table_after(3, 0)
  np.testing.assert_array_equal(first, table_after(3, 0))
  assert not np.array_equal(first, table_after(4, 0))
  assert not np.array_equal(first, table_after(3, 1))


def test_bf16_table_trains_end_to_end_like_float32(tiny_config, tmp_path, monkeypatch):
  """80 steps on the tiny BEIR data with float32, stochastically rounded and master-row
  bfloat16 tables: the bfloat16 runs' rows move as much as float32's and their metrics
  are within seed noise of it; the checkpointed table is bfloat16.

  The row lr is 3e-4: Adam's steps of ~lr are below half the bfloat16 spacing (4.9e-4)
  of the tiny table's entries >= 1/8 in magnitude, which plain rounding would freeze.
  Tolerance: over seeds 0-2 (this test's settings) the float32 run's quantized nDCG@10
  was .364 / .344 / .421 (std .04), and the bfloat16 runs differed from it by at most
  .037 at the same seed (stochastic +.001 / +.034 / -.017, master -.005 / +.024 / -.037);
  0.06 is 1.5 seed standard deviations.
  """
  import jax
  import shutil
  from qdr_jax.train import checkpoint
  from qdr_jax.train.checkpoint import Checkpointer, checkpoint_dir
  from qdr_jax.experiment import train_and_evaluate
  tiny_config.data.eval_split = "train"  # a random tiny encoder only learns what it sees
  tiny_config.optim.row_lr = 3e-4
  tiny_config.quant.codes = "index"  # the tolerance below was calibrated with stored codes
  tiny_config.checkpoint.every = 40  # keeps steps 40 and 80: the rows' last 40 steps
  monkeypatch.setattr(checkpoint, "ASYNC_SAVE", False)
  results, moves, rows = {}, {}, 600
  for kind in ("f32", "stochastic", "master"):
    tiny_config.table.dtype = "float32" if kind == "f32" else "bfloat16"
    tiny_config.table.bf16_update = "master" if kind == "master" else "stochastic"
    workdir = tmp_path / kind
    results[kind] = train_and_evaluate(tiny_config, workdir)["after"]
    ckpt = Checkpointer.from_config(tiny_config, workdir, read_only=True)
    dtype = jnp.dtype(tiny_config.table.dtype)
    assert ckpt.read_metadata(80)["table_dtype"] == dtype.name
    target = {"table": jax.ShapeDtypeStruct((rows, 32), dtype)}
    t40, t80 = (ckpt.restore_arrays(target, step=s).state["table"] for s in (40, 80))
    assert t80.dtype == dtype and t80.nbytes == rows * 32 * dtype.itemsize
    moves[kind] = np.asarray(t80, np.float32) - np.asarray(t40, np.float32)
    if kind != "f32":
      # Resumed from step 40 (the row state, master rows included, restored), the run
      # redraws the same rounding bits and ends on the same bfloat16 table.
      shutil.rmtree(checkpoint_dir(workdir) / "80")
      train_and_evaluate(tiny_config, workdir)
      resumed = Checkpointer.from_config(tiny_config, workdir, read_only=True)
      np.testing.assert_array_equal(
          np.asarray(resumed.restore_arrays(target, step=80).state["table"], np.float32),
          np.asarray(t80, np.float32))
  d32 = moves["f32"]
  moved32 = np.any(d32 != 0, axis=1).sum()
  assert moved32 > 0.9 * rows
  for kind in ("stochastic", "master"):
    for name, value in results[kind]["quantized"].items():
      assert abs(value - results["f32"]["quantized"][name]) < 0.06, (kind, name, results)
    # As many rows moved, and along the float32 run's moves (seed 0: 0.91 stochastic,
    # 0.95 master; the runs' encoders drift apart too). Their norms are larger (1.5x,
    # 1.35x): the stored values carry rounding noise of up to one spacing.
    assert np.any(moves[kind] != 0, axis=1).sum() > 0.95 * moved32
    along = np.sum(moves[kind] * d32) / np.sum(d32 * d32)
    assert 0.8 < along < 1.2, (kind, along)


@pytest.mark.parametrize("scope", ["encoder", "all"])
def test_clip_scope_all_scales_the_rows_by_the_joint_norm(scope):
  """With optim.clip_scope='all' the rows' step is scaled by clip / |(encoder, rows)|
  (plain SGD rows show the scale exactly); with 'encoder' the rows are not clipped."""
  def row_step(grad_clip):
    *_, table, quantizer, state, fns, tokens, pool, _ = _setup(
        "dback_no_ste", **{"optim.row_optimizer": "sgd", "optim.clip_scope": scope,
                           "optim.grad_clip": grad_clip})
    q, vjp = fns.encode(state.params, tokens)
    arrays = {k: jnp.asarray(v) for k, v in pool.arrays().items()}
    new_state, metrics = fns.update(state, vjp, q, arrays, quantizer)
    return np.asarray(new_state.table) - table, metrics

  free, metrics = row_step(0.0)
  encoder_norm, row_norm = float(metrics["encoder_grad_norm"]), float(metrics["row_grad_norm"])
  bound = np.hypot(encoder_norm, row_norm) / 4
  # The rows' own norm is under the bound: only the joint norm can scale them.
  assert row_norm < bound
  clipped, clipped_metrics = row_step(float(bound))
  scale = 0.25 if scope == "all" else 1.0
  assert np.abs(free).max() > 1e-3  # steps far above the table's float32 spacing
  np.testing.assert_allclose(clipped, free * scale, rtol=1e-3, atol=2e-6)
  # The logged norms are the gradients' before the clip.
  np.testing.assert_allclose(clipped_metrics["row_grad_norm"], metrics["row_grad_norm"],
                             rtol=1e-6)


def test_rows_only_moves_the_pooled_rows_and_not_the_encoder():
  *_, params, table, quantizer, state, fns, tokens, pool, _ = _setup("rows_only")
  q, vjp = fns.encode(state.params, tokens)
  arrays = {k: jnp.asarray(v) for k, v in pool.arrays().items()}
  new_state, metrics = fns.update(state, vjp, q, arrays, quantizer)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new_state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  changed = np.flatnonzero(np.any(np.asarray(new_state.table) != table, axis=1))
  assert set(changed.tolist()) == set(pool.row_ids[pool.valid].tolist())
  assert "encoder_grad_norm" not in metrics and new_state.encoder_opt_state is None


def test_step_scores_a_pool_with_repeats():
  """A pool that keeps repeats (negatives.dedup=False) reaches the jitted loss: the
  step's loss is the multiplicity-weighted one."""
  config, *_, table, quantizer, state, fns, tokens, _, _ = _setup("dback_no_ste")
  rng = np.random.default_rng(1)
  pool = build_pool(rng.integers(0, 8, (BATCH, 6)) + BATCH,
                    [np.array([i]) for i in range(BATCH)], pool_size=16, num_rows=ROWS,
                    max_positives=1, rng=rng, fill_valid=False, dedup=False)
  assert pool.multiplicity.max() > 1
  q, vjp = fns.encode(state.params, tokens)
  arrays = {k: jnp.asarray(v) for k, v in pool.arrays().items()}
  rows = jnp.asarray(table)[arrays["row_ids"]]
  expected = contrastive_loss(q, rows, arrays["positive_mask"], arrays["hidden_mask"],
                              arrays["valid"], temperature=config.loss.temperature,
                              multiplicity=arrays["multiplicity"])[0]
  unweighted = contrastive_loss(q, rows, arrays["positive_mask"], arrays["hidden_mask"],
                                arrays["valid"], temperature=config.loss.temperature)[0]
  _, metrics = fns.update(state, vjp, q, arrays, quantizer)
  np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
  assert abs(float(expected) - float(unweighted)) > 1e-3
