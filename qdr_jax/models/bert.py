"""Flax linen BERT-family text encoder (BERT, RoBERTa, DPR, ANCE) to pooled vectors."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from qdr_jax import platform
from qdr_jax.reductions import row_max

Architecture = Literal['bert', 'roberta']
Pooling = Literal['cls', 'mean', 'ance']


def _gelu_erf(x: jax.Array) -> jax.Array:
  """Exact GELU in torch's erf form, x/2 (1 + erf(x / sqrt 2)).

  `jax.nn.gelu(approximate=False)` goes through erfc, which XLA:CPU lowers to an exp,
  a piecewise rational and selects (three loop fusions per layer); erf is one
  polynomial: GELU's forward+backward on (32, 64, 1536) 6.2 -> 3.6 ms on a 2-core CPU.
  """
  return 0.5 * x * (1 + jax.lax.erf(x * 2 ** -0.5))


_ACTIVATIONS = {
    # HF 'gelu' is the exact erf form; 'gelu_new' is the tanh approximation.
    'gelu': _gelu_erf,
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'relu': jax.nn.relu,
}
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# ANCE's head LayerNorm is a plain torch nn.LayerNorm, i.e. eps 1e-5, not the
# encoder's layer_norm_eps.
ANCE_HEAD_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Hyper-parameters of a BERT-family encoder plus its pooling head.

  Attributes:
    vocab_size: Token vocabulary size.
    hidden_size: Width of the residual stream (and of the output vector).
    num_layers: Number of transformer layers.
    num_heads: Attention heads per layer.
    intermediate_size: Width of the feed-forward block.
    max_position_embeddings: Rows of the position-embedding table.
    type_vocab_size: Rows of the token-type table.
    layer_norm_eps: Epsilon of every encoder LayerNorm.
    hidden_act: 'gelu' (exact erf, HF 'gelu'), 'gelu_new' or 'relu'.
    architecture: 'bert' (positions 0..L-1) or 'roberta' (positions start at
      pad_token_id + 1 and skip padding tokens, as Hugging Face does).
    pad_token_id: Padding token id (drives RoBERTa position ids).
    pooling: 'cls' (first token), 'mean' (mask-aware mean) or 'ance' (CLS
      vector through ANCE's Linear + LayerNorm head).
    normalize: L2-normalise the pooled vector.
    dtype: Compute dtype, 'float32' or 'bfloat16'. Params stay float32 and
      the returned embeddings are always float32.
  """
  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = 'gelu'
  architecture: Architecture = 'bert'
  pad_token_id: int = 0
  pooling: Pooling = 'cls'
  normalize: bool = False
  dtype: Literal['float32', 'bfloat16'] = 'float32'

  def __post_init__(self):
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f'Unsupported hidden_act {self.hidden_act!r}; '
                       f'expected one of {sorted(_ACTIVATIONS)}.')
    if self.architecture not in ('bert', 'roberta'):
      raise ValueError(f'Unsupported architecture {self.architecture!r}.')
    if self.pooling not in ('cls', 'mean', 'ance'):
      raise ValueError(f'Unsupported pooling {self.pooling!r}.')
    if self.dtype not in _DTYPES:
      raise ValueError(f'Unsupported dtype {self.dtype!r}.')
    if self.hidden_size % self.num_heads:
      raise ValueError(f'hidden_size {self.hidden_size} is not divisible by '
                       f'num_heads {self.num_heads}.')

  @classmethod
  def tiny(cls, **overrides: Any) -> EncoderConfig:
    """A very small config for unit tests (vocab 128, hidden 32, 2 layers)."""
    fields = dict(vocab_size=128, hidden_size=32, num_layers=2, num_heads=2,
                  intermediate_size=64, max_position_embeddings=64,
                  type_vocab_size=2)
    fields.update(overrides)
    return cls(**fields)

  def replace(self, **overrides: Any) -> EncoderConfig:
    return dataclasses.replace(self, **overrides)

  @property
  def compute_dtype(self) -> Any:
    return _DTYPES[self.dtype]


def packed_positions(segment_ids: jax.Array) -> jax.Array:
  """Each token's 0-based place in its own sequence, for packed rows
  (`tokenization.pack_sequences`): the distance to where its segment starts."""
  index = jnp.broadcast_to(jnp.arange(segment_ids.shape[-1], dtype=jnp.int32),
                           segment_ids.shape)
  starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                            segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


