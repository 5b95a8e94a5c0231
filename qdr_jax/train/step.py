"""The pure train step, split in two jitted halves around the host's index search.

``encode`` runs the query encoder forward once and keeps its VJP (a pytree of
residuals), so the query embeddings can go to FAISS for negatives before the loss is
known; ``update`` then pulls the loss gradient back through that VJP instead of paying
for a second forward pass, updates the encoder, the pooled table rows (each with its own
optimizer state) and, when learned, the index parameters (PQ codebooks, IVF centroids,
OPQ rotation, projected back to orthonormal after each step).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qdr_jax.quant import Quantizer, decode, orthogonalize, quantize, with_index_params
from qdr_jax.quant import rabitq
from qdr_jax.quant.rabitq import RaBitQ
from qdr_jax import distributed, platform
from qdr_jax.experimental.loss_terms import TermInputs, loss_terms
from qdr_jax.sharding import DATA_AXIS
from qdr_jax.train.loss import contrastive_loss
from qdr_jax.train.modes import Mode
from qdr_jax.train import optim
from qdr_jax.train.optim import Schedule
from qdr_jax.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class StepFunctions:
  encode: Callable[[Any, dict[str, jax.Array]], tuple[jax.Array, Any]]
  update: Callable[..., tuple[TrainState, dict[str, jax.Array]]]


def pool_targets(rows: jax.Array, quantizer: Quantizer | RaBitQ | None,
                 learned: dict[str, jax.Array] | None,
                 codes: jax.Array | None = None, lists: jax.Array | None = None) -> jax.Array:
  """Pool rows as the loss sees them.

  With a quantizer the forward value is the PQ reconstruction of each row while the
  gradient reaches the full-precision row unchanged (straight-through) and, through the
  reconstruction ``R^T (decode(codes) + c[list])`` with the codes held fixed, the
  ``learned`` index parameters (`TrainState.index_params`: codebooks, the centroid of the
  row's list, the rotation), which replace the quantizer's own. ``codes`` (and IVF
  ``lists``) are the rows' codes as the index stores them; without them the rows are
  encoded anew.

  A `RaBitQ` quantizer gives FAISS's reconstruction ``R^T (c + dp o)`` of each row's code
  (``codes``: FAISS's code bytes); its inner-product estimate adds `pool_bias` to the
  scores against it.
  """
  if quantizer is None:
    return rows
  quantizer = with_index_params(quantizer, learned)
  frozen = jax.lax.stop_gradient(rows)
  if isinstance(quantizer, RaBitQ):
    return rows - frozen + rabitq.reconstruct(
        quantizer, *rabitq.codes_of(quantizer, frozen, codes, lists))
  if codes is None:
    return rows - frozen + quantize(quantizer, frozen)
  return rows - frozen + decode(quantizer, codes.astype(jnp.int32), lists)


def pool_bias(rows: jax.Array, quantizer: Quantizer | RaBitQ | None,
              learned: dict[str, jax.Array] | None,
              codes: jax.Array | None = None, lists: jax.Array | None = None
              ) -> jax.Array | None:
  """(P,) what the index's score adds to ``query . pool_targets`` for each row: RaBitQ's
  per-row constant (`rabitq.row_bias`, with its gradient to learned centroids), None for
  PQ, whose score is the inner product alone."""
  if not isinstance(quantizer, RaBitQ):
    return None
  quantizer = with_index_params(quantizer, learned)
  frozen = jax.lax.stop_gradient(rows)
  return rabitq.row_bias(quantizer, *rabitq.codes_of(quantizer, frozen, codes, lists))


def make_step_functions(apply_encoder: Callable[..., jax.Array], mode: Mode,
                        config: ml_collections.ConfigDict,
                        encoder_tx: optax.GradientTransformation,
                        row_tx: optax.GradientTransformation, row_schedule: Schedule,
                        index_tx: optax.GradientTransformation | None,
                        mesh: Mesh | None = None) -> StepFunctions:
  """Builds the jitted halves of a step.

  Args:
    apply_encoder: ``(params, input_ids, attention_mask, token_type_ids) -> (B, d)``.
    mode: what is trained.
    config: the full config (``loss``, ``negatives``, ``train``, ``table`` sections are
      read); the optional terms it turns on (``qdr_jax.experimental.loss_terms``) are
      added to the paper's loss.
    encoder_tx: encoder optimizer.
    row_tx: per-row update direction (vmapped over rows here).
    row_schedule: row learning rate by global step.
    index_tx: optimizer of ``state.index_params`` when ``mode.learns_index``.
    mesh: when given (and it has several devices), the gathered pool rows are split over
      its data axis, so each device decodes and scores its share of the pool rather than
      all of it; the pool size must then be a multiple of the device count.
  """
  split_pool = mesh is not None and mesh.devices.size > 1
  temperature = float(config.loss.temperature)
  multi_positive = config.loss.multi_positive
  rounding = optim.bf16_update(config.table)
  terms = loss_terms(config, mode)
  # The training queries come first; the pseudo-queries (negatives.pseudo_queries) follow
  # and reach the optional terms only.
  num_pseudo = int(config.negatives.pseudo_queries)
  grad_clip = float(config.optim.grad_clip)
  clip_all = grad_clip > 0 and config.optim.clip_scope == "all"

  def encode(params, tokens):
    return jax.vjp(lambda p: apply_encoder(p, **tokens), params)

  def update(state: TrainState, encoder_vjp, query_emb: jax.Array, pool: dict[str, jax.Array],
             quantizer: Quantizer | None, index_codes: dict[str, jax.Array] | None = None):
    """One update. ``index_codes`` ({"codes": (rows, M) uint8, "lists": (rows,)}) are the
    table's codes as the FAISS index stores them; None re-encodes the pool every step."""
    row_ids = pool["row_ids"]
    valid = pool["valid"]
    rows = state.table[row_ids].astype(jnp.float32)
    if split_pool and row_ids.shape[0] % mesh.devices.size == 0:
      rows = jax.lax.with_sharding_constraint(rows, NamedSharding(mesh, P(DATA_AXIS)))
    learned = state.index_params if mode.learns_index else None

    codes = lists = None
    if index_codes is not None:
      codes, lists = index_codes["codes"][row_ids], index_codes["lists"][row_ids]

    def loss_fn(q, rows, learned):
      # Straight-through targets: reconstructions forward, the rows' gradient unchanged,
      # and the learned index parameters' gradient through the reconstruction.
      targets = pool_targets(rows, quantizer if mode.quantize else None, learned, codes,
                             lists)
      # What the served score adds per row (RaBitQ's constant; None for PQ).
      bias = pool_bias(rows, quantizer if mode.quantize else None, learned, codes, lists)
      positive_mask, hidden_mask = pool["positive_mask"], pool["hidden_mask"]
      num_training = q.shape[0] - num_pseudo
      multiplicity = pool.get("multiplicity")  # a pool that keeps repeats
      loss, metrics = contrastive_loss(q[:num_training], targets, positive_mask[:num_training],
                                       hidden_mask[:num_training], valid,
                                       temperature=temperature, multi_positive=multi_positive,
                                       row_bias=bias, multiplicity=multiplicity)
      metrics["contrastive_loss"] = loss
      if terms:
        # The quantizer as trained so far (learned index parameters in place of the index's).
        current = None if quantizer is None else with_index_params(quantizer, learned)
        inputs = TermInputs(q, num_training, rows, targets, positive_mask, hidden_mask, valid,
                            current if mode.quantize else None, bias, multiplicity)
        for term in terms:
          if term.needs_quantizer and inputs.quantizer is None:
            continue
          value, part = term(inputs)
          metrics.update(part)
          loss = loss + term.weight * value
      metrics["loss"] = loss
      return loss, metrics

    (_, metrics), (g_query, g_rows, g_learned) = jax.value_and_grad(
        loss_fn, argnums=(0, 1, 2), has_aux=True)(query_emb, rows, learned)
    new = {}
    if clip_all:  # one global norm over every gradient the step applies
      g_params = encoder_vjp(g_query)[0] if mode.update_encoder else None
      g_params, g_rows, g_learned = _clip_jointly(mode, g_params, g_rows, g_learned,
                                                  grad_clip, metrics)
    if mode.update_encoder:
      if not clip_all:
        (g_params,) = encoder_vjp(g_query)
      updates, new["encoder_opt_state"] = encoder_tx.update(
          g_params, state.encoder_opt_state, state.params)
      new["params"] = optax.apply_updates(state.params, updates)
      metrics.setdefault("encoder_grad_norm", optax.tree.norm(g_params))
    if mode.update_rows:
      new["table"], new["row_opt_state"] = _update_rows(
          state, row_ids, valid, rows, g_rows, row_tx, row_schedule(state.step), rounding)
      metrics.setdefault("row_grad_norm", optax.tree.norm(g_rows))
      metrics["row_lr"] = row_schedule(state.step)
    if mode.learns_index:
      new["index_params"], new["index_opt_state"] = _update_index_params(
          state, g_learned, index_tx)
      metrics.setdefault("index_grad_norm", optax.tree.norm(g_learned))
    metrics["updates_finite"] = _written_finite(new, row_ids)
    return state.replace(step=state.step + 1, **new), metrics

  return StepFunctions(
      encode=distributed.CompileThenMeet(jax.jit(encode), "query forward"),
      update=distributed.CompileThenMeet(jax.jit(update, donate_argnums=(0,)), "update"))


def _clip_jointly(mode: Mode, g_params, g_rows, g_learned, grad_clip: float,
                  metrics: dict[str, jax.Array]):
  """The gradients the step applies (encoder, rows, index parameters, as ``mode``
  trains them) clipped by one global norm (``optim.clip_scope='all'``); their norms
  before the clip go into ``metrics``."""
  trained = {"encoder": g_params if mode.update_encoder else None,
             "row": g_rows if mode.update_rows else None,
             "index": g_learned if mode.learns_index else None}
  for name, grads in trained.items():
    if grads is not None:
      metrics[f"{name}_grad_norm"] = optax.tree.norm(grads)
  clipped = optim.clip_jointly(trained, grad_clip)[0]
  return (clipped["encoder"], g_rows if clipped["row"] is None else clipped["row"],
          g_learned if clipped["index"] is None else clipped["index"])


def _update_index_params(state: TrainState, grads: dict[str, jax.Array],
                         index_tx: optax.GradientTransformation):
  """One optimizer step on the learned index parameters; the rotation is projected back
  to orthonormal rows (FAISS's OPQ and `unrotate` both assume ``R R^T = I``)."""
  updates, opt_state = index_tx.update(grads, state.index_opt_state, state.index_params)
  params = optax.apply_updates(state.index_params, updates)
  if "rotation" in params:
    params = {**params, "rotation": orthogonalize(params["rotation"])}
  return params, opt_state


def _written_finite(new: dict[str, Any], row_ids: jax.Array) -> jax.Array:
  """Whether what this step wrote is finite: the encoder, the pooled rows and the learned
  index parameters. Finite gradients do not imply it: an infinite learning rate does not
  show in the loss before the next step. Computed
  here, on the values already in hand, rather than by a second pass over the state."""
  parts = [jnp.isfinite(x).all()
           for x in jax.tree.leaves((new.get("params"), new.get("index_params")))]
  if "table" in new:
    parts.append(jnp.isfinite(new["table"][row_ids].astype(jnp.float32)).all())
  return jnp.all(jnp.stack(parts)) if parts else jnp.array(True)


# Folded into the state's key (then the step) for stochastic rounding, so its bits are
# a stream apart from the host's per-step seeds (``fold_in(rng, step)`` in the loop).
_ROUNDING_STREAM = 0x5B16


def _scatter_rows(table: jax.Array, row_ids: jax.Array, rows: jax.Array) -> jax.Array:
  """``table.at[row_ids].set(rows)``; on CPU a bfloat16 table is written as uint16 bits.

  XLA:CPU has no bfloat16 scatter: it widens the whole operand to a float32 scratch of
  the table's shard. The same scatter on the bits is exact, takes one bfloat16-sized
  scratch instead (XLA:CPU copies in a bitcast-convert), and ran 2.7x faster at 200k
  rows. Accelerators scatter bfloat16 natively.
  """
  if table.dtype != jnp.bfloat16 or not platform.is_cpu():
    return table.at[row_ids].set(rows.astype(table.dtype))
  bits = lambda x: jax.lax.bitcast_convert_type(x, jnp.uint16)
  written = bits(table).at[row_ids].set(bits(rows.astype(jnp.bfloat16)))
  return jax.lax.bitcast_convert_type(written, jnp.bfloat16)


def _update_rows(state: TrainState, row_ids, valid, rows, g_rows, row_tx, lr,
                 rounding: str | None = None):
  """Applies the per-row optimizer to the pooled rows and scatters them back.

  Filler rows (``valid`` False) keep their value and state: only rows that took part in
  the loss move. ``rounding`` (`optim.bf16_update`) says how a bfloat16 table takes the
  float32 result: 'stochastic' rounds it with bits drawn from the state's key and step
  (reproducible, and a resumed run draws the same), 'master' steps the float32 copies in
  the row state (`optim.MasterRows`) and writes them rounded to nearest; None casts.
  """
  master = rounding == "master"
  opt_state = state.row_opt_state.opt if master else state.row_opt_state
  # The loss saw the stored (rounded) rows; with master copies the step applies to those.
  params = state.row_opt_state.master[row_ids] if master else rows
  gathered = jax.tree.map(lambda s: s[row_ids], opt_state)
  direction, new_state = jax.vmap(row_tx.update)(g_rows, gathered, params)
  new_rows = params - lr * direction
  keep = valid[:, None]
  new_rows = jnp.where(keep, new_rows, params)
  new_state = jax.tree.map(
      lambda n, o: jnp.where(valid.reshape((-1,) + (1,) * (n.ndim - 1)), n, o),
      new_state, gathered)
  if rounding == "stochastic":
    key = jax.random.fold_in(jax.random.fold_in(state.rng, _ROUNDING_STREAM), state.step)
    stored = optim.stochastic_round_bf16(new_rows, key)
  else:
    stored = new_rows.astype(state.table.dtype)
  table = _scatter_rows(state.table, row_ids, stored)
  row_opt_state = jax.tree.map(lambda s, n: s.at[row_ids].set(n), opt_state, new_state)
  if master:
    row_opt_state = optim.MasterRows(
        opt=row_opt_state, master=state.row_opt_state.master.at[row_ids].set(new_rows))
  return table, row_opt_state
