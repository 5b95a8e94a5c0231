"""Every accelerator branch, run on CPU by making `qdr_jax.platform` answer "gpu" or
"tpu", checked against the CPU branch: the encoder's forward and gradients, a training
step, the PQ codes; the attention kernel's selection and its fallback; and codes that
stay FAISS's under a GPU's TF32 matmuls."""

import faiss
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core

from qdr_jax import platform, quant
from qdr_jax.models import BertEncoder, EncoderConfig, init_params
from qdr_jax.quant import pq
from test_train_step import _setup as _step_setup  # pylint: disable=wrong-import-order


@pytest.fixture(params=["gpu", "tpu"])
def accelerator(request):
  """The accelerator branch to run (the caller enters `platform.forced` itself, so that
  it can compute the CPU branch first)."""
  return request.param


def _tokens(rng, batch=3, length=10):
  ids = rng.integers(1, 128, (batch, length))
  mask = np.ones((batch, length), np.int32)
  mask[1, 6:] = 0  # padded rows: the mask bias matters
  mask[2, 3:] = 0
  return (jnp.asarray(ids, jnp.int32), jnp.asarray(mask),
          jnp.zeros((batch, length), jnp.int32))


def _forward_and_grads(module, params, tokens):
  """Output and parameter gradients, traced afresh (a cached trace would keep the
  branch it was traced under) and compiled as one program (op by op, the encoder's
  forward and backward compile some 200 small ones)."""
  weights = jnp.linspace(-1.0, 1.0, module.config.hidden_size)

  def loss(p):
    out = module.apply({"params": p}, *tokens)
    return jnp.sum(out.astype(jnp.float32) * weights), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return out, grads


def test_encoder_forward_and_gradients_match_the_cpu_branch(accelerator):
  module = BertEncoder(EncoderConfig.tiny(pooling="mean", normalize=True))
  params = init_params(module, jax.random.key(1))
  tokens = _tokens(np.random.default_rng(0))
  cpu_out, cpu_grads = _forward_and_grads(module, params, tokens)
  with platform.forced(accelerator):
    out, grads = _forward_and_grads(module, params, tokens)
  np.testing.assert_allclose(out, cpu_out, atol=2e-6, rtol=0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4), grads,
               cpu_grads)
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) > 1e-3


@pytest.mark.parametrize("dtype, expect", [
    ("bfloat16", ["cudnn", "xla"]),  # cuDNN chosen; absent here, so its fallback runs
    ("float32", ["xla"]),  # cuDNN's flash kernel takes fp16/bf16 only
])
def test_gpu_attention_tries_cudnn_where_it_applies_and_falls_back(dtype, expect, monkeypatch):
  tried = []
  original = jax.nn.dot_product_attention

  def recording(*args, implementation=None, **kwargs):
    tried.append(implementation)
    return original(*args, implementation=implementation, **kwargs)

  module = BertEncoder(EncoderConfig.tiny(pooling="mean", normalize=True, dtype=dtype))
  params = init_params(module, jax.random.key(1))
  tokens = _tokens(np.random.default_rng(0))
  cpu_out, cpu_grads = _forward_and_grads(module, params, tokens)
  monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
  with platform.forced("gpu"):
    out, grads = _forward_and_grads(module, params, tokens)
  # Once per layer in the forward; the backward reuses the traced call.
  assert tried == expect * module.config.num_layers
  tol = 2e-2 if dtype == "bfloat16" else 2e-6
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(cpu_out, np.float32),
                             atol=tol, rtol=0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=50 * tol, rtol=0.1), grads,
               cpu_grads)
  with platform.forced("tpu"):
    tried.clear()
    _forward_and_grads(module, params, tokens)
  assert tried == ["xla"] * module.config.num_layers


def test_train_step_matches_the_cpu_branch():
  def step():
    _, _, _, _, table, quantizer, state, fns, tokens, pool, _ = _step_setup()
    q, vjp = fns.encode(state.params, tokens)
    arrays = {k: jnp.asarray(v) for k, v in pool.arrays().items()}
    new_state, metrics = fns.update(state, vjp, q, arrays, quantizer)
    return table, new_state, metrics

  table, cpu_state, cpu_metrics = step()
  moved = np.any(np.asarray(cpu_state.table) != table, axis=1)
  assert moved.any()
  for accelerator in ("gpu", "tpu"):  # one test: the step's compiles dominate its time
    with platform.forced(accelerator):
      _, state, metrics = step()
    np.testing.assert_allclose(metrics["loss"], cpu_metrics["loss"], rtol=1e-5)
    np.testing.assert_array_equal(np.any(np.asarray(state.table) != table, axis=1), moved)
    # Adam's first step moves each coordinate by about the learning rate (1e-2 for rows,
    # 1e-3 for the encoder) whatever the gradient's size, so a sign flip of a gradient
    # near zero moves a coordinate apart by up to twice that; most agree to float rounding.
    np.testing.assert_allclose(state.table, cpu_state.table, atol=2e-2, rtol=0)
    assert np.mean(np.abs(np.asarray(state.table) - cpu_state.table) < 1e-6) > 0.99
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-3, rtol=0),
                 state.params, cpu_state.params)


@pytest.fixture(scope="module")
def ivf_opq():
  """An OPQ + IVF + PQ index on clustered unit vectors, and the vectors."""
  rng = np.random.default_rng(0)
  d = 32
  centers = rng.normal(size=(16, d))
  x = centers[rng.integers(0, 16, 4000)] + 0.5 * rng.normal(size=(4000, d))
  x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
  index = faiss.index_factory(d, "OPQ16,IVF16,PQ16np", faiss.METRIC_INNER_PRODUCT)
  faiss.downcast_VectorTransform(index.chain.at(0)).niter = 4
  faiss.extract_index_ivf(index).cp.niter = 6
  index.train(x)
  index.add(x)
  faiss.extract_index_ivf(index).make_direct_map()
  return index, x