def position_ids(config: EncoderConfig, input_ids: jax.Array,
                 segment_ids: jax.Array | None = None) -> jax.Array:
  """Position ids as the Hugging Face model computes them from input ids; with
  `segment_ids` (packed rows) they restart at every sequence."""
  seq_len = input_ids.shape[-1]
  if segment_ids is not None:
    positions = packed_positions(segment_ids)
    if config.architecture == 'roberta':
      return jnp.where(input_ids != config.pad_token_id,
                       positions + config.pad_token_id + 1, config.pad_token_id)
    return positions
  if config.architecture == 'roberta':
    # RoBERTa numbers real tokens pad+1, pad+2, ... and gives pads the pad id;
    # it keys off input_ids (not attention_mask), so we do too for parity.
    not_pad = (input_ids != config.pad_token_id).astype(jnp.int32)
    return jnp.cumsum(not_pad, axis=-1) * not_pad + config.pad_token_id
  return jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), input_ids.shape)


def _sum_rows(g: jax.Array) -> jax.Array:
  """Sum over every axis but the last, as a GEMV with a ones vector, in float32.

  A parameter gradient (bias, LayerNorm scale/shift) sums (B, L, f) over B and L.
  XLA:CPU rewrites that reduction into a (32, 32, 1)-window reduce-window that ran
  at ~11.8 ms for (32, 64, 1536), against 0.4 ms for this dot; 38 such
  sums per MiniLM backward pass.
  """
  rows = g.reshape(-1, g.shape[-1])
  ones = jnp.ones((rows.shape[0],), rows.dtype)
  return jnp.dot(ones, rows, preferred_element_type=jnp.float32)


@jax.custom_vjp
def _add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
  """`y + bias` over the last axis, whose bias gradient is `_sum_rows`."""
  return y + bias


def _add_bias_fwd(y, bias):
  return y + bias, bias


def _add_bias_bwd(bias, g):
  return g, _sum_rows(g).astype(bias.dtype)


_add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


@jax.custom_vjp
def _scale_shift(y: jax.Array, scale: jax.Array, shift: jax.Array) -> jax.Array:
  """`y * scale + shift` over the last axis, whose parameter gradients are
  `_sum_rows` (LayerNorm's affine part)."""
  return y * scale + shift


def _scale_shift_fwd(y, scale, shift):
  return y * scale + shift, (y, scale)


def _scale_shift_bwd(res, g):
  y, scale = res
  return (g * scale, _sum_rows(g * y).astype(scale.dtype),
          _sum_rows(g).astype(scale.dtype))


_scale_shift.defvjp(_scale_shift_fwd, _scale_shift_bwd)


class LayerNorm(nn.Module):
  """`nn.LayerNorm` over the last axis (same param names, init and float32 stats,
  two-pass variance), its scale/shift gradients summed by `_sum_rows`."""
  epsilon: float
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = (x.shape[-1],)
    scale = self.param('scale', nn.initializers.ones_init(), features, jnp.float32)
    shift = self.param('bias', nn.initializers.zeros_init(), features, jnp.float32)
    x = x.astype(jnp.float32)
    centred = x - jnp.mean(x, axis=-1, keepdims=True)
    # Two-pass variance: the fast E[x^2]-E[x]^2 form costs ~1e-5 of parity.
    var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
    y = _scale_shift(centred * jax.lax.rsqrt(var + self.epsilon), scale, shift)
    return y.astype(self.dtype)


def _dense_params(mdl: nn.Module, in_features: int, features: int,
                  dtype: Any) -> tuple[jax.Array, jax.Array]:
  """Declares `nn.Dense`'s kernel and bias (names, shapes, init) in `mdl`, cast to
  `dtype`."""
  kernel = mdl.param('kernel', nn.initializers.lecun_normal(),
                     (in_features, features), jnp.float32)
  bias = mdl.param('bias', nn.initializers.zeros_init(), (features,), jnp.float32)
  return kernel.astype(dtype), bias.astype(dtype)


class _DenseParams(nn.Module):
  """The kernel and bias of an `nn.Dense`, unapplied, so that attention can run the
  query, key and value projections as one GEMM."""
  features: int
  in_features: int
  dtype: Any

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array]:
    return _dense_params(self, self.in_features, self.features, self.dtype)


