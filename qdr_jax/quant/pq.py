"""Product quantization in JAX, kept bit-for-bit compatible with a trained FAISS index.

A `Quantizer` holds exactly what FAISS uses to encode a vector into an (IVF)PQ code:
an optional OPQ rotation, optional IVF coarse centroids and the PQ codebooks. The
functions here encode, decode and score the way FAISS does, so a training loop can see
the same reconstructions (and the same asymmetric inner-product scores) that the
deployed index will produce.

Conventions (verified against faiss-cpu 1.15 in tests/test_quant.py):
  * OPQ: FAISS applies `y = x @ A.T` with `A` of shape (d_out, d_in); `A` has
    orthonormal rows, so the reverse map (used by `index.reconstruct`) is `x = y @ A`.
  * Coarse centroids and codebooks live in the rotated space.
  * IVF assignment uses the coarse quantizer's metric: an IVF built with
    METRIC_INNER_PRODUCT has an IndexFlatIP quantizer, so lists are chosen by the
    largest inner product, not the smallest L2 distance. HNSW coarse quantizers search
    approximately; JAX always assigns exactly, so a few vectors may land in another
    list than the one FAISS picked.
  * PQ sub-quantizer assignment is always by L2 (whatever the index metric), on the
    residual `y - c[list]` when `by_residual`, else on `y` itself.
  * An inner-product IVFPQ search scores `<R q, c[list]> + <R q, pq_decode(code)>`
    (the coarse term only when `by_residual`), i.e. `<q, reconstruction>`.

Everything below is a pure function of a `Quantizer` pytree and arrays, and jits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from qdr_jax import platform
from qdr_jax.reductions import row_argmax, row_argmin

Array = jax.Array

_METRICS = ("ip", "l2")


@struct.dataclass
class Quantizer:
  """(OPQ +) (IVF +) PQ parameters as a pytree.

  Attributes:
    codebooks: (M, K, dsub) float32 PQ centroids, in the rotated space. A plain leaf so
      optax can train it (JPQ-style codebook learning).
    rotation: (d_out, d_in) float32 OPQ matrix `A` (FAISS applies `x @ A.T`), or None.
    coarse_centroids: (nlist, d_out) float32 IVF centroids in the rotated space, or
      None for a plain IndexPQ.
    by_residual: static; whether PQ encodes `y - coarse_centroids[list]`.
    coarse_metric: static; 'ip' (largest inner product wins) or 'l2'.
  """

  codebooks: Array
  rotation: Array | None = None
  coarse_centroids: Array | None = None
  by_residual: bool = struct.field(pytree_node=False, default=False)
  coarse_metric: str = struct.field(pytree_node=False, default="ip")

  def __post_init__(self):
    # Only static fields are checked: pytree maps (optax, jax.tree.map) rebuild the class
    # with arbitrary leaves, including None.
    if self.coarse_metric not in _METRICS:
      raise ValueError(f"coarse_metric must be one of {_METRICS}, got {self.coarse_metric!r}")

  @property
  def num_subquantizers(self) -> int:
    """M: number of sub-quantizers (bytes per code at 8 bits)."""
    return self.codebooks.shape[0]

  @property
  def ksub(self) -> int:
    """K: centroids per sub-quantizer."""
    return self.codebooks.shape[1]

  @property
  def dsub(self) -> int:
    """Dimension of one sub-vector."""
    return self.codebooks.shape[2]

  @property
  def code_dim(self) -> int:
    """Dimension of the (rotated) space PQ works in."""
    return self.num_subquantizers * self.dsub

  @property
  def dim(self) -> int:
    """Dimension of the input (original, unrotated) vectors."""
    return self.code_dim if self.rotation is None else self.rotation.shape[1]

  @property
  def has_ivf(self) -> bool:
    return self.coarse_centroids is not None


# The index parameters a run may learn (``config.quant.learn``) and the `Quantizer` field
# each one is.
INDEX_PARAMS = ("codebooks", "centroids", "rotation")
_FIELDS = {"codebooks": "codebooks", "centroids": "coarse_centroids", "rotation": "rotation"}


def index_params(q: Quantizer, learn) -> dict[str, Array]:
  """The learned subset ``learn`` (names from `INDEX_PARAMS`) of ``q``'s parameters.

  Raises:
    ValueError: a name is unknown, or ``q`` has no such level (no IVF, no OPQ).
  """
  out = {}
  for name in learn:
    if name not in _FIELDS:
      raise ValueError(f"Unknown index parameter {name!r}; expected some of {INDEX_PARAMS}.")
    value = getattr(q, _FIELDS[name])
    if value is None:
      raise ValueError(f"The quantizer has no {name} to learn (no "
                       f"{'IVF level' if name == 'centroids' else 'OPQ rotation'}).")
    out[name] = value
  return out


def with_index_params(q: Quantizer, params: dict[str, Array] | None) -> Quantizer:
  """``q`` with the learned ``params`` (`index_params`'s dict) in place of its own."""
  if not params:
    return q
  return q.replace(**{_FIELDS[name]: value for name, value in params.items()})


# Newton-Schulz steps for a rotation one optimizer step away from orthonormal: the error
# squares each step, so 6 take a deviation of 0.3 below float32's resolution.
_NEWTON_SCHULZ_STEPS = 6


def orthogonalize(r: Array) -> Array:
  """The nearest matrix to ``r`` (Frobenius) with orthonormal rows (its polar factor,
  ``U V^T`` of its SVD).

  Projects a learned OPQ rotation back after a gradient step, so that `unrotate` (which
  assumes ``A A^T = I``) stays its inverse and FAISS's reverse transform agrees. Near an
  orthonormal matrix (the case after a step) the Newton-Schulz iteration
  ``X <- 1.5 X - 0.5 X X^T X`` reaches it with matmuls alone (46 ms against the SVD's 476 ms
  at 384x384 on a shared 2-core CPU); any other ``r`` falls back to the SVD (``lax.cond`` runs one branch).
  """
  x = r
  for _ in range(_NEWTON_SCHULZ_STEPS):
    x = 1.5 * x - 0.5 * (x @ x.T) @ x
  # Every entry compared (a NaN compares False), not a max: XLA's max may drop NaNs.
  converged = jnp.all(jnp.abs(x @ x.T - jnp.eye(r.shape[0], dtype=r.dtype)) < 1e-5)

  def exact(r):
    u, _, vt = jnp.linalg.svd(r, full_matrices=False)
    return u @ vt

  return jax.lax.cond(converged, lambda _: x, exact, r)


def _residual_centroids(q: Quantizer) -> Array:
  if q.coarse_centroids is None:
    raise ValueError("A by_residual quantizer needs coarse_centroids.")
  return q.coarse_centroids


# The products that decide codes (OPQ rotation, coarse scores, codeword distances) run
# in full float32, as FAISS computes them: at the default precision a GPU multiplies in
# TF32 (10-bit mantissas), which flips near-tie codes (simulated at PQ128x8: 0.07% of
# sub-codes, so about 8% of rows carry a code FAISS would not assign) and a TPU in
# bfloat16 passes. On CPU the setting changes nothing.
CODE_PRECISION = jax.lax.Precision.HIGHEST


def rotate(q: Quantizer, x: Array) -> Array:
  """Maps (N, d_in) vectors into the space PQ works in (FAISS: `x @ A.T`)."""
  return x if q.rotation is None else jnp.matmul(x, q.rotation.T, precision=CODE_PRECISION)


def unrotate(q: Quantizer, y: Array) -> Array:
  """Inverse of `rotate` for an orthonormal OPQ matrix (FAISS: `y @ A`)."""
  return y if q.rotation is None else y @ q.rotation


def _coarse_scores_rotated(q: Quantizer, y: Array) -> Array:
  c = _residual_centroids(q)
  dots = jnp.matmul(y, c.T, precision=CODE_PRECISION)
  if q.coarse_metric == "ip":
    return dots
  # -||y - c||^2 up to ||y||^2, which is the same for every centroid and so changes
  # neither the order of the lists nor a softmax over them.
  return 2.0 * dots - jnp.sum(c * c, axis=-1)


def coarse_scores(q: Quantizer, x: Array) -> Array:
  """How strongly each IVF list is probed for each vector: larger is probed first.

  Inner products for an 'ip' coarse quantizer, negative squared L2 distances (less the
  vector's own norm) for 'l2'; the top-``nprobe`` of a query's row are the lists an
  exact coarse search visits. Differentiable w.r.t. ``x`` and the centroids.

  Args:
    q: a quantizer with an IVF level.
    x: (N, d) vectors in the original space.

  Returns:
    (N, nlist) float32 scores.
  """
  return _coarse_scores_rotated(q, rotate(q, x))


def _assign_rotated(q: Quantizer, y: Array) -> Array:
  if q.coarse_centroids is None:
    return jnp.zeros(y.shape[:1], jnp.int32)
  return row_argmax(_coarse_scores_rotated(q, y))


def assign_coarse(q: Quantizer, x: Array) -> Array:
  """IVF list of each vector, exact search in the coarse quantizer's metric.

  Args:
    q: the quantizer.
    x: (N, d) vectors in the original space.

  Returns:
    (N,) int32 list ids; all zeros when the quantizer has no IVF level.
  """
  return _assign_rotated(q, rotate(q, x))


def _nearest_codewords(q: Quantizer, r: Array) -> Array:
  """(N, M) int32 nearest codeword (L2) per sub-vector of (N, M*dsub) `r`."""
  n = r.shape[0]
  m, k, dsub = q.codebooks.shape
  # Sub-quantizer-major (M, N, dsub), so that the batch axis of the matmul leads on both
  # sides: M plain GEMMs instead of a transpose of the (N, M, K) output.
  sub = r.reshape(n, m, dsub).transpose(1, 0, 2)
  c_sq = jnp.sum(q.codebooks * q.codebooks, axis=-1)

  def nearest(sub, codebooks, c_sq):
    # ||r - c||^2 = ||r||^2 - 2 r.c + ||c||^2 as a matmul: (N, K) memory, never the
    # (N, K, dsub) broadcast. ||r||^2 is kept (not dropped as a constant) so the float
    # rounding is closer to FAISS's, which matters only for near-ties.
    dots = jnp.einsum('...nd,...kd->...nk', sub, codebooks, precision=CODE_PRECISION)
    dist = jnp.sum(sub * sub, axis=-1, keepdims=True) - 2.0 * dots + c_sq[..., None, :]
    return row_argmin(dist)

  if platform.is_cpu():
    # One sub-quantizer at a time: the (N, K) distances of one stay in cache for the
    # argmin, where all M at once (N * M * K floats, 157 MB for a 3,200-row pool at
    # PQ48x8) stream through memory twice. 2.8-3.2x faster for 3,200-16,000 rows
    # on a 2-core CPU; accelerators take the batched form in one kernel.
    codes = jax.lax.map(lambda args: nearest(*args), (sub, q.codebooks, c_sq))
  else:
    codes = nearest(sub, q.codebooks, c_sq)
  return codes.T


def encode(q: Quantizer, x: Array, coarse_ids: Array | None = None) -> Array:
  """PQ codes of `x`, as FAISS stores them.

  Args:
    q: the quantizer.
    x: (N, d) vectors in the original space.
    coarse_ids: (N,) IVF lists, if already known (else computed with `assign_coarse`);
      only used when `q.by_residual`.

  Returns:
    (N, M) int32 codes in [0, K).
  """
  y = rotate(q, x)
  if q.by_residual:
    if coarse_ids is None:
      coarse_ids = _assign_rotated(q, y)
    y = y - _residual_centroids(q)[coarse_ids]
  return _nearest_codewords(q, y)


def decode(q: Quantizer, codes: Array, coarse_ids: Array | None = None) -> Array:
  """Reconstructions in the original space (what `index.reconstruct` returns).

  Differentiable w.r.t. the codebooks (and coarse centroids / rotation); the integer
  codes carry no gradient.

  Args:
    q: the quantizer.
    codes: (N, M) integer codes.
    coarse_ids: (N,) IVF lists; required when `q.by_residual`.

  Returns:
    (N, d) float32 reconstructions.
  """
  n, m = codes.shape
  # Gathering codebooks[m, codes[:, m]] for every m at once gives (N, M, dsub).
  parts = q.codebooks[jnp.arange(m)[None, :], codes]
  y = parts.reshape(n, m * q.dsub)
  if q.by_residual:
    if coarse_ids is None:
      raise ValueError("decode needs coarse_ids for a residual (by_residual) quantizer.")
    y = y + _residual_centroids(q)[coarse_ids]
  return unrotate(q, y)


def encode_with_lists(q: Quantizer, x: Array) -> tuple[Array, Array]:
  """(codes (N, M) int32, coarse ids (N,) int32), sharing one coarse assignment."""
  y = rotate(q, x)
  ids = _assign_rotated(q, y)
  if q.by_residual:
    y = y - _residual_centroids(q)[ids]
  return _nearest_codewords(q, y), ids


def quantize(q: Quantizer, x: Array) -> Array:
  """decode(encode(x)): the vector the FAISS index holds in place of `x`."""
  codes, ids = encode_with_lists(q, x)
  return decode(q, codes, ids)


def straight_through(q: Quantizer, x: Array, codebook_grad: bool = True) -> Array:
  """Straight-through estimator: forward is `quantize(q, x)`, d out / d x = identity.

  Written as `x_hat + (x - stop_gradient(x))` rather than
  `x + stop_gradient(x_hat - x)`: the forward value is then exactly `x_hat` (the added
  term is exactly zero) and, because `x_hat = decode(codes)` is differentiable in the
  codebooks, gradients also reach `q.codebooks` (JPQ-style codebook learning).

  Args:
    q: the quantizer.
    x: (N, d) vectors.
    codebook_grad: if False, no gradient flows into `q` (only the identity into x).

  Returns:
    (N, d) quantized vectors with a straight-through gradient.
  """
  if not codebook_grad:
    q = jax.lax.stop_gradient(q)
  x_hat = quantize(q, x)
  return x_hat + (x - jax.lax.stop_gradient(x))


def adc_scores(
    q: Quantizer,
    queries: Array,
    targets: Array,
    coarse_ids: Array | None = None,
) -> Array:
  """Asymmetric inner-product scores between full-precision queries and PQ vectors.

  Equal (up to float rounding) to the distances an inner-product FAISS (IVF)PQ search
  returns, including the `<q, coarse centroid>` term when `by_residual`.

  Args:
    q: the quantizer.
    queries: (Q, d) float queries in the original space.
    targets: either (N, d) float reconstructions (e.g. from `quantize`), scored by a
      plain matmul, or (N, M) integer codes, scored with per-query lookup tables the
      way FAISS does (cheaper when N*d is large). The branch is chosen from the dtype,
      which is static under jit.
    coarse_ids: (N,) IVF lists of integer `targets`; required when `q.by_residual`.

  Returns:
    (Q, N) float32 scores.
  """
  if jnp.issubdtype(targets.dtype, jnp.floating):
    return queries @ targets.T
  codes = targets
  nq = queries.shape[0]
  m, _, dsub = q.codebooks.shape
  # For an orthonormal A, <q, A^T y> = <A q, y>: score in the rotated space.
  qy = rotate(q, queries)
  lut = jnp.einsum("qmd,mkd->qmk", qy.reshape(nq, m, dsub), q.codebooks)
  scores = jnp.sum(lut[:, jnp.arange(m)[None, :], codes], axis=-1)
  if q.by_residual:
    if coarse_ids is None:
      raise ValueError("adc_scores on codes needs coarse_ids for a residual quantizer.")
    scores = scores + (qy @ _residual_centroids(q).T)[:, coarse_ids]
  return scores
