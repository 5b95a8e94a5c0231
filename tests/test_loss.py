"""The pool contrastive loss against a direct float64 reference and finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdr_jax.train.loss import contrastive_loss


def reference_loss(q, t, pos, hidden, valid, temperature, multi_positive):
  """Loop-by-loop float64 reference, written independently of the vectorised loss."""
  q, t = np.asarray(q, np.float64), np.asarray(t, np.float64)
  losses = []
  for b in range(q.shape[0]):
    s = t @ q[b] / temperature
    active = valid & ~hidden[b]
    positives = [p for p in range(t.shape[0]) if pos[b, p] and active[p]]
    negatives = [p for p in range(t.shape[0]) if active[p] and not pos[b, p]]
    if not positives:
      continue
    neg = s[negatives]
    if multi_positive == "mean":
      per = [-s[p] + np.log(np.exp(s[p]) + np.exp(neg).sum()) for p in positives]
      losses.append(np.mean(per))
    else:
      ps = s[positives]
      losses.append(-np.log(np.exp(ps).sum() / (np.exp(ps).sum() + np.exp(neg).sum())))
  return float(np.mean(losses))


def _case(seed=0, batch=3, pool=7, dim=5):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(batch, dim))
  t = rng.normal(size=(pool, dim))
  pos = np.zeros((batch, pool), bool)
  pos[0, 0] = True
  pos[1, [1, 2]] = True
  pos[2, 3] = True
  hidden = np.zeros((batch, pool), bool)
  hidden[0, 4] = True
  valid = np.ones(pool, bool)
  valid[6] = False
  return q, t, pos, hidden, valid


@pytest.mark.parametrize("multi_positive", ["mean", "marginal"])
def test_loss_matches_reference(multi_positive):
  q, t, pos, hidden, valid = _case()
  loss, metrics = contrastive_loss(jnp.asarray(q, jnp.float32), jnp.asarray(t, jnp.float32),
                                   pos, hidden, valid, temperature=0.5,
                                   multi_positive=multi_positive)
  expected = reference_loss(q, t, pos, hidden, valid, 0.5, multi_positive)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  assert 0.0 <= float(metrics["pool_accuracy"]) <= 1.0


@pytest.mark.parametrize("multi_positive", ["mean", "marginal"])
def test_loss_gradient_matches_finite_differences(multi_positive):
  q, t, pos, hidden, valid = _case(seed=1)
  grad_q, grad_t = jax.grad(
      lambda a, b: contrastive_loss(a, b, pos, hidden, valid, temperature=0.5,
                                    multi_positive=multi_positive)[0], argnums=(0, 1))(
          jnp.asarray(q, jnp.float32), jnp.asarray(t, jnp.float32))
  eps = 1e-5
  for array, grad, which in ((q, grad_q, 0), (t, grad_t, 1)):
    fd = np.zeros_like(array)
    for idx in np.ndindex(array.shape):
      plus, minus = array.copy(), array.copy()
      plus[idx] += eps
      minus[idx] -= eps
      args_p = (plus, t) if which == 0 else (q, plus)
      args_m = (minus, t) if which == 0 else (q, minus)
      fd[idx] = (reference_loss(*args_p, pos, hidden, valid, 0.5, multi_positive)
                 - reference_loss(*args_m, pos, hidden, valid, 0.5, multi_positive)) / (2 * eps)
    np.testing.assert_allclose(np.asarray(grad), fd, atol=2e-5)
  # Masked rows (hidden from every query that could see them, or invalid) get no gradient.
  assert np.all(np.asarray(grad_t)[6] == 0)


def test_in_pool_accuracy_known():
  q = jnp.eye(2, dtype=jnp.float32)
  t = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
  pos = np.array([[True, False, False], [False, True, False]])
  none = np.zeros_like(pos)
  _, m = contrastive_loss(q, t, pos, none, np.ones(3, bool), temperature=1.0)
  assert float(m["pool_accuracy"]) == 0.5  # query 1 prefers row 2 (a negative)
  hidden = np.array([[False, False, False], [False, False, True]])
  _, m = contrastive_loss(q, t, pos, hidden, np.ones(3, bool), temperature=1.0)
  assert float(m["pool_accuracy"]) == 1.0
