"""The loss terms of a step over the shared pool of rows, as pure functions.

Scores are ``q @ targets.T / temperature`` over the whole pool (B x P). Each query's
labelled positives are pulled up against its negatives: every pool row that is valid,
not one of its positives and not hidden from it (unlabelled relevant rows). Optional
terms: IVF routing, distillation of the flat ranking into the quantized one (which needs
no labels) and a uniform-usage penalty on codewords and lists.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

from qdr_jax.quant import Quantizer, assign_coarse, coarse_scores, rotate

NEG_INF = -1e9  # finite, so rows masked everywhere give zero gradient rather than NaN


def contrastive_loss(query_emb: jax.Array, targets: jax.Array, positive_mask: jax.Array,
                     hidden_mask: jax.Array, valid: jax.Array, *, temperature: float,
                     multi_positive: str = "mean", multiplicity: jax.Array | None = None
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Softmax cross-entropy of each query over the pool.

  Args:
    query_emb: (B, d) query embeddings.
    targets: (P, d) pool rows as the index serves them (reconstructions under STE).
    positive_mask: (B, P) labelled positives of each query.
    hidden_mask: (B, P) rows excluded from a query's softmax.
    valid: (P,) rows that take part at all.
    temperature: scores are divided by it.
    multi_positive: 'mean' - each positive against the query's negatives, averaged over
      its positives; 'marginal' - -log of the total probability of the positives.
    multiplicity: (P,) times each row stands in the pool (`Pool.multiplicity`): a
      negative counts that many times in the softmax's denominator; None = once.

  Returns:
    (scalar loss, metrics) with the in-pool accuracy (top-scored row is a positive).
  """
  scores = (query_emb.astype(jnp.float32) @ targets.astype(jnp.float32).T) / temperature
  active = valid[None, :] & ~hidden_mask
  positive = positive_mask & active
  negative = active & ~positive
  repeated = scores if multiplicity is None else scores + jnp.log(multiplicity)[None, :]
  neg_lse = jax.nn.logsumexp(jnp.where(negative, repeated, NEG_INF), axis=1)  # (B,)
  num_pos = positive.sum(axis=1)
  has_pos = num_pos > 0
  if multi_positive == "mean":
    per_positive = jnp.logaddexp(scores, neg_lse[:, None]) - scores
    per_query = jnp.where(positive, per_positive, 0.0).sum(1) / jnp.maximum(num_pos, 1)
  elif multi_positive == "marginal":
    pos_lse = jax.nn.logsumexp(jnp.where(positive, scores, NEG_INF), axis=1)
    per_query = jnp.logaddexp(pos_lse, neg_lse) - pos_lse
  else:
    raise ValueError(f"config.loss.multi_positive must be mean or marginal; got {multi_positive!r}")
  loss = jnp.where(has_pos, per_query, 0.0).sum() / jnp.maximum(has_pos.sum(), 1)
  best = jnp.argmax(jnp.where(active, scores, NEG_INF), axis=1)
  hit = jnp.take_along_axis(positive, best[:, None], axis=1)[:, 0]
  accuracy = jnp.where(has_pos, hit, False).sum() / jnp.maximum(has_pos.sum(), 1)
  return loss, {"loss": loss, "pool_accuracy": accuracy}


