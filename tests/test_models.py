"""Tests qdr_jax.models against PyTorch goldens (experiments/make_encoder_goldens.py)."""

import functools
import json
import os
import shutil

# The tests only read local dirs; make any accidental hub access fail fast.
os.environ.setdefault('HF_HUB_OFFLINE', '1')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from qdr_jax.models import (BertEncoder, EncoderConfig, MINILM_ALIASES,
                            default_model_path, init_params, load_encoder,
                            load_tokenizer, passage_inputs, resolve_model_path,
                            save_encoder_hf, tokenize)
from qdr_jax.models.bert import _softmax_context, attention_core
from qdr_jax.models.staged import make_staged_apply

GOLDENS = os.path.join(os.path.dirname(__file__), 'goldens')
TOL = 1e-4
# (golden dir, pooling to check, expected default (pooling, normalize)).
TINY_CASES = [
    ('tiny_bert', 'cls', ('cls', False)),
    ('tiny_bert', 'mean', ('cls', False)),
    ('tiny_dpr_question', 'cls', ('cls', False)),
    ('tiny_dpr_question', 'mean', ('cls', False)),
    ('tiny_dpr_ctx', 'cls', ('cls', False)),
    ('tiny_roberta', 'cls', ('cls', False)),
    ('tiny_roberta', 'mean', ('cls', False)),
    ('tiny_ance', 'ance', ('ance', False)),
    ('tiny_ance', 'cls', ('ance', False)),
]


def _apply(module, params, batch):
  return np.asarray(module.apply({'params': params}, batch['input_ids'],
                                 batch['attention_mask'],
                                 batch['token_type_ids']))


@functools.partial(jax.jit, static_argnums=0)
def _jit_apply(config, params, ids, mask, types):
  return BertEncoder(config).apply({'params': params}, ids, mask, types)


@pytest.fixture(scope='module')
def minilm_golden():
  return dict(np.load(os.path.join(GOLDENS, 'minilm_goldens.npz')))


@pytest.fixture(scope='module')
def minilm():
  module, params = load_encoder('all-MiniLM-L6-v2')
  fn = jax.jit(lambda p, ids, mask, types: module.apply(
      {'params': p}, ids, mask, types))
  return module, params, fn


def _tiny_ref(name):
  return dict(np.load(os.path.join(GOLDENS, name, 'reference.npz')))


# --- Real MiniLM -----------------------------------------------------------


@pytest.mark.slow
def test_minilm_parity(minilm, minilm_golden):
  module, params, fn = minilm
  assert module.config.pooling == 'mean' and module.config.normalize
  g = minilm_golden
  out = np.asarray(fn(params, g['input_ids'], g['attention_mask'],
                      g['token_type_ids']))
  assert out.dtype == np.float32 and out.shape == g['embeddings'].shape
  np.testing.assert_allclose(out, g['embeddings'], atol=TOL, rtol=0)
  hidden = module.apply({'params': params}, g['input_ids'][:2],
                        g['attention_mask'][:2], g['token_type_ids'][:2],
                        method=BertEncoder.hidden_states)
  np.testing.assert_allclose(np.asarray(hidden),
                             g['last_hidden_state_first2'], atol=TOL, rtol=0)


@pytest.mark.slow
def test_minilm_tokenizer_matches_golden(minilm_golden):
  g = minilm_golden
  batch = tokenize(load_tokenizer('all-MiniLM-L6-v2'), list(g['sentences']),
                   256)
  for key in ('input_ids', 'attention_mask', 'token_type_ids'):
    assert batch[key].dtype == np.int32
    np.testing.assert_array_equal(batch[key], g[key])


@pytest.mark.slow
def test_minilm_bfloat16_close(minilm, minilm_golden):
  # Same float32 params, bf16 compute (load_encoder's dtype= path is covered
  # by test_tiny_bfloat16_runs; reloading 90 MB here would only cost time).
  module, params, _ = minilm
  g = minilm_golden
  out = np.asarray(_jit_apply(module.config.replace(dtype='bfloat16'), params,
                              g['input_ids'], g['attention_mask'],
                              g['token_type_ids']))
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, g['embeddings'], atol=2e-2, rtol=0)
  assert np.min(np.sum(out * g['embeddings'], -1)) > 0.999
  # The staged corpus forward rounds to bf16 between its executables; as close.
  staged = np.asarray(make_staged_apply(BertEncoder(module.config.replace(dtype='bfloat16')))(
      params, g['input_ids'], g['attention_mask'], g['token_type_ids']))
  np.testing.assert_allclose(staged, g['embeddings'], atol=2e-2, rtol=0)
  assert np.min(np.sum(staged * g['embeddings'], -1)) > 0.999