class Dense(nn.Module):
  """`nn.Dense` (same param names, shapes and init), its bias gradient summed by
  `_sum_rows`."""
  features: int
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel, bias = _dense_params(self, x.shape[-1], self.features, self.dtype)
    # As a 2-D GEMM: the weight gradient of a (B, L, d) @ (d, f) product is a dot
    # contracting two dims, which XLA:CPU canonicalised with a transposing copy of
    # the (B*L, f) output gradient; fused with GELU's backward, that copy took 32%
    # of a profiled 32x64 training pass.
    rows = x.astype(self.dtype).reshape(-1, x.shape[-1])
    return _add_bias(rows @ kernel, bias).reshape(*x.shape[:-1], self.features)


def _layer_norm(config: EncoderConfig, name: str, eps: float | None = None):
  return LayerNorm(epsilon=config.layer_norm_eps if eps is None else eps,
                   dtype=config.compute_dtype, name=name)


def _dense(config: EncoderConfig, features: int, name: str):
  return Dense(features, dtype=config.compute_dtype, name=name)


class Embeddings(nn.Module):
  """Word + position + token-type embeddings followed by LayerNorm."""
  config: EncoderConfig

  def setup(self):
    c = self.config
    kw = dict(features=c.hidden_size, dtype=c.compute_dtype,
              param_dtype=jnp.float32,
              embedding_init=nn.initializers.normal(0.02))
    self.word = nn.Embed(c.vocab_size, **kw)
    self.position = nn.Embed(c.max_position_embeddings, **kw)
    self.token_type = nn.Embed(c.type_vocab_size, **kw)
    self.layer_norm = _layer_norm(c, 'layer_norm')

  def __call__(self, input_ids, token_type_ids, segment_ids=None):
    x = (self.word(input_ids)
         + self.position(position_ids(self.config, input_ids, segment_ids))
         + self.token_type(token_type_ids))
    return self.layer_norm(x)


def _use_fused_attention() -> bool:
  # GPU/TPU: jax.nn.dot_product_attention, cuDNN's fused kernel where the dtype and
  # shapes allow (`platform.attention_implementation`). On CPU it lowers to the same
  # einsum-softmax-einsum as below (no fused kernel), so the explicit form is kept there.
  return not platform.is_cpu()


_CUDNN_REFUSALS = (NotImplementedError, ValueError, RuntimeError)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                    mask_bias: jax.Array) -> jax.Array:
  """(B, L, H, D) attention through `jax.nn.dot_product_attention`: cuDNN's flash
  kernel where `platform.attention_implementation` picks it, else (or where cuDNN
  refuses the call while tracing: its version, the GPU's compute capability) XLA's."""
  b, l, _, d = q.shape
  bias = mask_bias.astype(q.dtype)
  implementation = platform.attention_implementation(q.dtype, d, l, k.shape[1])
  if implementation == 'cudnn':
    try:
      # cuDNN takes a bias over the whole (L, L) score matrix, not a broadcast key mask.
      full = jnp.broadcast_to(bias, (b, 1, l, k.shape[1]))
      return jax.nn.dot_product_attention(q, k, v, bias=full, scale=1.0,
                                          implementation='cudnn')
    except _CUDNN_REFUSALS:
      pass
  return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=1.0, implementation='xla')


SOFTMAX_SHIFTS = ('row_max', 'first_or_self')


def _row_lower_bound(q: jax.Array, k: jax.Array, mask_bias: jax.Array) -> jax.Array:
  """(B, H, L, 1): the larger of each row's biased scores against the first key and
  against its own position, so at most the row's maximum, from (B, H, L) products."""
  first = jnp.einsum('bhqd,bhd->bhq', q, k[:, :, 0], preferred_element_type=jnp.float32)
  own = jnp.einsum('bhqd,bhqd->bhq', q, k, preferred_element_type=jnp.float32)
  first_bias = mask_bias[..., 0]
  # mask_bias is (B, 1, 1, L) for a key mask, (B, 1, L, L) for packed rows.
  own_bias = (mask_bias[..., 0, :] if mask_bias.shape[-2] == 1
              else jnp.diagonal(mask_bias, axis1=-2, axis2=-1))
  return jnp.maximum(first + first_bias, own + own_bias)[..., None]


