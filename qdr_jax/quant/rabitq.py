"""RaBitQ in JAX, kept equal to FAISS's `IndexRaBitQ` and `IndexIVFRaBitQ` (1 bit a
dimension).

A `RaBitQ` holds what FAISS uses to encode a vector and to score a query against its
code: an optional rotation (FAISS's RaBitQ indexes rotate nothing themselves; a
``RR{d},`` pre-transform in front of the factory string supplies the random rotation
the method assumes), and the centre each vector is coded around: the mean of the
training vectors for `IndexRaBitQ`, the vector's IVF centroid for `IndexIVFRaBitQ`
(which always codes residuals).

FAISS's code of a vector ``y`` (rotated) around its centre ``c``, with ``r = y - c``:
  * one sign bit a dimension, ``b_j = r_j > 0``, packed little-endian (dimension j in
    bit j % 8 of byte j // 8), which stands for the unit vector ``o = (2b - 1) / sqrt(d)``;
  * two float32 factors: ``||r||^2 - ||y||^2`` (inner-product metric; ``||r||^2`` for L2)
    and ``dp = ||r|| / <o, r / ||r||>``, which makes ``dp <o, q - c>`` an unbiased
    estimate of ``<r, q - c>`` for a random rotation.
Its inner-product search scores ``-(f0 + ||q - c||^2 - 2 dp <o, q - c> - ||q||^2) / 2``,
which is ``<q, c + dp o> + bias`` with ``bias = -(f0 + ||c||^2) / 2 - dp <o, c>``:
the reconstruction FAISS's ``sa_decode`` returns, scored by an inner product, plus a
per-vector constant. `estimate` reproduces the search's scores; `reconstruct` and
`row_bias` give the straight-through loss the same numbers in a form it can train.

Query quantization (``qb``, FAISS's default 4): FAISS rounds ``q - c`` to ``qb`` bits
between its minimum and maximum before the sign-bit product; ``qb = 0`` scores the float
query. `estimate` does either; the loss scores the float query, so a run serves
``qb = 0`` (``qdr_jax.index.build.RABITQ_QB``) to train on what the index returns.

Multi-bit codes (``RaBitQ{b}``, ``nb_bits = b > 1``) add ``b - 1`` bits a dimension and
two factors; FAISS scores them ``<q, c> + f_add + f_rescale <q - c, u>`` with
``u_j = sign(r_j) (e_j + 1/2)`` (``e`` the extra bits, flipped for negative ``r_j``), from
the float query whatever ``qb`` is. JAX reads such codes from the index and reproduces
their scores and reconstruction ``c + f_rescale u``; it does not encode them (FAISS
chooses the extra bits by an approximate sequential search per vector), so a run trains
on them with ``quant.codes='index'``. Not reproduced: the ``centered`` query quantizer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from qdr_jax.quant.pq import assign_coarse, rotate, unrotate

Array = jax.Array

# The bytes of the float32 factors after the sign bits: two in a 1-bit code, three (an
# error bound added) in a multi-bit one, whose extra bits are followed by two more.
FACTOR_BYTES = 8
MULTI_FACTOR_BYTES = 12
EX_FACTOR_BYTES = 8
_METRICS = ("ip", "l2")
# FAISS's guard against dividing by a vanishing norm or product (float32 epsilon).
_EPS = float(np.finfo(np.float32).eps)


@struct.dataclass
class RaBitQ:
  """RaBitQ parameters as a pytree.

  Attributes:
    center: (d,) the centre of a plain `IndexRaBitQ` (rotated space), or None with IVF.
    coarse_centroids: (nlist, d) IVF centroids in the rotated space, or None.
    rotation: (d, d) rotation ``A`` (FAISS applies ``x @ A.T``), or None.
    metric: static; the index's metric, 'ip' or 'l2'.
    coarse_metric: static; how IVF lists are chosen, 'ip' or 'l2'.
    qb: static; bits the index quantizes a query to (0: the float query).
    nb_bits: static; bits a dimension of the codes (1: sign bits only).
  """

  center: Array | None = None
  coarse_centroids: Array | None = None
  rotation: Array | None = None
  metric: str = struct.field(pytree_node=False, default="ip")
  coarse_metric: str = struct.field(pytree_node=False, default="ip")
  qb: int = struct.field(pytree_node=False, default=0)
  nb_bits: int = struct.field(pytree_node=False, default=1)

  def __post_init__(self):
    if self.metric not in _METRICS or self.coarse_metric not in _METRICS:
      raise ValueError(f"metric and coarse_metric must be in {_METRICS}, got "
                       f"{self.metric!r}, {self.coarse_metric!r}")
    if not 0 <= self.qb <= 8:
      raise ValueError(f"qb must be in 0..8, got {self.qb}")

  @property
  def has_ivf(self) -> bool:
    return self.coarse_centroids is not None

  @property
  def by_residual(self) -> bool:
    return True  # both layouts code a vector around a centre

  @property
  def dim(self) -> int:
    ref = self.coarse_centroids if self.has_ivf else self.center
    return ref.shape[-1] if self.rotation is None else self.rotation.shape[1]


def _centres(q: RaBitQ, lists: Array, n: int) -> Array:
  """(n, d) the centre each row is coded around."""
  if q.has_ivf:
    return q.coarse_centroids[lists]
  return jnp.broadcast_to(q.center, (n, q.center.shape[-1]))


def _factors(r: Array, y: Array, metric: str) -> Array:
  """(N, 2) FAISS's per-vector factors from residuals ``r`` and rotated vectors ``y``."""
  d = r.shape[-1]
  norm_sq = jnp.sum(r * r, axis=-1)
  dp_oo = jnp.sum(jnp.abs(r), axis=-1)
  norm = jnp.sqrt(norm_sq)
  inv_norm = jnp.where(norm_sq < _EPS, 1.0, 1.0 / jnp.where(norm_sq < _EPS, 1.0, norm))
  normalized = dp_oo * inv_norm * (1.0 / np.sqrt(np.float32(d)))
  small = jnp.abs(normalized) < _EPS
  inv_dp = jnp.where(small, 1.0, 1.0 / jnp.where(small, 1.0, normalized))
  first = norm_sq - jnp.sum(y * y, axis=-1) if metric == "ip" else norm_sq
  return jnp.stack([first, inv_dp * norm], axis=-1).astype(jnp.float32)