@pytest.mark.slow
def test_minilm_padding_invariance(minilm, minilm_golden):
  _, params, fn = minilm
  g = minilm_golden
  pad = 64 - g['input_ids'].shape[1]
  padded = {k: np.pad(g[k], ((0, 0), (0, pad))) for k in
            ('input_ids', 'attention_mask', 'token_type_ids')}
  out = np.asarray(fn(params, padded['input_ids'], padded['attention_mask'],
                      padded['token_type_ids']))
  np.testing.assert_allclose(out, g['embeddings'], atol=TOL, rtol=0)


# --- Tiny checkpoints in every layout --------------------------------------


@pytest.mark.parametrize('name,pooling,default', TINY_CASES)
def test_tiny_layout_parity(name, pooling, default):
  ref = _tiny_ref(name)
  module, _ = load_encoder(os.path.join(GOLDENS, name))
  assert (module.config.pooling, module.config.normalize) == default
  module, params = load_encoder(os.path.join(GOLDENS, name), pooling=pooling)
  np.testing.assert_allclose(_apply(module, params, ref), ref[pooling],
                             atol=TOL, rtol=0)


@pytest.mark.parametrize('name', ['tiny_bert', 'tiny_roberta', 'tiny_ance'])
def test_tiny_fused_attention_path_parity(name, monkeypatch):
  # GPU/TPU take jax.nn.dot_product_attention; on CPU it lowers to XLA ops, so
  # forcing that branch here checks its numerics against the torch goldens.
  from qdr_jax.models import bert  # pylint: disable=g-import-not-at-top
  ref = _tiny_ref(name)
  module, params = load_encoder(os.path.join(GOLDENS, name))
  cpu_path = _apply(module, params, ref)
  monkeypatch.setattr(bert, '_use_fused_attention', lambda: True)
  fused_path = _apply(module, params, ref)
  pooling = module.config.pooling
  np.testing.assert_allclose(fused_path, ref[pooling], atol=TOL, rtol=0)
  np.testing.assert_allclose(fused_path, cpu_path, atol=1e-5, rtol=0)