def _softmax_context(q: jax.Array, k: jax.Array, v: jax.Array, mask_bias: jax.Array,
                     softmax_shift: str) -> jax.Array:
  """Heads-first (B, H, L, D) q, k, v -> the (B, H, L, D) context of a shifted softmax."""
  # Scores and softmax in float32 even under bf16: masking with a large negative and
  # the exp are where low precision hurts.
  scores = jnp.einsum('bhqd,bhkd->bhqk', q, k,
                      preferred_element_type=jnp.float32) + mask_bias
  # The shift carries no gradient (softmax does not depend on it): taken from
  # stop-gradient inputs, so a training step differentiates nothing for it.
  if softmax_shift == 'row_max':
    shift = row_max(jax.lax.stop_gradient(scores))
  else:
    # From (B, H, L) products instead of a reduction over the (B, H, L, L) scores: with
    # XLA:CPU's dot fusions the row maximum was a third of the attention core
    # (docs/cpu-performance.md). A right-padded row always keeps its first key; a packed row
    # keeps its own position. Being one of the row's scores, the bound keeps the
    # row's largest term at least 1 (no row sums to 0, and no term that matters
    # underflows); it overflows a row of L keys only when the row's best score is
    # more than 88 - ln(L) nats above it (all-MiniLM-L6-v2 on SciFact passages: at
    # most 29, in layer 0), and then `attention_core` falls back to the row maximum.
    shift = _row_lower_bound(jax.lax.stop_gradient(q), jax.lax.stop_gradient(k), mask_bias)
  # Softmax with its normalisation deferred to the (B, H, L, D) context: one pass less
  # over the (B, H, L, L) scores than dividing the probabilities.
  unnormalized = jnp.exp(scores - shift)
  denom = unnormalized.sum(axis=-1, keepdims=True)
  ctx = jnp.einsum('bhqk,bhkd->bhqd', unnormalized.astype(v.dtype), v)
  return ctx / denom.astype(ctx.dtype)


def attention_core(q: jax.Array, k: jax.Array, v: jax.Array, mask_bias: jax.Array,
                   softmax_shift: str = 'row_max') -> jax.Array:
  """Multi-head attention of projected, pre-scaled (B, L, H, D) q, k, v: (B, L, H*D).

  `mask_bias` (float32, 0 or a large negative) broadcasts against the (B, H, L, L)
  scores: (B, 1, 1, L) for a key mask, (B, 1, L, L) for packed rows. A function of its
  own, apart from the projections around it, so that a staged CPU forward
  (`qdr_jax.models.staged`) can compile it with its own XLA options.

  `softmax_shift` is what the softmax subtracts from each row of scores before the
  exp: 'row_max', the row's maximum, or 'first_or_self', the larger of its scores
  against the first key and against its own position, which skips a pass over the
  scores. Softmax does not depend on the shift, so both give the same
  attention up to float rounding. Where the cheaper shift overflows a row (its best
  score more than ~83 nats above both, or both masked in a row with unmasked keys)
  the output has a NaN, and the whole core is recomputed with the row maximum. On
  accelerators the fused kernel takes its own shift and the argument is ignored.
  """
  if softmax_shift not in SOFTMAX_SHIFTS:
    raise ValueError(f'softmax_shift must be one of {SOFTMAX_SHIFTS}, got {softmax_shift!r}.')
  b, l, h, d = q.shape
  if _use_fused_attention():
    return fused_attention(q, k, v, mask_bias).reshape(b, l, h * d)
  # Heads-first operands, transposed explicitly: with the einsums on (B, L, H, D)
  # XLA:CPU computed probs @ v as (v^T probs^T), a dot at ~13 GFLOP/s taking 39% of
  # the 32x256 forward; this form made attention's forward 20-30% cheaper.
  heads_first = tuple(t.transpose(0, 2, 1, 3) for t in (q, k, v))

  def context(shift: str) -> jax.Array:
    ctx = _softmax_context(*heads_first, mask_bias, shift)
    return ctx.transpose(0, 2, 1, 3).reshape(b, l, h * d)

  if softmax_shift == 'row_max':
    return context('row_max')
  # An overflowed row is NaN in every output column (inf / inf), so one finiteness test
  # of the output finds it; a NaN input makes the exact path NaN too.
  fast = context('first_or_self')
  return jax.lax.cond(jnp.all(jnp.isfinite(fast)), lambda: fast,
                      lambda: context('row_max'))


