"""The CPU-friendly row reductions give jnp's max / argmin / argmax, ties included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdr_jax import reductions


def test_row_max_equals_max_on_masked_scores():
  # The attention's softmax shift: the where-reducer must give jnp.max's values on
  # ordinary and mask-biased rows (a fully masked padding row included), with a
  # keepdims axis, so the softmax is unchanged bit for bit.
  rng = np.random.default_rng(0)
  scores = rng.standard_normal((2, 3, 5, 7)).astype(np.float32) * 10
  scores[0, :, :, 4:] += np.finfo(np.float32).min
  scores[1, 0, 2, :] += np.finfo(np.float32).min
  got = np.asarray(jax.jit(reductions.row_max)(jnp.asarray(scores)))
  np.testing.assert_array_equal(got, scores.max(axis=-1, keepdims=True))


@pytest.mark.parametrize("name, reference", [("row_argmin", np.argmin),
                                             ("row_argmax", np.argmax)])
def test_row_arg_extreme_matches_numpy_with_ties_and_infinities(name, reference):
  # Integer-valued entries make ties common: the first index of the extreme must win,
  # as numpy, jnp and FAISS's nearest-codeword search pick it.
  rng = np.random.default_rng(1)
  x = rng.integers(0, 4, size=(3, 50, 17)).astype(np.float32)
  x[0, 0] = np.inf
  x[0, 1] = -np.inf
  x[0, 2, 5] = np.inf
  x[0, 2, 9] = -np.inf
  got = np.asarray(jax.jit(getattr(reductions, name))(jnp.asarray(x)))
  assert got.dtype == np.int32 and got.shape == (3, 50)
  np.testing.assert_array_equal(got, reference(x, axis=-1))


@pytest.mark.parametrize("smallest", [True, False])
def test_nan_row_gets_a_valid_index(smallest):
  # A row of NaNs has no entry equal to its extreme; the index must still be usable
  # in a gather (the training step checks rows for finiteness separately).
  x = np.zeros((2, 6), np.float32)
  x[1] = np.nan
  got = np.asarray(jax.jit(reductions._first_index_of_extreme, static_argnums=1)(  # pylint: disable=protected-access
      jnp.asarray(x), smallest))
  assert got[0] == 0 and 0 <= got[1] < 6