def encode(q: RaBitQ, x: Array, coarse_ids: Array | None = None
           ) -> tuple[Array, Array, Array]:
  """RaBitQ codes of ``x`` (N, d) as FAISS stores them.

  Args:
    q: the quantizer.
    x: (N, d) vectors in the original space.
    coarse_ids: (N,) IVF lists, if already known (else the exact nearest; FAISS's coarse
      search of a flat quantizer picks the same).

  Returns:
    bits (N, d) uint8 in {0, 1}, factors (N, 2) float32, lists (N,) int32 (zeros
    without IVF).
  """
  if q.nb_bits != 1:
    raise ValueError(f"JAX encodes 1-bit RaBitQ only; {q.nb_bits}-bit codes are read from "
                     "the index.")
  y = rotate(q, x)
  n = y.shape[0]
  if coarse_ids is None:
    coarse_ids = assign_coarse(q.replace(rotation=None), y)
  lists = jnp.asarray(coarse_ids, jnp.int32)
  r = y - _centres(q, lists, n)
  return (r > 0).astype(jnp.uint8), _factors(r, y, q.metric), lists


def _signs(bits: Array) -> Array:
  """``sqrt(d) o``: +1 for a set bit, -1 otherwise, as float32."""
  return 2.0 * bits.astype(jnp.float32) - 1.0


Extra = tuple[Array, Array]  # multi-bit codes: (levels u (N, d), (f_add, f_rescale) (N, 2))


def reconstruct(q: RaBitQ, bits: Array, factors: Array, lists: Array,
                extra: Extra | None = None) -> Array:
  """(N, d) the vector whose inner product with a float query FAISS's estimate is, less
  `row_bias`, in the original space: ``c + dp o`` (FAISS's ``sa_decode``) for 1-bit
  codes, ``c + f_rescale u`` for multi-bit ones (``extra``).

  Differentiable in the centres and rotation; the codes carry no gradient.
  """
  d = bits.shape[-1]
  c = _centres(q, lists, bits.shape[0])
  if extra is not None:
    levels, ex_factors = extra
    return unrotate(q, c + ex_factors[:, 1:2] * levels)
  return unrotate(q, c + _signs(bits) * (factors[:, 1:2] / np.sqrt(np.float32(d))))


def row_bias(q: RaBitQ, bits: Array, factors: Array, lists: Array,
             extra: Extra | None = None) -> Array:
  """(N,) what FAISS's inner-product estimate adds to ``<query, reconstruct>`` for a
  float query: ``-(f0 + ||c||^2) / 2 - dp <o, c>`` (multi-bit: ``f_add - f_rescale <u,
  c>``); differentiable in the centres."""
  if q.metric != "ip":
    raise ValueError("row_bias is the inner-product estimate's; the index's metric is L2.")
  d = bits.shape[-1]
  c = _centres(q, lists, bits.shape[0])
  if extra is not None:
    levels, ex_factors = extra
    return ex_factors[:, 0] - ex_factors[:, 1] * jnp.sum(levels * c, axis=-1)
  o_dot_c = jnp.sum(_signs(bits) * c, axis=-1) / np.sqrt(np.float32(d))
  return -0.5 * (factors[:, 0] + jnp.sum(c * c, axis=-1)) - factors[:, 1] * o_dot_c