class SelfAttention(nn.Module):
  """Post-LN multi-head self-attention block with its residual, in two halves around
  `attention_core` (`TransformerLayer` joins them)."""
  config: EncoderConfig

  def setup(self):
    c = self.config
    dense = lambda name: _DenseParams(c.hidden_size, c.hidden_size,
                                      c.compute_dtype, name=name)
    self.query, self.key, self.value = dense('query'), dense('key'), dense('value')
    self.output = _dense(c, c.hidden_size, 'output')
    self.layer_norm = _layer_norm(c, 'layer_norm')

  def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(B, L, hidden) -> q, k, v, each (B, L, heads, head_dim); q pre-scaled."""
    c = self.config
    b, l, _ = x.shape
    head_dim = c.hidden_size // c.num_heads
    # 1/sqrt(d) folded into the query projection: (d x d) multiplies per layer
    # instead of a (B, H, L, L) one, which XLA:CPU materialised as a broadcast
    # constant of the full score shape and read once per layer.
    scale = 1.0 / head_dim ** 0.5
    (wq, bq), (wk, bk), (wv, bv) = self.query(), self.key(), self.value()
    # One (d, 3d) GEMM instead of three (d, d): fewer, larger kernels, and one
    # input-gradient GEMM in the backward pass instead of three plus two adds.
    qkv = x.reshape(b * l, -1) @ jnp.concatenate([wq * scale, wk, wv], axis=1)
    qkv = _add_bias(qkv, jnp.concatenate([bq * scale, bk, bv]))
    q, k, v = jnp.split(qkv.reshape(b, l, 3, c.num_heads, head_dim), 3, axis=2)
    return q[:, :, 0], k[:, :, 0], v[:, :, 0]

  def finish(self, x: jax.Array, ctx: jax.Array) -> jax.Array:
    """The attention context (B, L, hidden) through the output projection, residual, LN."""
    return self.layer_norm(x + self.output(ctx))


class FeedForward(nn.Module):
  """Post-LN feed-forward block with its residual."""
  config: EncoderConfig

  def setup(self):
    c = self.config
    self.intermediate = _dense(c, c.intermediate_size, 'intermediate')
    self.output = _dense(c, c.hidden_size, 'output')
    self.layer_norm = _layer_norm(c, 'layer_norm')

  def __call__(self, x):
    h = _ACTIVATIONS[self.config.hidden_act](self.intermediate(x))
    return self.layer_norm(x + self.output(h))


class TransformerLayer(nn.Module):
  """One encoder layer; `project` and `finish` are its two halves around
  `attention_core`, so that a staged forward can run them as executables of their own."""
  config: EncoderConfig

  def setup(self):
    self.attention = SelfAttention(self.config)
    self.ffn = FeedForward(self.config)

  def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    return self.attention.project(x)

  def finish(self, x: jax.Array, ctx: jax.Array) -> jax.Array:
    return self.ffn(self.attention.finish(x, ctx))

  def __call__(self, x, mask_bias):
    return self.finish(x, attention_core(*self.project(x), mask_bias))


class BertEncoder(nn.Module):
  """BERT/RoBERTa encoder returning one pooled float32 vector per sequence.

  Params layout (plain pytree): `embeddings/{word,position,token_type,
  layer_norm}`, `layer_{i}/{attention/{query,key,value,output,layer_norm},
  ffn/{intermediate,output,layer_norm}}` and, for ANCE pooling,
  `head/{dense,layer_norm}`.
  """
  config: EncoderConfig

  def setup(self):
    c = self.config
    self.embeddings = Embeddings(c)
    self.layers = [TransformerLayer(c, name=f'layer_{i}')
                   for i in range(c.num_layers)]
    if c.pooling == 'ance':
      self.head_dense = _dense(c, c.hidden_size, 'head_dense')
      self.head_norm = _layer_norm(c, 'head_norm', eps=ANCE_HEAD_EPS)

  def embed_tokens(self, input_ids: jax.Array, attention_mask: jax.Array,
                   token_type_ids: jax.Array | None = None,
                   segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The first layer's input (B, L, hidden) and the attention mask bias.

    With `segment_ids` (packed rows: 1 + the sequence's index, 0 on padding) a token
    attends only to the tokens of its own sequence, and positions restart at each.
    """
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = self.embeddings(input_ids, token_type_ids, segment_ids)
    if segment_ids is None:  # key mask, broadcast over heads and queries: (B, 1, 1, L)
      keep = attention_mask[:, None, None, :] > 0
    else:  # same-sequence mask: (B, 1, L, L)
      keys = segment_ids[:, None, None, :]
      keep = (segment_ids[:, None, :, None] == keys) & (keys > 0)
    mask_bias = jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
    return x, mask_bias

  def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array,
                    token_type_ids: jax.Array | None = None,
                    segment_ids: jax.Array | None = None) -> jax.Array:
    """Last hidden states (B, L, hidden) in the compute dtype (see `embed_tokens`)."""
    x, mask_bias = self.embed_tokens(input_ids, attention_mask, token_type_ids, segment_ids)
    for layer in self.layers:
      x = layer(x, mask_bias)
    return x

  def pool(self, hidden: jax.Array, attention_mask: jax.Array,
           segment_ids: jax.Array | None = None,
           sequence_lengths: jax.Array | None = None) -> jax.Array:
    """Pools hidden states (B, L, d) into float32 vectors (B, d), or, for packed rows,
    (R, L, d) into one vector per sequence, (len(sequence_lengths), d)."""
    c = self.config
    hidden = hidden.astype(jnp.float32)
    if segment_ids is not None:
      return self._finish(self._pool_packed(hidden, segment_ids, sequence_lengths))
    if c.pooling == 'mean':
      m = attention_mask.astype(jnp.float32)[..., None]
      summed = jnp.sum(hidden * m, axis=1)
      # Same clamp as sentence-transformers, so an all-pad row gives zeros.
      return self._finish(summed / jnp.maximum(jnp.sum(m, axis=1), 1e-9))
    return self._finish(hidden[:, 0])

  def _pool_packed(self, hidden: jax.Array, segment_ids: jax.Array,
                   sequence_lengths: jax.Array) -> jax.Array:
    """Per-sequence mean (or first token) of packed rows, as one (B, R*L) @ (R*L, d)
    product with a 0/1 (or 1/length) matrix: a GEMM forward and backward on every
    platform, where a segment sum would scatter."""
    tokens = segment_ids.reshape(-1)
    member = tokens[None, :] == jnp.arange(1, sequence_lengths.shape[0] + 1)[:, None]
    if self.config.pooling == 'mean':
      weights = member / jnp.maximum(sequence_lengths, 1).astype(jnp.float32)[:, None]
    else:  # the sequence's first token: position 0 of its segment
      weights = member & (packed_positions(segment_ids) == 0).reshape(-1)[None, :]
    return jnp.dot(weights.astype(jnp.float32), hidden.reshape(-1, hidden.shape[-1]),
                   precision=jax.lax.Precision.HIGHEST)

  def _finish(self, pooled: jax.Array) -> jax.Array:
    """The pooled vector through ANCE's head (if any) and the L2 normalisation."""
    c = self.config
    out = pooled
    if c.pooling == 'ance':
      out = self.head_norm(self.head_dense(pooled.astype(c.compute_dtype)))
    out = out.astype(jnp.float32)
    if c.normalize:
      norm = jnp.linalg.norm(out, axis=-1, keepdims=True)
      out = out / jnp.maximum(norm, 1e-12)  # as torch F.normalize
    return out

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
               token_type_ids: jax.Array | None = None, *,
               segment_ids: jax.Array | None = None,
               sequence_lengths: jax.Array | None = None) -> jax.Array:
    """Encodes token ids (B, L) into pooled float32 embeddings (B, d).

    Packed rows (`tokenization.pack_sequences`: `segment_ids` and `sequence_lengths`,
    both or neither) give one embedding per packed sequence, in the order the sequences
    were given, equal to encoding them one per row.
    """
    if (segment_ids is None) != (sequence_lengths is None):
      raise ValueError('Packed inputs need segment_ids and sequence_lengths together.')
    hidden = self.hidden_states(input_ids, attention_mask, token_type_ids, segment_ids)
    return self.pool(hidden, attention_mask, segment_ids, sequence_lengths)


def init_params(module: BertEncoder, rng: jax.Array,
                seq_len: int = 8) -> dict[str, Any]:
  """Randomly initialised float32 params for `module` (for tests/training)."""
  ids = jnp.zeros((1, seq_len), jnp.int32)
  # Jitted: eager init dispatches (and compiles) hundreds of tiny ops.
  return jax.jit(module.init)(rng, ids, jnp.ones_like(ids))['params']