def test_pq_codes_are_faiss_codes_on_every_branch(accelerator, ivf_opq):
  index, x = ivf_opq
  q = quant.quantizer_from_faiss(index)
  codes, lists = quant.stored_codes(index)
  with platform.forced(accelerator):
    jax_codes, jax_lists = pq.encode_with_lists(q, jnp.asarray(x))
  np.testing.assert_array_equal(jax_lists, lists)
  np.testing.assert_array_equal(jax_codes, codes)


# ------------------------------------------------------------------ TF32 on a GPU


def _tf32(x: jax.Array) -> jax.Array:
  """float32 rounded to TF32's 10-bit mantissa (to nearest, ties to even), as a GPU's
  tensor cores read a float32 operand at the default precision."""
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  bits = (bits + jnp.uint32(0xFFF) + ((bits >> 13) & 1)) & jnp.uint32(0xFFFFE000)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _is_highest(precision) -> bool:
  parts = precision if isinstance(precision, tuple) else (precision,)
  return all(p == jax.lax.Precision.HIGHEST for p in parts)


def _eval_like_a_gpu(jaxpr, consts, *args):
  """Evaluates a jaxpr as a GPU would at the default matmul precision: every float32
  `dot_general` not asking for HIGHEST reads its operands as TF32."""
  env = {}
  read = lambda v: v.val if isinstance(v, jax_core.Literal) else env[v]
  for var, value in zip(jaxpr.constvars, consts):
    env[var] = value
  for var, value in zip(jaxpr.invars, args):
    env[var] = value
  for eqn in jaxpr.eqns:
    values = [read(v) for v in eqn.invars]
    if eqn.primitive.name in ("pjit", "jit", "closed_call"):
      inner = eqn.params["jaxpr"]
      outs = _eval_like_a_gpu(inner.jaxpr, inner.consts, *values)
    else:
      if eqn.primitive.name == "dot_general" and not _is_highest(eqn.params["precision"]):
        values = [_tf32(v) if v.dtype == jnp.float32 else v for v in values]
      outs = eqn.primitive.bind(*values, **eqn.params)
      outs = outs if eqn.primitive.multiple_results else [outs]
    for var, value in zip(eqn.outvars, outs):
      env[var] = value
  return [read(v) for v in jaxpr.outvars]


def _codes_like_a_gpu(q, x):
  with platform.forced("gpu"):  # a fresh function: a cached trace would keep its precision
    closed = jax.make_jaxpr(lambda q, x: pq.encode_with_lists(q, x))(q, x)
  flat = jax.tree.leaves((q, x))
  return [np.asarray(v) for v in _eval_like_a_gpu(closed.jaxpr, closed.consts, *flat)]


def test_tf32_matmuls_would_flip_codes_that_highest_precision_keeps(ivf_opq, monkeypatch):
  index, x = ivf_opq
  q = quant.quantizer_from_faiss(index)
  codes, lists = quant.stored_codes(index)
  x = jnp.asarray(x)
  jax_codes, jax_lists = _codes_like_a_gpu(q, x)
  np.testing.assert_array_equal(jax_lists, lists)
  np.testing.assert_array_equal(jax_codes, codes)
  # The same computation at the default precision assigns codes FAISS would not.
  monkeypatch.setattr(pq, "CODE_PRECISION", None)
  tf32_codes, tf32_lists = _codes_like_a_gpu(q, x)
  flipped = np.mean(np.any(tf32_codes != codes, axis=1) | (tf32_lists != lists))
  assert flipped > 0.01  # 170 of 4,000 rows when written


def test_compile_then_meet_waits_only_for_cpu_collectives(accelerator, monkeypatch):
  from qdr_jax import distributed  # pylint: disable=import-outside-toplevel
  met = []
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(distributed, "barrier", met.append)
  fn = distributed.CompileThenMeet(jax.jit(lambda x: x + 1), "step")
  assert int(fn(jnp.int32(1))) == 2 and met == ["step compiled"]  # CPU: compile, then meet
  with platform.forced(accelerator):
    assert int(fn(jnp.float32(1))) == 2 and met == ["step compiled"]  # no barrier, no flatten


def test_bfloat16_row_scatter_writes_the_same_bits_on_every_branch():
  # CPU scatters a bfloat16 table as uint16 bits (no float32 scratch); accelerators
  # scatter bfloat16. Both must write exactly the rows given, including -0.0 and NaN.
  from qdr_jax.train.step import _scatter_rows  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  table = jnp.asarray(rng.standard_normal((64, 8)), jnp.bfloat16)
  rows = rng.standard_normal((5, 8)).astype(np.float32)
  rows[0, :2] = (-0.0, np.nan)
  ids = jnp.asarray([3, 0, 63, 17, 9])
  expected = np.asarray(table).copy()
  expected[np.asarray(ids)] = np.asarray(jnp.asarray(rows, jnp.bfloat16))
  for name in ("cpu", "gpu"):
    with platform.forced(name):
      scatter = jax.jit(lambda *args: _scatter_rows(*args))  # a fresh trace per branch
      got = np.asarray(scatter(table, ids, jnp.asarray(rows, jnp.bfloat16)))
    np.testing.assert_array_equal(got.view(np.uint16), expected.view(np.uint16))