def _quantized_query_dot(q_res: Array, signs: Array, qb: int) -> Array:
  """``<o, q~>`` for residual queries ``q_res`` (..., d) rounded to ``qb`` bits between
  their minimum and maximum as FAISS does (half up, clamped), against ``signs`` (N, d):
  (..., N)."""
  d = q_res.shape[-1]
  max_code = (1 << qb) - 1
  v_min = jnp.min(q_res, axis=-1, keepdims=True)
  v_max = jnp.max(q_res, axis=-1, keepdims=True)
  delta = (v_max - v_min) / max_code
  safe = jnp.where(delta > 0, delta, 1.0)
  scaled = jnp.clip((q_res - v_min) * (1.0 / safe), 0.0, float(max_code))
  codes = jnp.where(delta > 0, jnp.floor(scaled + 0.5), 0.0)
  delta = jnp.where(delta > 0, delta, 0.0)
  bits = (signs > 0).astype(jnp.float32)
  # FAISS's integer sums: <b, qq>, popcount(b) and sum(qq), then its three coefficients.
  and_dot = jnp.einsum("...d,nd->...n", codes, bits)
  popcount = jnp.sum(bits, axis=-1)
  sum_qq = jnp.sum(codes, axis=-1)
  inv_sqrt_d = 1.0 / np.sqrt(np.float32(d))
  c1, c2 = 2 * delta * inv_sqrt_d, 2 * v_min * inv_sqrt_d
  c34 = inv_sqrt_d * (delta[..., 0] * sum_qq + d * v_min[..., 0])
  return c1 * and_dot + c2 * popcount - c34[..., None]


def estimate(q: RaBitQ, queries: Array, bits: Array, factors: Array, lists: Array,
             extra: Extra | None = None) -> Array:
  """(Q, N) the distances FAISS's search returns for ``queries`` against these codes.

  Inner-product indexes: the estimated inner product (larger is better); L2: the
  estimated squared distance. With ``q.qb > 0`` the sign-bit product uses the query
  rounded to ``qb`` bits per (query, centre), as FAISS does; the other terms use the
  float query, as FAISS does. Multi-bit codes (``extra``) are scored from the float query
  whatever ``qb`` (FAISS's full-precision second stage, which every returned row passes).
  """
  if extra is not None:
    return _estimate_multibit(q, queries, lists, extra)
  yq = rotate(q, queries)
  d = yq.shape[-1]
  n = bits.shape[0]
  signs = _signs(bits)
  if q.has_ivf:
    centres, row_centre = q.coarse_centroids, lists
  else:
    centres, row_centre = q.center[None, :], jnp.zeros(n, jnp.int32)
  q_res = yq[:, None, :] - centres[None, :, :]  # (Q, L, d)
  to_centre = jnp.sum(q_res * q_res, axis=-1)  # ||q - c||^2, (Q, L)
  if q.qb == 0:
    # <o, q - c> = (<s, q> - <s, c>) / sqrt(d) with s = sqrt(d) o.
    s_dot_c = jnp.sum(signs * centres[row_centre], axis=-1)
    dot = (yq @ signs.T - s_dot_c[None, :]) / np.sqrt(np.float32(d))
  else:
    per_centre = _quantized_query_dot(q_res, signs, q.qb)  # (Q, L, N)
    dot = jnp.take_along_axis(per_centre, row_centre[None, None, :], axis=1)[:, 0]
  pre = factors[None, :, 0] + to_centre[:, row_centre] - 2 * factors[None, :, 1] * dot
  if q.metric == "l2":
    return jnp.maximum(pre, 0.0)
  return -0.5 * (pre - jnp.sum(yq * yq, axis=-1, keepdims=True))


def _estimate_multibit(q: RaBitQ, queries: Array, lists: Array, extra: Extra) -> Array:
  yq = rotate(q, queries)
  levels, ex_factors = extra
  centres = _centres(q, lists, levels.shape[0])
  # <q - c, u> = <q, u> - <c, u>; the inner-product base is <q, c>, L2's ||q - c||^2.
  ip = yq @ levels.T - jnp.sum(levels * centres, axis=-1)[None, :]
  q_dot_c = yq @ centres.T
  if q.metric == "ip":
    base = q_dot_c
  else:
    base = (jnp.sum(yq * yq, axis=-1, keepdims=True) - 2 * q_dot_c
            + jnp.sum(centres * centres, axis=-1)[None, :])
  dist = base + ex_factors[None, :, 0] + ex_factors[None, :, 1] * ip
  return dist if q.metric == "ip" else jnp.maximum(dist, 0.0)


