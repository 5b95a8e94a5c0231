"""Optimizers and learning-rate schedules for the encoder, the table rows and the index
parameters (PQ codebooks, IVF centroids, OPQ rotation).

The table rows use a per-row optimizer: an optax transform is ``vmap``-ed over rows, so
each passage keeps its own moments and step count (in the table's shape) and only the
rows of a step's pool are read and written. The learning rate is applied outside the
vmapped transform so it follows the global step, not the row's own update count.

A bfloat16 table cannot take a small step by plain rounding (at |x| ~ 0.05 its spacing is
about 2.4e-4, so an update of 1e-4 rounds back to the old value): its rows are either
rounded stochastically (`stochastic_round_bf16`) or kept in float32 master copies
(`MasterRows`) from which the table is written.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

Schedule = Callable[[jax.Array], jax.Array]


def make_schedule(peak: float, cfg: ml_collections.ConfigDict, total_steps: int) -> Schedule:
  """Linear warmup to ``peak`` then ``cfg.schedule`` ('cosine', 'linear' or 'constant').

  The decay reaches ``peak * cfg.end_lr_fraction`` at step ``cfg.decay_steps`` (0: at
  ``total_steps``) and holds there: a horizon past the run's end leaves the run on the
  upper part of the curve, as the reference recipe's 60,000-iteration decay does.
  """
  warmup = int(cfg.warmup_steps)
  decay_steps = max(int(cfg.decay_steps) or total_steps, warmup + 1)
  end = peak * cfg.end_lr_fraction
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, decay_steps, end)
  if cfg.schedule == "linear":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup),
         optax.linear_schedule(peak, end, decay_steps - warmup)], [warmup])
  if cfg.schedule == "constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup])
  raise ValueError(f"config.optim.schedule must be cosine, linear or constant; got {cfg.schedule!r}")


def make_row_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> Schedule:
  """The rows' learning rate: ``cfg.row_lr`` on the encoder's warmup and decay
  (``row_schedule='shared'``) or at every step from the first (``'constant'``)."""
  if cfg.row_schedule == "constant":
    return optax.constant_schedule(cfg.row_lr)
  if cfg.row_schedule == "shared":
    return make_schedule(cfg.row_lr, cfg, total_steps)
  raise ValueError(f"config.optim.row_schedule must be shared or constant; got "
                   f"{cfg.row_schedule!r}")


def make_encoder_optimizer(cfg: ml_collections.ConfigDict, total_steps: int
                           ) -> tuple[optax.GradientTransformation, Schedule]:
  """AdamW on the encoder; it clips the encoder's gradient itself only with
  ``clip_scope='encoder'`` (with 'all' the step clips every gradient together,
  `clip_jointly`)."""
  schedule = make_schedule(cfg.encoder_lr, cfg, total_steps)
  parts = []
  if cfg.grad_clip > 0 and cfg.clip_scope == "encoder":
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  parts.append(optax.adamw(schedule, b2=cfg.b2, weight_decay=cfg.weight_decay))
  return optax.chain(*parts), schedule


def clip_jointly(grads: Any, max_norm: float) -> tuple[Any, jax.Array]:
  """``grads`` (any pytree: the encoder's, the pooled rows' and the index parameters'
  gradients together) scaled by ``min(1, max_norm / global norm)``, as one
  ``clip_grad_norm_`` over every trained tensor; returns (clipped, norm before)."""
  norm = optax.tree.norm(grads)
  scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30))
  return jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads), norm


def make_row_transform(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Direction of a row update (learning rate applied by the caller); state per row."""
  if cfg.row_optimizer == "adam":
    return optax.scale_by_adam(b2=cfg.b2)
  if cfg.row_optimizer == "sgd":
    return optax.identity()
  raise ValueError(f"config.optim.row_optimizer must be adam or sgd; got {cfg.row_optimizer!r}")


BF16_UPDATES = ("stochastic", "master")


class MasterRows(NamedTuple):
  """Row state of a bfloat16 table updated from float32 master copies.

  Attributes:
    opt: the per-row optimizer state, as without master copies.
    master: (rows, d) float32 rows; the table holds them rounded to bfloat16.
  """
  opt: Any
  master: jax.Array


def bf16_update(table_cfg: ml_collections.ConfigDict) -> str | None:
  """How updated rows reach the table: None (plain cast, a float32 table), 'stochastic'
  or 'master' (a bfloat16 table, ``table.bf16_update``)."""
  if jnp.dtype(table_cfg.dtype) != jnp.bfloat16:
    return None
  if table_cfg.bf16_update not in BF16_UPDATES:
    raise ValueError(f"config.table.bf16_update must be one of {BF16_UPDATES}; got "
                     f"{table_cfg.bf16_update!r}")
  return table_cfg.bf16_update


def init_row_state(row_tx: optax.GradientTransformation, table: jax.Array,
                   master: bool = False):
  """Per-row optimizer state: every leaf has the table's number of rows first.

  With ``master`` it is a `MasterRows` holding float32 copies of the rows as well.
  """
  rows = table.astype(jnp.float32)
  opt = jax.vmap(row_tx.init)(rows)
  return MasterRows(opt=opt, master=rows) if master else opt


def stochastic_round_bf16(x: jax.Array, key: jax.Array) -> jax.Array:
  """float32 ``x`` rounded to bfloat16 up or down at random, so that E[round(x)] = x.

  bfloat16 is float32's upper 16 bits: adding 16 uniform random bits to the lower half
  and truncating rounds up with probability (distance to the lower neighbour) / spacing.
  The bits depend only on ``key`` and the shape (JAX's partitionable threefry), so any
  sharding of ``x`` rounds alike. Values already in bfloat16 come back unchanged;
  non-finite values are cast plainly (the carry would corrupt a NaN's payload).
  """
  x = x.astype(jnp.float32)
  noise = jax.random.bits(key, x.shape, jnp.uint32) >> 16
  bits = (jax.lax.bitcast_convert_type(x, jnp.uint32) + noise) & jnp.uint32(0xFFFF0000)
  rounded = jax.lax.bitcast_convert_type(bits, jnp.float32)
  return jnp.where(jnp.isfinite(x), rounded, x).astype(jnp.bfloat16)


# The learning-rate key of each learnable index parameter (`qdr_jax.quant.INDEX_PARAMS`).
INDEX_LR_KEYS = {"codebooks": "codebook_lr", "centroids": "centroid_lr",
                 "rotation": "rotation_lr"}


def make_index_optimizer(cfg: ml_collections.ConfigDict, total_steps: int,
                         learn: tuple[str, ...]
                         ) -> tuple[optax.GradientTransformation, dict[str, Schedule]]:
  """Adam over the index-parameter dict (``TrainState.index_params``), one learning rate
  (and schedule) per parameter from ``cfg``'s `INDEX_LR_KEYS`; returns (tx, schedules)."""
  schedules = {name: make_schedule(cfg[INDEX_LR_KEYS[name]], cfg, total_steps)
               for name in learn}
  transforms = {name: optax.adam(schedules[name]) for name in learn}
  return optax.multi_transform(transforms, lambda params: {k: k for k in params}), schedules
