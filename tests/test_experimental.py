"""The optional loss terms (qdr_jax.experimental): label-free distillation of the flat
ranking into the quantized one, the codeword/list balance penalty, pseudo-queries from the
corpus and their own contrastive term, and a tiny run with the terms on."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from qdr_jax.data.pseudo import first_sentence, pseudo_query_texts
from qdr_jax.data.types import Corpus
from qdr_jax.negatives.pool import build_pool
from qdr_jax.experimental import balance_penalty, distillation_loss, kl_divergence
from qdr_jax.quant import Quantizer, encode_with_lists
from qdr_jax.negatives.source import pseudo_query_rows
from qdr_jax.train.step import pool_targets
from test_train_families import inputs  # noqa: F401  (the tiny run's data, table, encoder)


def _softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def reference_distill(q_student, q_teacher, rows, targets, active, temperature):
  """Float64, query by query: mean of KL(softmax(q_t.rows) || softmax(q_s.targets))."""
  out = []
  for b in range(q_student.shape[0]):
    keep = active[b]
    if not keep.any():
      continue
    p = _softmax(rows[keep] @ q_teacher[b] / temperature)
    s = _softmax(targets[keep] @ q_student[b] / temperature)
    out.append(float(np.sum(p * (np.log(p) - np.log(s)))))
  return float(np.mean(out))


def _case(seed=0, batch=3, pool=6, dim=4):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(batch, dim))
  rows = rng.normal(size=(pool, dim))
  targets = rows + 0.3 * rng.normal(size=(pool, dim))
  active = np.ones((batch, pool), bool)
  active[0, 2] = False
  active[:, 5] = False  # an invalid row
  return q, rows, targets, active


def test_distillation_matches_reference_and_is_zero_when_quantized_equals_flat():
  q, rows, targets, active = _case()
  loss, metrics = distillation_loss(jnp.asarray(q, jnp.float32), jnp.asarray(rows, jnp.float32),
                                    jnp.asarray(targets, jnp.float32), active, temperature=0.5)
  np.testing.assert_allclose(float(loss), reference_distill(q, q, rows, targets, active, 0.5),
                             rtol=1e-5)
  assert float(loss) > 0 and 0 <= float(metrics["distill_top1_agreement"]) <= 1
  same = jnp.asarray(rows, jnp.float32)
  value, grads = jax.value_and_grad(
      lambda a, t: distillation_loss(a, same, t, active, temperature=0.5)[0], argnums=(0, 1))(
          jnp.asarray(q, jnp.float32), same)
  assert float(value) == 0.0
  assert all(float(jnp.abs(g).max()) < 1e-6 for g in grads)  # p_s - p_t, up to rounding


def test_distillation_gradient_matches_finite_differences():
  """The gradient is the student's: finite differences of the loss with the teacher held
  at the current query, for the query and the reconstructions; the rows (teacher side
  only, here) get none."""
  q, rows, targets, active = _case(seed=1)
  with jax.enable_x64(True):
    grad_q, grad_rows, grad_t = jax.grad(
        lambda a, r, t: distillation_loss(a, r, t, active, temperature=0.5)[0],
        argnums=(0, 1, 2))(jnp.asarray(q), jnp.asarray(rows), jnp.asarray(targets))
  assert grad_q.dtype == jnp.float64
  eps = 1e-6
  for array, grad, which in ((q, grad_q, "q"), (targets, grad_t, "t")):
    fd = np.zeros_like(array)
    for idx in np.ndindex(array.shape):
      plus, minus = array.copy(), array.copy()
      plus[idx] += eps
      minus[idx] -= eps
      if which == "q":
        f = lambda x: reference_distill(x, q, rows, targets, active, 0.5)
      else:
        f = lambda x: reference_distill(q, q, rows, x, active, 0.5)
      fd[idx] = (f(plus) - f(minus)) / (2 * eps)
    np.testing.assert_allclose(np.asarray(grad), fd, atol=1e-8)
  assert np.abs(np.asarray(grad_rows)).max() == 0.0
  assert np.all(np.asarray(grad_t)[5] == 0)  # inactive for every query


def test_kl_divergence_gradient_both_sides():
  rng = np.random.default_rng(2)
  mask = np.ones((2, 5), bool)
  mask[1, :2] = False
  with jax.enable_x64(True):
    t, s = jnp.asarray(rng.normal(size=(2, 5))), jnp.asarray(rng.normal(size=(2, 5)))
    check_grads(lambda a, b: kl_divergence(a, b, mask).sum(), (t, s), order=1,
                modes=("rev",), eps=1e-6, atol=1e-7, rtol=1e-7)
    assert float(kl_divergence(t, t, mask).max()) < 1e-15


def _quantizer(rng, with_ivf=True, m=2, k=4, dsub=2, nlist=3):
  return Quantizer(codebooks=jnp.asarray(rng.normal(size=(m, k, dsub))),
                   coarse_centroids=jnp.asarray(rng.normal(size=(nlist, m * dsub)))
                   if with_ivf else None, by_residual=with_ivf)


def test_balance_penalty_zero_for_uniform_usage_and_positive_otherwise():
  # Two codewords per sub-codebook at +-1; rows in +- pairs use both exactly equally.
  codebooks = jnp.asarray([[[1.0], [-1.0]], [[1.0], [-1.0]]])
  quantizer = Quantizer(codebooks=codebooks)
  rows = jnp.asarray([[0.3, 0.9], [-0.3, -0.9], [0.5, -0.2], [-0.5, 0.2]])
  valid = np.ones(4, bool)
  penalty, _ = balance_penalty(quantizer, rows, valid, temperature=0.25)
  assert abs(float(penalty)) < 1e-6
  # Drop the mirror rows (masked out): usage leans to one codeword.
  penalty, metrics = balance_penalty(quantizer, rows, np.array([1, 0, 1, 0], bool),
                                     temperature=0.25)
  assert float(penalty) > 0.1 and "balance_ivf" not in metrics
  # IVF lists: two centroids at +-(1, 1); the +- pairs use them equally too.
  ivf = Quantizer(codebooks=codebooks, coarse_centroids=jnp.asarray([[1.0, 1.0], [-1.0, -1.0]]),
                  by_residual=False)
  penalty, metrics = balance_penalty(ivf, rows, valid, temperature=0.25)
  assert abs(float(metrics["balance_ivf"])) < 1e-6 and abs(float(penalty)) < 1e-6
  penalty, metrics = balance_penalty(ivf, rows + jnp.asarray([2.0, 2.0]), valid,
                                     temperature=0.25)
  assert float(metrics["balance_ivf"]) > 0.1


@pytest.mark.parametrize("with_ivf", [False, True])
def test_balance_penalty_gradient_matches_finite_differences(with_ivf):
  rng = np.random.default_rng(3)
  valid = np.array([1, 1, 1, 1, 1, 0], bool)
  with jax.enable_x64(True):
    quantizer = _quantizer(rng, with_ivf)
    rows = jnp.asarray(rng.normal(size=(6, 4)))
    # Hard IVF lists of the residual are constant for small steps: keep rows off ties.
    f = lambda r, q: balance_penalty(q, r, valid, temperature=0.5)[0]
    check_grads(f, (rows, quantizer), order=1, modes=("rev",), eps=1e-6, atol=1e-6, rtol=1e-6)
    grad_rows = jax.grad(f)(rows, quantizer)
  grad_rows = np.abs(np.asarray(grad_rows))
  assert grad_rows[:5].max() > 0 and grad_rows[5].max() == 0  # the invalid row gets none


def test_balance_penalty_on_strided_rows():
  rng = np.random.default_rng(5)
  quantizer = jax.tree.map(lambda x: x.astype(jnp.float32), _quantizer(rng))
  rows = jnp.asarray(rng.normal(size=(10, 4)), jnp.float32)
  valid = np.ones(10, bool)
  capped, _ = balance_penalty(quantizer, rows, valid, temperature=0.5, max_rows=4)
  strided, _ = balance_penalty(quantizer, rows[::3], valid[::3], temperature=0.5)
  full, _ = balance_penalty(quantizer, rows, valid, temperature=0.5, max_rows=10)
  assert float(capped) == float(strided) and float(full) != float(capped)


def test_pseudo_query_rows_reproducible_from_seed_and_step():
  a = pseudo_query_rows(7, 1000, 16, seed=3)
  np.testing.assert_array_equal(a, pseudo_query_rows(7, 1000, 16, seed=3))
  assert np.unique(a).size == 16 and a.min() >= 0 and a.max() < 1000
  assert not np.array_equal(a, pseudo_query_rows(8, 1000, 16, seed=3))
  assert not np.array_equal(a, pseudo_query_rows(7, 1000, 16, seed=4))
  with pytest.raises(ValueError, match="pseudo_queries=5"):
    pseudo_query_rows(0, 4, 5, seed=0)


def test_pseudo_query_texts_title_or_first_sentence():
  corpus = Corpus.from_lists(["a", "b"], ["Aspirin and stroke", ""],
                             ["Aspirin lowers risk. It is cheap.", "No title here!  Second."])
  assert pseudo_query_texts(corpus, [0, 1], "title") == ["Aspirin and stroke", "No title here!"]
  assert pseudo_query_texts(corpus, [1, 0], "first_sentence") == [
      "No title here!", "Aspirin lowers risk."]
  assert first_sentence("  no end  ") == "no end"
  with pytest.raises(ValueError, match="pseudo-query field"):
    pseudo_query_texts(corpus, [0], "text")


def test_pool_with_unlabelled_queries():
  candidates = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 1]])  # the last query is unlabelled
  pool = build_pool(candidates, [np.array([1]), np.array([4]), np.zeros(0, np.int64)],
                    pool_size=10, num_rows=20, max_positives=2,
                    rng=np.random.default_rng(0), hidden=[[], [], [8]], unlabelled=1)
  assert pool.positive_mask.shape == (3, 10) and not pool.positive_mask[2].any()
  assert set(pool.row_ids[:8].tolist()) == set(range(1, 9))
  assert pool.hidden_mask[2, pool.row_ids.tolist().index(8)]
  assert pool.hidden_mask.sum() == 1
  with pytest.raises(ValueError, match="no positive"):
    build_pool(candidates, [np.array([1]), np.zeros(0, np.int64), np.zeros(0, np.int64)],
               pool_size=10, num_rows=20, max_positives=2, rng=np.random.default_rng(0),
               unlabelled=1)


@pytest.mark.parametrize("source", ["positive", "hide", "candidate"])
def test_pseudo_query_source_labels_hides_or_leaves_the_passage(source):
  from qdr_jax.negatives.source import pseudo_query_labels
  candidates = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])  # the last query is a pseudo-query
  positives, hidden, unlabelled = pseudo_query_labels(
      [np.array([1]), np.array([4, 5])], np.array([8]), source)
  pool = build_pool(candidates, positives, pool_size=12, num_rows=20, max_positives=2,
                    rng=np.random.default_rng(0), hidden=hidden, unlabelled=unlabelled)
  column = pool.row_ids.tolist().index(8)
  assert pool.positive_mask[2, column] == (source == "positive")
  assert pool.positive_mask[2].sum() == (source == "positive")
  assert pool.hidden_mask[2, column] == (source == "hide")
  assert pool.positive_mask[:2].sum() == 3 and not pool.hidden_mask[:2].any()
  assert not pool.positive_mask[:2, column].any()  # the training queries still see a negative
  with pytest.raises(ValueError, match="pseudo_query_source"):
    pseudo_query_labels([np.array([1])], np.array([8]), "label")


def test_recomputed_codes_follow_the_rows():
  """'recompute' decodes the rows' current codes: a moved row's reconstruction moves."""
  rng = np.random.default_rng(4)
  quantizer = _quantizer(rng)
  rows = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
  quantizer = jax.tree.map(lambda x: x.astype(jnp.float32), quantizer)
  codes, lists = encode_with_lists(quantizer, rows)
  moved = rows.at[0].set(-rows[0])
  live = pool_targets(moved, quantizer, None)
  stale = pool_targets(moved, quantizer, None, codes, lists)
  np.testing.assert_array_equal(np.asarray(live[1:]), np.asarray(stale[1:]))
  assert not np.array_equal(np.asarray(live[0]), np.asarray(stale[0]))


def test_tiny_run_with_distillation_pseudo_queries_and_balance(inputs, tmp_path):
  from qdr_jax.train.loop import train
  from qdr_jax.train.modes import mode_from_config
  base, dataset, encoders, table0 = inputs
  config = base.copy_and_resolve_references()
  config.train.steps = 6
  config.index.rebuild_every = 3
  config.negatives.pseudo_queries = 8
  config.loss.distill_weight = 1.0
  config.loss.balance_weight = 0.1
  config.quant.learn = ("codebooks",)
  config.lock()
  assert config.quant.codes == "recompute"  # the live forward is the default
  result = train(config, mode_from_config(config), dataset, encoders, table0, tmp_path)
  assert result.step == 6
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert len(records) == 6
  for r in records:
    assert r["distill_loss"] > 0 and r["balance_loss"] > 0 and "pseudo_loss" not in r
    expected = r["contrastive_loss"] + r["distill_loss"] + 0.1 * r["balance_loss"]
    np.testing.assert_allclose(r["loss"], expected, rtol=1e-5)
  table = result.lifecycle.table_to_lead(result.state.table)
  assert (np.abs(table - table0).max(axis=1) > 0).sum() > 50


def test_loss_terms_follow_the_config_and_the_mode():
  from qdr_jax.config import base_config
  from qdr_jax.experimental import (Balance, Distillation, LabelledPseudoQueries,
                                    loss_terms)
  from qdr_jax.train.modes import MODES
  config = base_config()
  assert loss_terms(config, MODES["dback"]) == []  # the paper's loss
  config.loss.distill_weight = 0.5
  config.loss.balance_weight = 2.0
  config.negatives.pseudo_queries = 4
  terms = loss_terms(config, MODES["dback"])
  assert [type(t) for t in terms] == [Distillation, Balance]
  assert [t.weight for t in terms] == [0.5, 2.0]
  config.negatives.pseudo_query_source = "positive"
  assert [type(t) for t in loss_terms(config, MODES["query_only"])] == [LabelledPseudoQueries]


def test_validation_of_the_experimental_settings():
  from qdr_jax.config import base_config
  from qdr_jax.validation import ConfigError, validate_config
  config = base_config()
  config.negatives.pseudo_query_source = "label"
  config.loss.distill_weight = -1.0
  config.loss.balance_weight = float("nan")
  with pytest.raises(ConfigError) as e:
    validate_config(config)
  text = str(e.value)
  assert "pseudo_query_source='label'" in text and "loss.distill_weight=-1.0" in text
  assert "loss.balance_weight=nan" in text
  config = base_config()
  config.train.mode = "query_only"
  config.loss.distill_weight = 1.0
  config.loss.balance_weight = 0.5
  config.negatives.pseudo_queries = 4
  warnings = validate_config(config)
  assert any("distill_weight=1.0: ignored" in w for w in warnings)
  assert any("balance_weight=0.5: ignored" in w for w in warnings)
  assert any("pseudo_queries=4 without the distillation term" in w for w in warnings)
  config.negatives.pseudo_query_source = "positive"  # then they train a contrastive term
  assert not any("pseudo_queries" in w for w in validate_config(config))