def _attention_reference(q, k, v, keep):
  """float64 softmax attention; keep: (B, L) key mask or (B, L, L) per-query mask."""
  q, k, v = (np.asarray(t, np.float64).transpose(0, 2, 1, 3) for t in (q, k, v))
  scores = np.einsum('bhqd,bhkd->bhqk', q, k)
  keep = keep[:, None, None, :] if keep.ndim == 2 else keep[:, None]
  scores = np.where(keep, scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  ctx = np.einsum('bhqk,bhkd->bhqd', probs, v).transpose(0, 2, 1, 3)
  return ctx.reshape(ctx.shape[0], ctx.shape[1], -1)


def _bias(keep):
  bias = np.where(keep, 0.0, np.finfo(np.float32).min).astype(np.float32)
  return jnp.asarray(bias[:, None, None, :] if keep.ndim == 2 else bias[:, None])


@pytest.mark.parametrize('layout', ['key_mask', 'packed'])
def test_attention_core_shifts_agree(layout):
  # The corpus forward's cheaper softmax shift (the larger of a row's scores against
  # its first key and its own position) gives the row-maximum attention: on padded
  # rows, and on packed rows whose later segments mask the first key.
  rng = np.random.default_rng(0)
  b, l, h, d = 3, 12, 2, 8
  q, k, v = (rng.standard_normal((b, l, h, d)).astype(np.float32) for _ in range(3))
  if layout == 'key_mask':
    keep = np.ones((b, l), bool)
    keep[1, 7:] = False
  else:  # rows 0-4 one segment, 5-9 another, 10-11 padding
    segments = np.array([1] * 5 + [2] * 5 + [0] * 2)
    keep = np.broadcast_to((segments[:, None] == segments[None, :]) & (segments[None, :] > 0),
                           (b, l, l)).copy()
  exact = np.asarray(attention_core(q, k, v, _bias(keep)))
  cheap = np.asarray(attention_core(q, k, v, _bias(keep), softmax_shift='first_or_self'))
  reference = _attention_reference(q, k, v, keep)
  # Query rows with a key to attend to (in a key-mask layout: every row).
  rows = keep.any(-1) if keep.ndim == 3 else np.ones((b, l), bool)
  np.testing.assert_allclose(cheap[rows], reference[rows], atol=1e-6, rtol=0)
  np.testing.assert_allclose(cheap[rows], exact[rows], atol=1e-6, rtol=0)
  assert np.isfinite(cheap).all()


def test_attention_core_cheap_shift_falls_back_on_overflow():
  # One key beats a row's first key and its own position by far more than float32's exp
  # range: the cheap shift overflows that row (NaN), and the core recomputes the whole
  # attention with the row maximum, jitted or not.
  rng = np.random.default_rng(1)
  b, l, h, d = 2, 6, 1, 4
  q, k, v = (rng.standard_normal((b, l, h, d)).astype(np.float32) for _ in range(3))
  q[0, 2, 0] = [30.0, 0.0, 0.0, 0.0]
  k[0, :, 0, 0] = 0.0
  k[0, 4, 0, 0] = 10.0  # row 2's score 300 against key 4, 0 against keys 0 and 2
  keep = np.ones((b, l), bool)
  heads_first = [jnp.asarray(t).transpose(0, 2, 1, 3) for t in (q, k, v)]
  assert not np.isfinite(np.asarray(
      _softmax_context(*heads_first, _bias(keep), 'first_or_self'))).all()
  reference = _attention_reference(q, k, v, keep)
  for fn in (attention_core, jax.jit(attention_core, static_argnames='softmax_shift')):
    out = np.asarray(fn(q, k, v, _bias(keep), softmax_shift='first_or_self'))
    np.testing.assert_allclose(out, reference, atol=1e-6, rtol=0)
  with pytest.raises(ValueError, match='softmax_shift'):
    attention_core(q, k, v, _bias(keep), softmax_shift='max')


@pytest.mark.parametrize('name,pooling', [(n, p) for n, p, _ in TINY_CASES])
def test_tiny_staged_forward_parity(name, pooling):
  # The corpus forward on CPU runs stage by stage (qdr_jax.models.staged), its
  # attention core compiled with other XLA options: the goldens still hold, and the
  # outputs equal one jitted forward's up to float rounding.
  ref = _tiny_ref(name)
  module, params = load_encoder(os.path.join(GOLDENS, name), pooling=pooling)
  inputs = (params, ref['input_ids'], ref['attention_mask'], ref['token_type_ids'])
  staged_fn = make_staged_apply(module)
  staged = np.asarray(staged_fn(*inputs))
  np.testing.assert_allclose(staged, ref[pooling], atol=TOL, rtol=0)
  np.testing.assert_allclose(staged, _apply(module, params, ref), atol=1e-6, rtol=1e-5)
  # Under an outer transformation it traces the one-graph forward instead.
  assert jax.eval_shape(staged_fn, *inputs).shape == staged.shape
  np.testing.assert_allclose(np.asarray(jax.jit(staged_fn)(*inputs)),
                             _apply(module, params, ref), atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_minilm_staged_forward_parity(minilm, minilm_golden):
  # MiniLM's six layers through the staged forward, padded as a corpus batch is.
  module, params, fn = minilm
  g = minilm_golden
  padded = [np.pad(g[k], ((0, 0), (0, 64 - g[k].shape[1])))
            for k in ('input_ids', 'attention_mask', 'token_type_ids')]
  staged = np.asarray(make_staged_apply(module)(params, *padded))
  np.testing.assert_allclose(staged, g['embeddings'], atol=TOL, rtol=0)
  np.testing.assert_allclose(staged, np.asarray(fn(params, *padded)), atol=1e-6, rtol=0)


def test_init_params_keep_dense_layout():
  # Attention declares its q/k/v params itself (one fused GEMM); they must keep
  # nn.Dense's names, shapes and lecun-normal/zeros init.
  config = EncoderConfig.tiny(num_layers=1)
  params = init_params(BertEncoder(config), jax.random.key(0))
  attention = params['layer_0']['attention']
  for name in ('query', 'key', 'value', 'output'):
    assert attention[name]['kernel'].shape == (32, 32)
    np.testing.assert_array_equal(attention[name]['bias'], np.zeros(32))
  std = float(np.std(np.asarray(attention['query']['kernel'])))
  assert 0.5 / 32 ** 0.5 < std < 1.5 / 32 ** 0.5
  assert not np.array_equal(attention['query']['kernel'],
                            attention['key']['kernel'])


@pytest.mark.parametrize('name', ['tiny_bert', 'tiny_roberta'])
def test_tiny_hidden_states_and_normalize(name):
  ref = _tiny_ref(name)
  module, params = load_encoder(os.path.join(GOLDENS, name), pooling='mean',
                                normalize=True)
  hidden = module.apply({'params': params}, ref['input_ids'],
                        ref['attention_mask'], ref['token_type_ids'],
                        method=BertEncoder.hidden_states)
  np.testing.assert_allclose(np.asarray(hidden), ref['last_hidden_state'],
                             atol=TOL, rtol=0)
  want = ref['mean'] / np.linalg.norm(ref['mean'], axis=-1, keepdims=True)
  np.testing.assert_allclose(_apply(module, params, ref), want, atol=TOL,
                             rtol=0)


@pytest.mark.parametrize('name', ['tiny_bert', 'tiny_roberta', 'tiny_ance'])
def test_tiny_padding_invariance(name):
  ref = _tiny_ref(name)
  module, params = load_encoder(os.path.join(GOLDENS, name), pooling='mean')
  pad_id = module.config.pad_token_id
  extra = 7
  padded = {
      'input_ids': np.pad(ref['input_ids'], ((0, 0), (0, extra)),
                          constant_values=pad_id),
      'attention_mask': np.pad(ref['attention_mask'], ((0, 0), (0, extra))),
      'token_type_ids': np.pad(ref['token_type_ids'], ((0, 0), (0, extra))),
  }
  # Jitted: new shapes cost less as one compile than as many eager ops.
  out = _jit_apply(module.config, params, padded['input_ids'],
                   padded['attention_mask'], padded['token_type_ids'])
  np.testing.assert_allclose(np.asarray(out), _apply(module, params, ref),
                             atol=1e-5, rtol=0)


def test_tiny_bfloat16_runs():
  ref = _tiny_ref('tiny_bert')
  module, params = load_encoder(os.path.join(GOLDENS, 'tiny_bert'),
                                pooling='mean', dtype='bfloat16')
  assert jax.tree.leaves(params)[0].dtype == jnp.float32
  out = np.asarray(_jit_apply(module.config, params, ref['input_ids'],
                              ref['attention_mask'], ref['token_type_ids']))
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, ref['mean'], atol=0.1, rtol=0)


def test_bert_prefix_and_ignored_heads(tmp_path):
  """`bert.`-prefixed (e.g. BertForMaskedLM) checkpoints load; heads are ignored."""
  src = os.path.join(GOLDENS, 'tiny_bert')
  tensors = {f'bert.{k}': v for k, v in
             load_file(os.path.join(src, 'model.safetensors')).items()}
  tensors['cls.predictions.bias'] = np.zeros(100, np.float32)
  save_file(tensors, str(tmp_path / 'model.safetensors'))
  shutil.copy(os.path.join(src, 'config.json'), tmp_path / 'config.json')
  ref = _tiny_ref('tiny_bert')
  module, params = load_encoder(str(tmp_path))
  np.testing.assert_allclose(_apply(module, params, ref), ref['cls'],
                             atol=TOL, rtol=0)


def _broken_copy(tmp_path, edit):
  src = os.path.join(GOLDENS, 'tiny_bert')
  tensors = load_file(os.path.join(src, 'model.safetensors'))
  edit(tensors)
  save_file(tensors, str(tmp_path / 'model.safetensors'))
  shutil.copy(os.path.join(src, 'config.json'), tmp_path / 'config.json')
  return str(tmp_path)


def test_missing_key_raises(tmp_path):
  key = 'encoder.layer.1.attention.self.key.weight'
  path = _broken_copy(tmp_path, lambda t: t.pop(key))
  with pytest.raises(KeyError, match=r'model\.safetensors.*' + key):
    load_encoder(path)


def test_unexpected_key_raises(tmp_path):
  key = 'encoder.layer.2.output.dense.weight'
  path = _broken_copy(
      tmp_path, lambda t: t.__setitem__(key, np.zeros((32, 37), np.float32)))
  with pytest.raises(KeyError, match='unexpected tensors.*' + key):
    load_encoder(path)


def test_shape_mismatch_raises(tmp_path):
  key = 'encoder.layer.0.intermediate.dense.bias'
  path = _broken_copy(
      tmp_path, lambda t: t.__setitem__(key, np.zeros(5, np.float32)))
  with pytest.raises(ValueError, match=r'model\.safetensors.*' + key):
    load_encoder(path)


def test_no_safetensors_raises(tmp_path):
  shutil.copy(os.path.join(GOLDENS, 'tiny_bert', 'config.json'),
              tmp_path / 'config.json')
  (tmp_path / 'pytorch_model.bin').write_bytes(b'not loaded')
  with pytest.raises(FileNotFoundError, match='pickled'):
    load_encoder(str(tmp_path))


# --- Saving ----------------------------------------------------------------


@pytest.mark.parametrize('name,pooling',
                         [('tiny_bert', 'mean'), ('tiny_roberta', 'cls'),
                          ('tiny_ance', 'ance')])
def test_save_round_trip_tiny(tmp_path, name, pooling):
  ref = _tiny_ref(name)
  module, params = load_encoder(os.path.join(GOLDENS, name), pooling=pooling,
                                normalize=pooling == 'mean')
  out_dir = save_encoder_hf(str(tmp_path / 'out'), module, params)
  module2, params2 = load_encoder(out_dir)
  assert module2.config == module.config
  np.testing.assert_array_equal(_apply(module2, params2, ref),
                                _apply(module, params, ref))


@pytest.mark.slow
def test_save_round_trip_minilm_and_torch(tmp_path, minilm, minilm_golden):
  module, params, fn = minilm
  g = minilm_golden
  out_dir = save_encoder_hf(str(tmp_path / 'minilm'), module.config, params,
                            tokenizer_dir=default_model_path())
  assert os.path.exists(os.path.join(out_dir, 'tokenizer.json'))
  module2, params2 = load_encoder(out_dir)
  assert module2.config == module.config
  ours = np.asarray(fn(params2, g['input_ids'], g['attention_mask'],
                       g['token_type_ids']))
  np.testing.assert_allclose(ours, g['embeddings'], atol=TOL, rtol=0)

  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  model = transformers.AutoModel.from_pretrained(out_dir).eval()
  assert type(model).__name__ == 'BertModel'
  with torch.no_grad():
    hidden = model(input_ids=torch.from_numpy(g['input_ids']).long(),
                   attention_mask=torch.from_numpy(g['attention_mask']).long(),
                   token_type_ids=torch.from_numpy(g['token_type_ids']).long()
                   ).last_hidden_state.numpy()
  m = g['attention_mask'][..., None].astype(np.float32)
  mean = (hidden * m).sum(1) / m.sum(1)
  theirs = mean / np.linalg.norm(mean, axis=-1, keepdims=True)
  np.testing.assert_allclose(theirs, ours, atol=TOL, rtol=0)


def test_save_roberta_loads_in_torch(tmp_path):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  ref = _tiny_ref('tiny_roberta')
  module, params = load_encoder(os.path.join(GOLDENS, 'tiny_roberta'))
  out_dir = save_encoder_hf(str(tmp_path / 'rob'), module, params)
  with open(os.path.join(out_dir, 'config.json'), encoding='utf-8') as f:
    assert json.load(f)['model_type'] == 'roberta'
  model = transformers.AutoModel.from_pretrained(out_dir).eval()
  with torch.no_grad():
    hidden = model(input_ids=torch.from_numpy(ref['input_ids']).long(),
                   attention_mask=torch.from_numpy(ref['attention_mask']).long()
                   ).last_hidden_state.numpy()
  np.testing.assert_allclose(hidden, ref['last_hidden_state'], atol=TOL,
                             rtol=0)


# --- Module / config -------------------------------------------------------


def test_tiny_config_init_jit_and_grad():
  # One layer: XLA's CPU compile of the backward pass dominates this test.
  config = EncoderConfig.tiny(pooling='mean', normalize=True, num_layers=1)
  module = BertEncoder(config)
  params = init_params(module, jax.random.key(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  ids = jnp.array([[2, 5, 9, 3, 0, 0], [2, 7, 3, 0, 0, 0]], jnp.int32)
  mask = (ids > 0).astype(jnp.int32)


  def loss(p):
    out = module.apply({'params': p}, ids, mask)
    return jnp.sum(out[:, 0]), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  assert out.shape == (2, 32) and out.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, atol=1e-5)
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_custom_vjp_grads_match_plain_autodiff(dtype, monkeypatch):
  # Bias and LayerNorm scale/shift gradients come from custom VJPs (sums as GEMVs); float32 autodiff of the plain expressions is the reference (for
  # bfloat16 too, whose plain sums would round in bfloat16 where ours accumulate
  # in float32).
  from qdr_jax.models import bert  # pylint: disable=g-import-not-at-top
  ids = jnp.array([[2, 5, 9, 3, 0, 0], [2, 7, 3, 11, 4, 8]], jnp.int32)
  w = jax.random.normal(jax.random.key(1), (2, 32))
  config = EncoderConfig.tiny(pooling='mean', normalize=True)
  params = init_params(BertEncoder(config), jax.random.key(0))
  params = jax.tree.map(  # non-trivial LayerNorm scales and biases
      lambda x: x + 0.1 * jax.random.normal(jax.random.key(x.size), x.shape), params)

  def grads(module):
    loss = lambda p: jnp.sum(module.apply({'params': p}, ids, (ids > 0)) * w)
    return jax.jit(jax.value_and_grad(loss))(params)

  loss, got = grads(BertEncoder(config.replace(dtype=dtype)))
  monkeypatch.setattr(bert, '_add_bias', lambda y, b: y + b)
  monkeypatch.setattr(bert, '_scale_shift', lambda y, s, b: y * s + b)
  ref_loss, want = grads(BertEncoder(config))
  tol = 1e-5 if dtype == 'float32' else 5e-2
  np.testing.assert_allclose(loss, ref_loss, rtol=tol)
  # Per-leaf scale, floored: the key bias's true gradient is 0 (softmax ignores a
  # per-query constant), so only rounding noise is left there.
  floor = 1e-2 * max(float(np.abs(r).max()) for r in jax.tree.leaves(want))
  for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                          jax.tree.leaves(want)):
    assert g.dtype == r.dtype == jnp.float32, path
    scale = max(float(np.abs(r).max()), floor)
    np.testing.assert_allclose(g, r, atol=tol * scale, rtol=0,
                               err_msg=jax.tree_util.keystr(path))


def test_gelu_erf_matches_exact_gelu():
  from qdr_jax.models import bert  # pylint: disable=g-import-not-at-top
  x = jnp.linspace(-12.0, 12.0, 20001, dtype=jnp.float32)
  exact = lambda v: jax.nn.gelu(v, approximate=False)
  np.testing.assert_allclose(bert._gelu_erf(x), exact(x), atol=2e-6, rtol=1e-6)
  d = jax.vmap(jax.grad(bert._gelu_erf))(x)
  np.testing.assert_allclose(d, jax.vmap(jax.grad(exact))(x), atol=2e-6, rtol=1e-6)
  assert bert._gelu_erf(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_roberta_position_ids():
  from qdr_jax.models.bert import position_ids  # pylint: disable=g-import-not-at-top
  config = EncoderConfig.tiny(architecture='roberta', pad_token_id=1)
  ids = jnp.array([[0, 5, 6, 2, 1, 1]])
  np.testing.assert_array_equal(position_ids(config, ids),
                                [[2, 3, 4, 5, 1, 1]])
  np.testing.assert_array_equal(position_ids(EncoderConfig.tiny(), ids),
                                [[0, 1, 2, 3, 4, 5]])


@pytest.mark.parametrize('field,value', [('pooling', 'max'),
                                         ('hidden_act', 'swish'),
                                         ('dtype', 'float16'),
                                         ('architecture', 'gpt2')])
def test_config_validation(field, value):
  with pytest.raises(ValueError, match=value):
    EncoderConfig.tiny(**{field: value})


# --- Names and tokenization ------------------------------------------------


def test_name_resolution(tmp_path):
  for alias in MINILM_ALIASES:
    assert resolve_model_path(alias) == default_model_path()
  assert resolve_model_path(str(tmp_path)) == str(tmp_path)
  with pytest.raises(FileNotFoundError):
    resolve_model_path(str(tmp_path / 'missing'))


@pytest.fixture(scope='module')
def tokenizer():
  return load_tokenizer('all-MiniLM-L6-v2')


def test_tokenize_padding_modes(tokenizer):
  texts = ['short one', 'a somewhat longer sentence with more tokens in it']
  longest = tokenize(tokenizer, texts, 32)
  n = int(longest['attention_mask'].sum(1).max())
  assert longest['input_ids'].shape == (2, n)
  assert tokenize(tokenizer, texts, 32, pad_to_multiple_of=8)[
      'input_ids'].shape == (2, -(-n // 8) * 8)
  assert tokenize(tokenizer, texts, 32, pad_to_max=True)[
      'input_ids'].shape == (2, 32)
  truncated = tokenize(tokenizer, texts, 5, pad_to_multiple_of=4)
  assert truncated['input_ids'].shape == (2, 5)
  assert truncated['input_ids'][1, -1] == tokenizer.sep_token_id
  for batch in (longest, truncated):
    assert all(v.dtype == np.int32 for v in batch.values())
    # Padding is exactly where the mask is zero.
    assert np.all((batch['input_ids'] == tokenizer.pad_token_id)
                  == (batch['attention_mask'] == 0))


def test_tokenize_pairs_and_passages(tokenizer):
  titles, texts = ['Title A', ''], ['body one', 'body two']
  first, second = passage_inputs(titles, texts, 'pair')
  batch = tokenize(tokenizer, first, 16, pair_texts=second)
  assert batch['token_type_ids'][0].max() == 1
  assert batch['token_type_ids'][0, 0] == 0
  concat, none = passage_inputs(titles, texts, 'concat')
  assert none is None and concat == ['Title A body one', 'body two']
  assert passage_inputs(None, texts, 'concat')[0] == texts
  with pytest.raises(ValueError):
    passage_inputs(titles, texts, 'bogus')


# --- Packed sequences ---------------------------------------------------------


def test_pack_sequences_first_fit_decreasing():
  from qdr_jax.models.bert import packed_positions  # pylint: disable=g-import-not-at-top
  from qdr_jax.models.tokenization import pack_sequences  # pylint: disable=g-import-not-at-top
  ids = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]
  types = [[0] * len(x) for x in ids]
  types[2] = [0, 1]
  out = pack_sequences(ids, types, 8, rows_multiple=3, pad_id=99)
  # Longest first: [6 | 2] fills row 0, [4 | 3] row 1; 2 rows rounded up to 3.
  assert out['input_ids'].shape == (3, 8)
  np.testing.assert_array_equal(out['input_ids'][0], [4, 5, 6, 7, 8, 9, 10, 11])
  np.testing.assert_array_equal(out['input_ids'][1], [12, 13, 14, 15, 1, 2, 3, 99])
  np.testing.assert_array_equal(out['input_ids'][2], [99] * 8)
  np.testing.assert_array_equal(out['segment_ids'][0], [2] * 6 + [3] * 2)
  np.testing.assert_array_equal(out['segment_ids'][1], [4] * 4 + [1] * 3 + [0])
  np.testing.assert_array_equal(packed_positions(out['segment_ids'])[1],
                                [0, 1, 2, 3, 0, 1, 2, 0])
  np.testing.assert_array_equal(out['token_type_ids'][0], [0] * 7 + [1])
  np.testing.assert_array_equal(out['attention_mask'], out['segment_ids'] > 0)
  np.testing.assert_array_equal(out['sequence_lengths'], [3, 6, 2, 4])
  assert all(v.dtype == np.int32 for v in out.values())
  with pytest.raises(ValueError, match=r'1\.\.9 tokens do not fit rows of 8'):
    pack_sequences([[1] * 9, [2]], [[0] * 9, [0]], 8)


@pytest.mark.parametrize('name,pooling', [('tiny_bert', 'mean'), ('tiny_bert', 'cls'),
                                          ('tiny_roberta', 'mean'), ('tiny_ance', 'ance')])
def test_packed_rows_encode_like_one_sequence_per_row(name, pooling):
  """Packed sequences give the padded batch's embeddings, and the same gradients."""
  from qdr_jax.models.tokenization import pack_sequences  # pylint: disable=g-import-not-at-top
  ref = _tiny_ref(name)
  module, params = load_encoder(os.path.join(GOLDENS, name), pooling=pooling)
  lengths = ref['attention_mask'].sum(1)
  ids = [list(row[:n]) for row, n in zip(ref['input_ids'], lengths)]
  types = [list(row[:n]) for row, n in zip(ref['token_type_ids'], lengths)]
  packed = pack_sequences(ids, types, int(lengths.max()) + 3, rows_multiple=2,
                          pad_id=module.config.pad_token_id)
  assert packed['input_ids'].shape[0] < len(ids)  # several sequences share a row
  padded = {k: ref[k] for k in ('input_ids', 'attention_mask', 'token_type_ids')}
  weights = np.random.default_rng(0).standard_normal(ref[pooling].shape).astype(np.float32)

  def loss(p, batch):
    out = module.apply({'params': p}, **batch)
    return jnp.sum(out * weights), out

  grad_fn = jax.jit(jax.grad(loss, has_aux=True))
  (g_padded, out_padded), (g_packed, out_packed) = (grad_fn(params, padded),
                                                    grad_fn(params, packed))
  np.testing.assert_allclose(np.asarray(out_packed), ref[pooling], atol=TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(out_packed), np.asarray(out_padded), atol=1e-5,
                             rtol=0)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_padded))
  for path, a in jax.tree_util.tree_flatten_with_path(g_padded)[0]:
    b = dict(jax.tree_util.tree_flatten_with_path(g_packed)[0])[path]
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5 * scale, rtol=0,
                               err_msg=jax.tree_util.keystr(path))