def routing_loss(coarse_logits: jax.Array, row_lists: jax.Array, positive_mask: jax.Array,
                 valid: jax.Array, *, nprobe: int) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Cross-entropy of each query's IVF probe order against its positives' lists.

  An IVF index only scores the passages of the ``nprobe`` lists a query probes, so a
  positive whose list is not among them is lost however well its PQ code scores. This
  term teaches the query encoder to probe its positives' lists first; the contrastive
  loss cannot, because it never sees the coarse quantizer.

  Args:
    coarse_logits: (B, nlist) ``coarse_scores`` of the queries, divided by a temperature.
    row_lists: (P,) IVF list of each pool row (as the index stores it).
    positive_mask: (B, P) labelled positives of each query.
    valid: (P,) rows that take part at all.
    nprobe: lists probed at search time, for the recall metric.

  Returns:
    (scalar loss, metrics) with ``routing_recall``: the share of queries whose positives'
    lists are all among their top-``nprobe`` lists.
  """
  nlist = coarse_logits.shape[1]
  positive = (positive_mask & valid[None, :]).astype(jnp.float32)
  per_list = positive @ jax.nn.one_hot(row_lists, nlist, dtype=jnp.float32)  # (B, nlist)
  num_pos = per_list.sum(axis=1)
  has_pos = num_pos > 0
  target = per_list / jnp.maximum(num_pos, 1.0)[:, None]
  per_query = -(target * jax.nn.log_softmax(coarse_logits.astype(jnp.float32), axis=1)).sum(1)
  denom = jnp.maximum(has_pos.sum(), 1)
  loss = jnp.where(has_pos, per_query, 0.0).sum() / denom
  # A list is probed when fewer than nprobe lists score strictly higher.
  rank = (coarse_logits[:, None, :] > coarse_logits[:, :, None]).sum(-1)  # (B, nlist)
  missed = ((per_list > 0) & (rank >= nprobe)).any(axis=1)
  recall = jnp.where(has_pos, ~missed, False).sum() / denom
  return loss, {"routing_loss": loss, "routing_recall": recall}


# What a term's gradient moves: "all" (query encoder, rows through the straight-through
# estimator, learned index parameters) or "index" (the learned index parameters only).
LOSS_REACHES = ("all", "index")


def index_reconstruction(targets: jax.Array, rows: jax.Array) -> jax.Array:
  """The reconstruction inside straight-through ``targets`` (``pool_targets``: ``rows -
  sg(rows) + reconstruction``), with its gradient to the learned index parameters only:
  the two row terms, which carry the straight-through path, cancel."""
  return targets - rows + jax.lax.stop_gradient(rows)


def distillation_loss(query_emb: jax.Array, rows: jax.Array, targets: jax.Array,
                      active: jax.Array, *, temperature: float, reaches: str = "all"
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """KL(flat || quantized) of each query's softmax over its active pool rows.

  The teacher is the flat ranking, ``q . row``; the student the ranking the index serves,
  ``q . reconstruction``. The teacher side is a constant (stop-gradient on the query and
  the rows): the term exists to make the quantized ranking match the flat one, and
  letting it move the teacher would let it close the gap the cheap way, by degrading the
  flat ranking towards the quantized one. Under the straight-through estimator the
  reconstruction's gradient reaches the row as identity, so a row would also get the
  teacher's gradient back through its own flat score and the two would largely cancel.
  The student's gradient reaches the query encoder, the rows (straight-through) and the
  quantizer's shared parameters (codebooks, centroids, rotation when learned), which is
  how it reaches passages no label names. With ``reaches="index"`` only the shared
  parameters get it: the query and the straight-through path to the row are cut, so the
  term cannot move the flat ranking at all.

  Args:
    query_emb: (B, d) queries (training queries and label-free pseudo-queries).
    rows: (P, d) full-precision pool rows.
    targets: (P, d) the rows as the index serves them (``pool_targets``).
    active: (B, P) rows in each query's softmax (valid and not hidden from it).
    temperature: both score sets are divided by it.
    reaches: "all" or "index" (see above).

  Returns:
    (scalar mean over queries with an active row, metrics).
  """
  if reaches not in LOSS_REACHES:
    raise ValueError(f"reaches must be one of {LOSS_REACHES}, got {reaches!r}.")
  q = query_emb.astype(_at_least_f32(query_emb))
  frozen_rows = jax.lax.stop_gradient(rows.astype(q.dtype))
  teacher = jax.lax.stop_gradient(q) @ frozen_rows.T
  targets = targets.astype(q.dtype)
  if reaches == "index":
    q, targets = jax.lax.stop_gradient(q), index_reconstruction(targets, rows.astype(q.dtype))
  student = q @ targets.T
  per_query = kl_divergence(teacher / temperature, student / temperature, active)
  has_row = active.any(axis=1)
  loss = jnp.where(has_row, per_query, 0.0).sum() / jnp.maximum(has_row.sum(), 1)
  # How often the quantized top row is the flat top row: the gap the term closes.
  same_top = (jnp.argmax(jnp.where(active, teacher, NEG_INF), axis=1)
              == jnp.argmax(jnp.where(active, student, NEG_INF), axis=1))
  agreement = jnp.where(has_row, same_top, False).sum() / jnp.maximum(has_row.sum(), 1)
  return loss, {"distill_loss": loss, "distill_top1_agreement": agreement}


def kl_divergence(teacher_logits: jax.Array, student_logits: jax.Array,
                  mask: jax.Array) -> jax.Array:
  """(B,) KL(softmax(teacher) || softmax(student)) over the columns ``mask`` keeps.

  Differentiable in both arguments (the caller decides which side is a constant); a row
  with no column kept gives 0.
  """
  log_t = jax.nn.log_softmax(jnp.where(mask, teacher_logits, NEG_INF), axis=1)
  log_s = jax.nn.log_softmax(jnp.where(mask, student_logits, NEG_INF), axis=1)
  p_t = jnp.where(mask, jnp.exp(log_t), 0.0)
  return jnp.where(mask, p_t * (log_t - log_s), 0.0).sum(axis=1)


def balance_penalty(quantizer: Quantizer, rows: jax.Array, valid: jax.Array, *,
                    temperature: float, max_rows: int = 0
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Uniform-usage penalty on PQ codewords and IVF lists (RepCONC's balance constraint,
  as a soft penalty).

  Each valid pool row is softly assigned to each sub-codebook's codewords (softmax of
  the negative squared distances of its sub-vector) and, with an IVF level, to the
  coarse lists (softmax of ``coarse_scores``); the penalty is KL(mean usage || uniform),
  averaged over the sub-codebooks, plus the same for the lists. A codeword or list that
  no row uses wastes code space, and an overfull one ranks its members by its shared
  part only: both lose resolution. Assignment scores are divided by their per-row
  standard deviation before ``temperature``, so one temperature suits sub-vector
  distances (about 1e-2 for unit rows) and coarse inner products (about 1) alike; the
  spread stays in the gradient, so the penalty cannot be lowered by shrinking the
  codewords or lists together (which flattens the soft usage without balancing the hard
  one). Differentiable in the rows and in the quantizer's arrays; the row's IVF list
  (for the residual) is the hard assignment, as the index stores it.

  Args:
    quantizer: the pool's quantizer (with learned arrays in place when they are learned).
    rows: (P, d) full-precision pool rows.
    valid: (P,) rows that take part.
    temperature: softness of the assignments, in units of each row's score spread.
    max_rows: when > 0 and the pool is larger, the usage is estimated from this many
      evenly strided pool rows: the soft assignments cost P x M x K values and their
      gradient, several times the rest of the update at the demo's shape on a CPU.

  Returns:
    (scalar penalty, metrics with the PQ and IVF parts).
  """
  if 0 < max_rows < rows.shape[0]:
    stride = -(-rows.shape[0] // max_rows)  # static: the pool's shape is
    rows, valid = rows[::stride], valid[::stride]
  x = rows.astype(_at_least_f32(rows))
  weight = valid.astype(x.dtype) / jnp.maximum(valid.sum(), 1)
  y = rotate(quantizer, x)
  metrics = {}
  total = 0.0
  if quantizer.has_ivf:
    coarse = _soft_usage(coarse_scores(quantizer, x), weight, temperature)  # (nlist,)
    metrics["balance_ivf"] = _kl_to_uniform(coarse)
    total = total + metrics["balance_ivf"]
    if quantizer.by_residual:
      lists = assign_coarse(quantizer, jax.lax.stop_gradient(x))
      y = y - quantizer.coarse_centroids[lists]
  m, k, dsub = quantizer.codebooks.shape
  sub = y.reshape(-1, m, dsub).transpose(1, 0, 2)  # (M, P, dsub)
  # Sub-codebook-major layout: XLA's CPU batched matmul with this tiny contraction (dsub)
  # ran about 2.5x faster as (M, K, P) than as (P, M, K).
  dist = (jnp.sum(sub * sub, -1)[:, None, :]
          - 2.0 * jnp.einsum("mkd,mpd->mkp", quantizer.codebooks, sub)
          + jnp.sum(quantizer.codebooks ** 2, -1)[:, :, None])  # (M, K, P)
  usage = jax.vmap(lambda s: _soft_usage(s.T, weight, temperature))(-dist)  # (M, K)
  metrics["balance_pq"] = jax.vmap(_kl_to_uniform)(usage).mean()
  total = total + metrics["balance_pq"]
  metrics["balance_loss"] = total
  return total, metrics


def distortion_penalty(rows: jax.Array, targets: jax.Array, valid: jax.Array,
                       parallel_weight: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean squared quantization error ``||reconstruction - row||^2`` of the valid pool
  rows, as a pull on the learned index parameters only (the k-means objective the
  index was built with).

  The ranking losses move the shared codewords and centroids for the passages that
  labels and pools name: at 32x the learned index served queries whose positives were
  training positives better than dback's k-means index, and the others 0.02-0.03 nDCG@10
  worse, with the same flat ranking (BENCHMARKS.md, issue 13). This term anchors every
  codeword to the rows it encodes; the rows themselves are not pulled towards their codes
  (`index_reconstruction`). On SciFact it did not win those queries back.

  ``parallel_weight`` > 1 makes it score-aware (ScaNN's anisotropic loss): the error
  along the row's own direction changes the row's inner product with every query close
  to it, which is what decides its rank among its neighbours, while the orthogonal error
  mostly averages out over such queries; weighting the parallel part more spends the code
  space where search needs it.

  Args:
    rows: (P, d) full-precision pool rows.
    targets: (P, d) the rows as the index serves them (``pool_targets``).
    valid: (P,) rows that take part (the pool's random filler rows included).
    parallel_weight: weight of the error's component along the row (the orthogonal
      component weighs 1); 1 is the squared error.

  Returns:
    (scalar weighted mean over valid rows, {"distortion": the same}).
  """
  dtype = _at_least_f32(rows)
  rows = rows.astype(dtype)
  frozen = jax.lax.stop_gradient(rows)
  error = index_reconstruction(targets.astype(dtype), rows) - frozen
  squared = jnp.sum(error * error, axis=-1)
  if parallel_weight != 1.0:
    # |e.x|^2 / |x|^2 is the parallel part; padding rows of zeros are masked by ``valid``.
    along = jnp.sum(error * frozen, axis=-1) ** 2 / jnp.maximum(
        jnp.sum(frozen * frozen, axis=-1), jnp.finfo(dtype).tiny)
    squared = squared + (parallel_weight - 1.0) * along
  weight = valid.astype(dtype) / jnp.maximum(valid.sum(), 1)
  value = weight @ squared
  return value, {"distortion": value}


def norm_ratio_penalty(rows: jax.Array, targets: jax.Array, valid: jax.Array
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted variance over the valid pool rows of ``|reconstruction| / |row|``, as a pull
  on the learned index parameters only.

  Under inner-product search a passage whose reconstruction keeps more of its row's length
  scores higher for every query. k-means reconstructions shrink every row alike; codebooks
  learned from the ranking loss keep the training positives' reconstructions at full
  length while the others shrink, and the served index then puts training positives into
  the top 10 of queries that never named them (`experiments/trained_share.py`,
  BENCHMARKS.md, issue 13). This term asks every pool row's reconstruction, the pool's
  unlabelled filler rows included, to keep the same fraction of its length.

  Args:
    rows: (P, d) full-precision pool rows.
    targets: (P, d) the rows as the index serves them (``pool_targets``).
    valid: (P,) rows that take part.

  Returns:
    (scalar variance, {"norm_ratio_var": the same, "norm_ratio_mean": the weighted mean}).
  """
  dtype = _at_least_f32(rows)
  rows = rows.astype(dtype)
  recon = index_reconstruction(targets.astype(dtype), rows)
  row_norm = jax.lax.stop_gradient(jnp.linalg.norm(rows, axis=-1))
  # sqrt(|r|^2 + tiny): finite gradient at a zero reconstruction (padding rows are masked).
  recon_norm = jnp.sqrt(jnp.sum(recon * recon, axis=-1) + jnp.finfo(dtype).tiny)
  ratio = recon_norm / jnp.maximum(row_norm, jnp.finfo(dtype).tiny)
  weight = valid.astype(dtype) / jnp.maximum(valid.sum(), 1)
  mean = weight @ ratio
  value = weight @ jnp.square(ratio - mean)
  return value, {"norm_ratio_var": value, "norm_ratio_mean": mean}


def _soft_usage(scores: jax.Array, weight: jax.Array, temperature: float) -> jax.Array:
  """(K,) weighted mean over rows of softmax(scores / (spread * temperature))."""
  spread = scores.std(axis=-1, keepdims=True).clip(1e-12)
  return weight @ jax.nn.softmax(scores / (spread * temperature), axis=-1)


def _kl_to_uniform(usage: jax.Array) -> jax.Array:
  """KL(usage || uniform) = sum u log u + log K; 0 only for uniform usage."""
  return jnp.sum(jnp.where(usage > 0, usage * jnp.log(jnp.where(usage > 0, usage, 1.0)), 0.0)
                 ) + jnp.log(usage.shape[-1])


# (queries, full-precision pool rows, pool targets, (B, P) active mask, (P,) valid,
#  quantizer with learned arrays in place) -> (weighted sum of the terms, metrics).
QuantizationTerms = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def quantization_terms(loss_config: ml_collections.ConfigDict) -> QuantizationTerms | None:
  """The weighted distillation, balance, distortion and norm-ratio terms ``loss_config`` turns on, as
  one pure function of the pool, or None when every weight is 0 (the paper's loss)."""
  distill_weight = float(loss_config.distill_weight)
  distill_temperature = float(loss_config.distill_temperature)
  distill_reaches = str(loss_config.distill_reaches)
  balance_weight = float(loss_config.balance_weight)
  balance_temperature = float(loss_config.balance_temperature)
  balance_rows = int(loss_config.balance_rows)
  distortion_weight = float(loss_config.distortion_weight)
  distortion_parallel_weight = float(loss_config.distortion_parallel_weight)
  norm_ratio_weight = float(loss_config.norm_ratio_weight)
  if not (distill_weight or balance_weight or distortion_weight or norm_ratio_weight):
    return None

  def terms(query_emb, rows, targets, active, valid, quantizer):
    total, metrics = jnp.zeros((), jnp.float32), {}
    if distill_weight:
      value, part = distillation_loss(query_emb, rows, targets, active,
                                      temperature=distill_temperature,
                                      reaches=distill_reaches)
      total, metrics = total + distill_weight * value, {**metrics, **part}
    if balance_weight:
      value, part = balance_penalty(quantizer, rows, valid, temperature=balance_temperature,
                                    max_rows=balance_rows)
      total, metrics = total + balance_weight * value, {**metrics, **part}
    if distortion_weight:
      value, part = distortion_penalty(rows, targets, valid, distortion_parallel_weight)
      total, metrics = total + distortion_weight * value, {**metrics, **part}
    if norm_ratio_weight:
      value, part = norm_ratio_penalty(rows, targets, valid)
      total, metrics = total + norm_ratio_weight * value, {**metrics, **part}
    return total, metrics

  return terms


def _at_least_f32(x: jax.Array) -> jnp.dtype:
  """float32 for bfloat16/float16 inputs; float64 stays (finite-difference tests)."""
  return jnp.promote_types(x.dtype, jnp.float32)
