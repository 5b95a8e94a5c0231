"""Optional loss terms, each behind one small interface (`LossTerm`).

The paper's loss (``qdr_jax.train.loss``) is the contrastive loss through the
straight-through quantizer. The terms here are research options added to it with a
weight when their config key is set; ``loss_terms`` builds the list the step adds up.
What each measured is in docs/research/index-learning.md.

- ``loss.distill_weight``: KL(flat || quantized) of each query's softmax over the pool,
  training queries and label-free pseudo-queries (``negatives.pseudo_queries``) alike.
- ``loss.balance_weight``: a uniform-usage penalty on PQ codewords and IVF lists.
- pseudo-queries labelled with their own passage (``negatives.pseudo_query_source=
  'positive'``): a contrastive term of their own over the same pool.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Protocol

import jax
import jax.numpy as jnp
import ml_collections

from qdr_jax.quant import Quantizer, assign_coarse, coarse_scores, rotate
from qdr_jax.train.loss import NEG_INF, contrastive_loss
from qdr_jax.train.modes import Mode

# Softness of the balance penalty's assignments, in units of each row's score spread.
BALANCE_TEMPERATURE = 0.25
# Pool rows (evenly strided) the balance penalty estimates the usage on: its soft
# assignments cost P x M x K values and their gradient, several times the rest of the
# update at the demo's shape on a CPU.
BALANCE_ROWS = 512


@dataclasses.dataclass(frozen=True)
class TermInputs:
  """What a step hands every term, inside the differentiated loss function.

  query_emb: (B, d) the step's queries: the ``num_training`` training queries first, then
    the pseudo-queries.
  rows: (P, d) full-precision pool rows.
  targets: (P, d) the rows as the index serves them (``train.step.pool_targets``).
  positive_mask, hidden_mask: (B, P) labelled positives and rows hidden from a query.
  valid: (P,) rows that take part at all.
  quantizer: the pool's quantizer with the learned index parameters in place; None in
    modes that do not quantize.
  row_bias: (P,) what the served score adds to ``query . target`` per row (RaBitQ's
    constant, ``train.step.pool_bias``); None for PQ.
  multiplicity: (P,) times each row stands in a pool that keeps repeats; None = once.
  """
  query_emb: jax.Array
  num_training: int
  rows: jax.Array
  targets: jax.Array
  positive_mask: jax.Array
  hidden_mask: jax.Array
  valid: jax.Array
  quantizer: Quantizer | None
  row_bias: jax.Array | None = None
  multiplicity: jax.Array | None = None

  @property
  def active(self) -> jax.Array:
    """(B, P) rows in each query's softmax."""
    return self.valid[None, :] & ~self.hidden_mask


class LossTerm(Protocol):
  """A term the step adds to the paper's loss: ``weight * term(inputs)[0]``; its
  metrics are logged with the step's. One that ``needs_quantizer`` is skipped when the
  step has none."""
  weight: float
  needs_quantizer: ClassVar[bool]

  def __call__(self, inputs: TermInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
    ...


@dataclasses.dataclass(frozen=True)
class Distillation:
  """``distillation_loss`` of every query of the step (quantizing modes)."""
  weight: float
  temperature: float
  needs_quantizer: ClassVar[bool] = True

  def __call__(self, inputs: TermInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
    return distillation_loss(inputs.query_emb, inputs.rows, inputs.targets, inputs.active,
                             temperature=self.temperature)


@dataclasses.dataclass(frozen=True)
class Balance:
  """``balance_penalty`` of the pool's rows under the current quantizer (quantizing modes)."""
  weight: float
  needs_quantizer: ClassVar[bool] = True

  def __call__(self, inputs: TermInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
    return balance_penalty(inputs.quantizer, inputs.rows, inputs.valid,
                           temperature=BALANCE_TEMPERATURE, max_rows=BALANCE_ROWS)


@dataclasses.dataclass(frozen=True)
class LabelledPseudoQueries:
  """The contrastive loss of the pseudo-queries labelled with their own passage (the
  queries after the training ones), averaged on its own so that it weighs as the
  training queries' loss does, whatever the two counts."""
  weight: float
  temperature: float
  multi_positive: str
  needs_quantizer: ClassVar[bool] = False

  def __call__(self, inputs: TermInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
    n = inputs.num_training
    value, metrics = contrastive_loss(
        inputs.query_emb[n:], inputs.targets, inputs.positive_mask[n:],
        inputs.hidden_mask[n:], inputs.valid, temperature=self.temperature,
        multi_positive=self.multi_positive, row_bias=inputs.row_bias,
        multiplicity=inputs.multiplicity)
    return value, {"pseudo_loss": value, "pseudo_pool_accuracy": metrics["pool_accuracy"]}


def loss_terms(config: ml_collections.ConfigDict, mode: Mode) -> list[LossTerm]:
  """The optional terms ``config`` turns on for ``mode``; empty for the paper's loss.
  Distillation and balance compare with or act on the quantizer: quantizing modes only."""
  loss = config.loss
  terms: list[LossTerm] = []
  if (int(config.negatives.pseudo_queries)
      and config.negatives.pseudo_query_source == "positive"):
    terms.append(LabelledPseudoQueries(1.0, float(loss.temperature), loss.multi_positive))
  if mode.quantize and float(loss.distill_weight):
    terms.append(Distillation(float(loss.distill_weight), float(loss.temperature)))
  if mode.quantize and float(loss.balance_weight):
    terms.append(Balance(float(loss.balance_weight)))
  return terms


def distillation_loss(query_emb: jax.Array, rows: jax.Array, targets: jax.Array,
                      active: jax.Array, *, temperature: float
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
  how it reaches passages no label names.

  Args:
    query_emb: (B, d) queries (training queries and label-free pseudo-queries).
    rows: (P, d) full-precision pool rows.
    targets: (P, d) the rows as the index serves them (``pool_targets``).
    active: (B, P) rows in each query's softmax (valid and not hidden from it).
    temperature: both score sets are divided by it.

  Returns:
    (scalar mean over queries with an active row, metrics).
  """
  q = query_emb.astype(_at_least_f32(query_emb))
  frozen_rows = jax.lax.stop_gradient(rows.astype(q.dtype))
  teacher = jax.lax.stop_gradient(q) @ frozen_rows.T
  targets = targets.astype(q.dtype)
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


def _soft_usage(scores: jax.Array, weight: jax.Array, temperature: float) -> jax.Array:
  """(K,) weighted mean over rows of softmax(scores / (spread * temperature))."""
  spread = scores.std(axis=-1, keepdims=True).clip(1e-12)
  return weight @ jax.nn.softmax(scores / (spread * temperature), axis=-1)


def _kl_to_uniform(usage: jax.Array) -> jax.Array:
  """KL(usage || uniform) = sum u log u + log K; 0 only for uniform usage."""
  return jnp.sum(jnp.where(usage > 0, usage * jnp.log(jnp.where(usage > 0, usage, 1.0)), 0.0)
                 ) + jnp.log(usage.shape[-1])


def _at_least_f32(x: jax.Array) -> jnp.dtype:
  """float32 for bfloat16/float16 inputs; float64 stays (finite-difference tests)."""
  return jnp.promote_types(x.dtype, jnp.float32)
