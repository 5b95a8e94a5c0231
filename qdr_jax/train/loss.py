"""The paper's loss over the shared pool of rows, as a pure function.

Scores are ``q @ targets.T / temperature`` over the whole pool (B x P), where the targets
are the rows as the index serves them (``train.step.pool_targets``: the straight-through
reconstructions in quantizing modes, through which the learned index parameters get
their gradient too). Each query's labelled positives are pulled up against its
negatives: every pool row that is valid, not one of its positives and not hidden from
it (unlabelled relevant rows). Optional terms live in ``qdr_jax.experimental``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e9  # finite, so rows masked everywhere give zero gradient rather than NaN


def contrastive_loss(query_emb: jax.Array, targets: jax.Array, positive_mask: jax.Array,
                     hidden_mask: jax.Array, valid: jax.Array, *, temperature: float,
                     multi_positive: str = "mean", row_bias: jax.Array | None = None,
                     multiplicity: jax.Array | None = None
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
    row_bias: (P,) added to every query's score of a row before the temperature (RaBitQ's
      estimate: ``step.pool_bias``), or None.
    multiplicity: (P,) times each row stands in the pool (`Pool.multiplicity`): a
      negative counts that many times in the softmax's denominator; None = once.

  Returns:
    (scalar loss, metrics) with the in-pool accuracy (top-scored row is a positive).
  """
  scores = query_emb.astype(jnp.float32) @ targets.astype(jnp.float32).T
  if row_bias is not None:
    scores = scores + row_bias.astype(jnp.float32)[None, :]
  scores = scores / temperature
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