def test_packed_inputs_come_together():
  ref = _tiny_ref('tiny_bert')
  module, params = load_encoder(os.path.join(GOLDENS, 'tiny_bert'))
  with pytest.raises(ValueError, match='together'):
    module.apply({'params': params}, ref['input_ids'], ref['attention_mask'],
                 segment_ids=ref['attention_mask'])


def test_tokenize_packs_minilm_queries_like_padding(tokenizer, minilm):
  module, params, fn = minilm
  texts = ['what causes rain', 'a much longer question about the chemistry of clouds and '
           'how water droplets form around aerosol particles', 'short', 'why is the sky blue']
  padded = tokenize(tokenizer, texts, 32)
  packed = tokenize(tokenizer, texts, 32, pack_rows_multiple=2)
  assert packed['input_ids'].shape == (2, 32)
  out = jax.jit(lambda p, t: module.apply({'params': p}, **t))(params, packed)
  np.testing.assert_allclose(np.asarray(out), np.asarray(fn(params, padded['input_ids'],
                                                            padded['attention_mask'],
                                                            padded['token_type_ids'])),
                             atol=1e-5, rtol=0)


def test_packed_rows_on_the_fused_attention_path(monkeypatch):
  from qdr_jax.models import bert  # pylint: disable=g-import-not-at-top
  from qdr_jax.models.tokenization import pack_sequences  # pylint: disable=g-import-not-at-top
  ref = _tiny_ref('tiny_bert')
  module, params = load_encoder(os.path.join(GOLDENS, 'tiny_bert'), pooling='mean')
  lengths = ref['attention_mask'].sum(1)
  packed = pack_sequences([list(r[:n]) for r, n in zip(ref['input_ids'], lengths)],
                          [list(r[:n]) for r, n in zip(ref['token_type_ids'], lengths)],
                          int(lengths.max()) + 3)
  monkeypatch.setattr(bert, '_use_fused_attention', lambda: True)
  out = module.apply({'params': params}, **packed)
  np.testing.assert_allclose(np.asarray(out), ref['mean'], atol=TOL, rtol=0)
