"""Row reductions in forms XLA:CPU vectorises: a max without NaN semantics, argmin/argmax.

XLA:CPU lowers `jnp.max` with NaN-propagating semantics and `jnp.argmin`/`jnp.argmax` as
one variadic (value, index) reduce; its vectoriser handles neither well. The forms here
are plain single-operand reduces. Measured on this project's shapes on a 2-core CPU
(docs/cpu-performance.md): the attention softmax shift over (32, 12, 256, 256) scores 12.0 -> 5.0
ms; the nearest PQ codeword of 5,183 rows (48 x (5,183, 256) distances) 158 -> 35 ms.
Accelerators keep jnp's own argmin/argmax, one pass over the data.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qdr_jax import platform


def _extreme(x: jax.Array, smallest: bool) -> jax.Array:
  """Min (or max) over the last axis as a `where` reducer, without NaN propagation."""
  pick = (lambda a, b: jnp.where(a < b, a, b)) if smallest else (
      lambda a, b: jnp.where(a > b, a, b))
  start = jnp.array(jnp.inf if smallest else -jnp.inf, x.dtype)
  return jax.lax.reduce(x, start, pick, (x.ndim - 1,))


def row_max(x: jax.Array) -> jax.Array:
  """Max over the last axis, kept as a size-1 axis, without NaN propagation.

  For a softmax shift, which needs no NaN semantics: a NaN score makes its exp NaN
  either way.
  """
  return _extreme(x, smallest=False)[..., None]


def _first_index_of_extreme(x: jax.Array, smallest: bool) -> jax.Array:
  """First index of the last axis' min (or max), as jnp.argmin/argmax pick ties.

  Two plain reductions: the extreme value, then the smallest index holding it. A row
  with no index equal to its extreme (a NaN row) gets the last index, a valid one.
  """
  extreme = _extreme(x, smallest)
  size = x.shape[-1]
  index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  first = jax.lax.reduce(jnp.where(x == extreme[..., None], index, size), jnp.int32(size),
                         jax.lax.min, (x.ndim - 1,))
  return jnp.minimum(first, size - 1)


def row_argmin(x: jax.Array) -> jax.Array:
  """int32 index of the smallest entry of the last axis (the first one on ties)."""
  if not platform.is_cpu():
    return jnp.argmin(x, axis=-1).astype(jnp.int32)
  return _first_index_of_extreme(x, smallest=True)


def row_argmax(x: jax.Array) -> jax.Array:
  """int32 index of the largest entry of the last axis (the first one on ties)."""
  if not platform.is_cpu():
    return jnp.argmax(x, axis=-1).astype(jnp.int32)
  return _first_index_of_extreme(x, smallest=False)