def pack_bits(bits: Array) -> Array:
  """(N, ceil(d / 8)) uint8: sign bits packed as FAISS packs them (little-endian)."""
  n, d = bits.shape
  width = -(-d // 8)
  padded = jnp.zeros((n, width * 8), jnp.uint8).at[:, :d].set(bits.astype(jnp.uint8))
  weights = (1 << jnp.arange(8, dtype=jnp.uint32)).astype(jnp.uint8)
  return jnp.sum(padded.reshape(n, width, 8) * weights, axis=-1, dtype=jnp.uint8)


def unpack_bits(packed: Array, d: int) -> Array:
  """(N, d) uint8 sign bits from `pack_bits`'s bytes."""
  shifts = jnp.arange(8, dtype=jnp.uint8)
  bits = (packed[..., None] >> shifts) & 1
  return bits.reshape(*packed.shape[:-1], -1)[..., :d].astype(jnp.uint8)


def to_faiss_bytes(bits: np.ndarray, factors: np.ndarray) -> np.ndarray:
  """(N, code_size) uint8: the code FAISS stores (packed bits, then the factors)."""
  packed = np.asarray(pack_bits(jnp.asarray(bits)))
  raw = np.ascontiguousarray(np.asarray(factors, np.float32)).view(np.uint8)
  return np.concatenate([packed, raw.reshape(len(raw), FACTOR_BYTES)], axis=1)


def from_faiss_bytes(raw: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:  # 1-bit
  """(packed bits (N, ceil(d / 8)) uint8, factors (N, 2) float32) of FAISS's codes."""
  raw = np.ascontiguousarray(raw, np.uint8)
  width = -(-d // 8)
  if raw.shape[1] != width + FACTOR_BYTES:
    raise ValueError(f"RaBitQ codes of {raw.shape[1]} bytes are not 1-bit codes of d={d} "
                     f"({width + FACTOR_BYTES} bytes).")
  factors = np.ascontiguousarray(raw[:, width:]).view(np.float32).reshape(len(raw), 2)
  return raw[:, :width].copy(), factors.copy()


def code_size(d: int, nb_bits: int = 1) -> int:
  """Bytes of one FAISS RaBitQ code of ``d`` dimensions and ``nb_bits`` bits a dimension."""
  if nb_bits == 1:
    return -(-d // 8) + FACTOR_BYTES
  return -(-d // 8) + MULTI_FACTOR_BYTES + -(-d * (nb_bits - 1) // 8) + EX_FACTOR_BYTES


def _floats(raw: Array, start: int, count: int) -> Array:
  return jax.lax.bitcast_convert_type(
      raw[:, start:start + 4 * count].reshape(-1, count, 4), jnp.float32)


def split_codes(raw: Array, d: int, nb_bits: int = 1
                ) -> tuple[Array, Array, Extra | None]:
  """(bits (N, d) uint8, factors (N, 2) float32, extra) of FAISS's code bytes (N,
  code_size), on the device (e.g. the codes the index stores, gathered for a pool).
  ``extra`` is None for 1-bit codes, else (levels u (N, d) float32, (f_add, f_rescale)
  (N, 2) float32)."""
  width = -(-d // 8)
  raw = raw.astype(jnp.uint8)
  bits = unpack_bits(raw[:, :width], d)
  factors = _floats(raw, width, 2)
  if nb_bits == 1:
    return bits, factors, None
  ex_bits = nb_bits - 1
  start = width + MULTI_FACTOR_BYTES
  ex_width = -(-d * ex_bits // 8)
  stream = unpack_bits(raw[:, start:start + ex_width], d * ex_bits)  # dim j: bits j*ex..
  weights = (1 << jnp.arange(ex_bits)).astype(jnp.float32)
  ex = stream.reshape(-1, d, ex_bits).astype(jnp.float32) @ weights
  # FAISS's level: (sign << ex_bits) + e - (2^ex_bits - 1/2).
  levels = bits.astype(jnp.float32) * (1 << ex_bits) + ex - ((1 << ex_bits) - 0.5)
  return bits, factors, (levels, _floats(raw, start + ex_width, 2))


def codes_of(q: RaBitQ, x: Array, raw: Array | None = None, lists: Array | None = None
             ) -> tuple[Array, Array, Array, Extra | None]:
  """(bits, factors, lists, extra) of rows ``x``: decoded from the stored bytes ``raw``
  (and their IVF ``lists``) when given, else encoded anew (1-bit only). Either way the
  codes, factors included, are constants: the centres' gradient goes through
  `reconstruct` and `row_bias` with the code held fixed, as PQ's goes through its
  codebooks."""
  if raw is None:
    bits, factors, lists = encode(q, x)
    return bits, jax.lax.stop_gradient(factors), lists, None
  bits, factors, extra = split_codes(raw, x.shape[-1], q.nb_bits)
  if lists is None:
    lists = jnp.zeros(x.shape[0], jnp.int32)
  return bits, factors, lists, extra
