"""Optimizers and learning-rate schedules for the encoder, the table rows and the codebooks.

The table rows use a per-row optimizer: an optax transform is ``vmap``-ed over rows, so
each passage keeps its own moments and step count (in the table's shape) and only the
rows of a step's pool are read and written. The learning rate is applied outside the
vmapped transform so it follows the global step, not the row's own update count.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

Schedule = Callable[[jax.Array], jax.Array]


def make_schedule(peak: float, cfg: ml_collections.ConfigDict, total_steps: int) -> Schedule:
  """Linear warmup to ``peak`` then ``cfg.schedule`` ('cosine', 'linear' or 'constant')."""
  warmup = int(cfg.warmup_steps)
  decay_steps = max(total_steps, warmup + 1)
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


def make_encoder_optimizer(cfg: ml_collections.ConfigDict, total_steps: int
                           ) -> tuple[optax.GradientTransformation, Schedule]:
  schedule = make_schedule(cfg.encoder_lr, cfg, total_steps)
  parts = []
  if cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay))
  return optax.chain(*parts), schedule


def make_row_transform(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Direction of a row update (learning rate applied by the caller); state per row."""
  if cfg.row_optimizer == "adam":
    return optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  if cfg.row_optimizer == "sgd":
    return optax.identity()
  raise ValueError(f"config.optim.row_optimizer must be adam or sgd; got {cfg.row_optimizer!r}")


def init_row_state(row_tx: optax.GradientTransformation, table: jax.Array):
  """Per-row optimizer state: every leaf has the table's number of rows first."""
  return jax.vmap(row_tx.init)(table.astype(jnp.float32))


def make_codebook_optimizer(cfg: ml_collections.ConfigDict, total_steps: int
                            ) -> tuple[optax.GradientTransformation, Schedule]:
  schedule = make_schedule(cfg.codebook_lr, cfg, total_steps)
  return optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps), schedule
