"""The paper configs hold the reference recipe's values (GitHub cgmta/dback, cited by file
and line as in docs/paper-recipe.md), and the options that express its behaviour do what
they say: the decay horizon, the constant row rate, one clip over every gradient, the pool
that keeps repeats, the first positive only, the rows-only mode."""

import importlib
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qdr_jax.config import base_config
from qdr_jax.data.types import Corpus, Queries, Split
from qdr_jax.negatives.pool import build_pool
from qdr_jax.train import optim
from qdr_jax.train.loss import contrastive_loss
from qdr_jax.negatives.source import training_queries
from qdr_jax.validation import ConfigError, validate_config
from test_configs import _flatten

# What the three reference configs share (conf/train_{nq,trivia,ms}.yaml, train*.py,
# model/*.py): key -> value.
SHARED = {
    "train.batch_size": 32,                    # train_nq.yaml:21 batch_size
    "negatives.k": 510,                        # retriever.py:92 search(n_docs + 10)
    "negatives.pool_size": 16_000,             # retriever.py:103-107 B * n_docs (yaml:22)
    "negatives.dedup": False,                  # retriever.py:93,108-109 repeats sampled
    "negatives.max_positives": 1,              # data_utils.py:18 p[0]
    "negatives.hide_answer_matches": False,    # retriever.py:100 only positives removed
    "index.factory": "IVF4096_HNSW128,PQ128x8",  # retriever.py:70,74
    "index.nprobe": 128,                       # retriever.py:75
    "index.ef_search": 128,                    # retriever.py:72
    "index.train_size": 262_144,               # retriever.py:78-79
    "index.full_rebuild_every": 0,             # retriever.py:68-84 rebuilt from scratch
    "optim.schedule": "cosine",                # train.py:41-45
    "optim.warmup_steps": 20,                  # train_nq.yaml:37
    "optim.end_lr_fraction": 0.5,              # train_nq.yaml:28-29 min_lr / lr
    "optim.decay_steps": 60_000,               # train_nq.yaml:38 lr_decay_iters
    "optim.row_lr": 1e-6,                      # train_nq.yaml:30 ctx_lr
    "optim.row_schedule": "constant",          # train.py:304 only param_groups[-2:]
    "optim.row_optimizer": "adam",             # model.py:109,119 AdamW group
    "optim.weight_decay": 0.0,                 # train_nq.yaml:33
    "optim.b2": 0.95,                          # train_nq.yaml:35
    "optim.grad_clip": 1.0,                    # train_nq.yaml:36
    "optim.clip_scope": "all",                 # train.py:320 model.parameters()
    "model.max_query_length": 256,             # data_utils.py:15, model.py:46
    "model.max_passage_length": 256,           # context_embed_utils.py:40
    "table.dtype": "float32",                  # retriever.py:21 np.load float32
    # Not the reference's (throughput and the evaluation's one k-means draw).
    "model.embed_batch_size": 256,
    "eval.index_seeds": (0,),
    "sharding.num_devices": 0,
}

PER_DATASET = {
    "nq": {
        "train.mode": "dback_no_ste",          # model.py:98-104 float rows in the loss
        "train.steps": 20 * (58_880 // 32),    # train_nq.yaml:20 epochs; data_utils.py:61
        "loss.temperature": 8.0,               # train_nq.yaml:23; model.py:71 divides
        "optim.encoder_lr": 2e-6,              # train_nq.yaml:28
        "index.rebuild_every": 800,            # train_nq.yaml:44
        "model.dtype": "bfloat16",             # train.py:31-33,110 autocast
        "model.query_encoder": "facebook/dpr-question_encoder-single-nq-base",  # yaml:70
        "model.passage_encoder": "facebook/dpr-ctx_encoder-single-nq-base",  # embed.py:14
        "model.passage_style": "pair",
        "data.name": "nq",
        "data.format": "dpr",
        "data.corpus": "data/psgs_w100.tsv",
        "data.splits.train": "data/nq/biencoder-nq-train.json",
        "data.splits.test": "data/nq/nq-test.csv",
        "data.splits.dev": "data/nq/biencoder-nq-dev.json",   # selection, never test
        "data.dev_split": "dev",
        "data.allow_missing_positives": True,
        "eval.primary_metric": "top20",
        "eval.answer_ks": (1, 5, 20, 100),
    },
    "trivia": {
        "train.mode": "dback_no_ste",
        "train.steps": 20 * (60_413 // 32),
        "loss.temperature": 16.0,              # train_trivia.yaml:23
        "optim.encoder_lr": 2e-6,              # train_trivia.yaml:28
        "index.rebuild_every": 1600,           # train_trivia.yaml:46
        "model.dtype": "bfloat16",
        "model.query_encoder": "castorini/ance-dpr-question-multi",  # train_trivia.yaml:71
        "model.passage_encoder": "castorini/ance-dpr-context-multi",  # yaml:59 ANCE index
        "model.passage_style": "pair",
        "data.name": "trivia",
        "data.format": "dpr",
        "data.corpus": "data/psgs_w100.tsv",
        "data.splits.train": "data/trivia/biencoder-trivia-train.json",
        "data.splits.test": "data/trivia/trivia-test.csv",
        "data.splits.dev": "data/trivia/biencoder-trivia-dev.json",
        "data.dev_split": "dev",
        "data.allow_missing_positives": True,
        "eval.primary_metric": "top20",
        "eval.answer_ks": (1, 5, 20, 100),
    },
    "msmarco": {
        "train.mode": "rows_only",             # train_ms.py:150-151 no_grad query encoding
        "train.steps": 20 * (502_939 // 32),   # train_ms.yaml:20 epochs
        "loss.temperature": 8.0,               # train_ms.yaml:23
        "optim.encoder_lr": 1e-7,              # train_ms.yaml:29 (unused: encoder frozen)
        "index.rebuild_every": 500,            # train_ms.yaml:47
        "model.dtype": "float32",              # train_ms.py: no autocast
        "model.query_encoder": "castorini/ance-msmarco-passage",  # train_ms.yaml:73
        "model.passage_style": "concat",
        "data.name": "msmarco",
        "data.format": "beir",
        "data.root": "data/msmarco",
        "data.eval_split": "dev",              # train_ms.py eval on the dev split
        "data.dev_split": "heldout",           # selection on held-out training queries
        "data.dev_queries": 2000,
        "eval.measures": ("MRR@10", "R@10", "R@100", "R@1000", "nDCG@10"),
        "eval.primary_metric": "MRR@10",
    },
}


def _config(name):
  return importlib.import_module(f"configs.{name}").get_config()


@pytest.mark.parametrize("name", sorted(PER_DATASET))
def test_paper_config_holds_the_reference_values(name):
  config = _config(name)
  flat = _flatten(config.to_dict())
  pinned = {**SHARED, **PER_DATASET[name]}
  for key, value in pinned.items():
    assert flat[key] == value, (key, flat[key], value)
  # Every setting the config changes from the base is one of the pinned ones.
  base = _flatten(base_config().to_dict())
  changed = {k for k in flat if k not in base or flat[k] != base[k]}
  assert changed <= set(pinned), sorted(changed - set(pinned))
  assert validate_config(config, dim=768) == []


def test_encoder_schedule_is_the_reference_get_lr():
  """train.py:36-45 with train_nq.yaml's values: warmup 20, cosine from 2e-6 to 1e-6
  over 60,000 iterations, then 1e-6; evaluated at the same iteration number."""
  def reference(it, lr=2e-6, min_lr=1e-6, warmup=20, decay=60_000):
    if it < warmup:
      return lr * it / warmup
    if it > decay:
      return min_lr
    ratio = (it - warmup) / (decay - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)

  config = _config("nq")
  schedule = optim.make_schedule(config.optim.encoder_lr, config.optim, config.train.steps)
  for it in (0, 1, 7, 19, 20, 21, 1000, 30_010, config.train.steps, 59_999, 60_000, 90_000):
    np.testing.assert_allclose(float(schedule(it)), reference(it), rtol=1e-5, atol=1e-13)
  # The horizon is decay_steps, not train.steps: the run ends above the floor.
  assert float(schedule(config.train.steps)) > 1.3e-6
  config.optim.decay_steps = 0
  ends_at_steps = optim.make_schedule(2e-6, config.optim, config.train.steps)
  np.testing.assert_allclose(float(ends_at_steps(config.train.steps)), 1e-6, rtol=1e-6)


def test_row_schedule_constant_or_shared():
  cfg = base_config().optim
  cfg.warmup_steps, cfg.row_lr = 10, 1e-3
  cfg.row_schedule = "constant"
  constant = optim.make_row_schedule(cfg, 100)
  assert [float(constant(s)) for s in (0, 5, 99, 10_000)] == [1e-3] * 4
  cfg.row_schedule = "shared"
  shared = optim.make_row_schedule(cfg, 100)
  reference = optim.make_schedule(1e-3, cfg, 100)
  assert float(shared(0)) == 0.0
  for s in (0, 5, 10, 50, 100):
    assert float(shared(s)) == float(reference(s))


def test_clip_jointly_uses_one_norm_over_every_gradient():
  grads = ({"w": jnp.array([3.0, 0.0])}, jnp.array([[0.0, 4.0]]), None)
  clipped, norm = optim.clip_jointly(grads, 1.0)
  assert float(norm) == pytest.approx(5.0)
  np.testing.assert_allclose(clipped[0]["w"], [0.6, 0.0], rtol=1e-6)
  np.testing.assert_allclose(clipped[1], [[0.0, 0.8]], rtol=1e-6)
  assert clipped[2] is None
  small, _ = optim.clip_jointly(grads, 10.0)  # under the bound: unchanged
  np.testing.assert_array_equal(small[1], grads[1])


@pytest.mark.parametrize("scope", ["encoder", "all"])
def test_encoder_optimizer_clips_by_itself_only_in_encoder_scope(scope):
  cfg = base_config().optim
  cfg.clip_scope, cfg.grad_clip, cfg.warmup_steps = scope, 1.0, 0
  cfg.schedule, cfg.weight_decay, cfg.row_optimizer = "constant", 0.0, "sgd"
  tx, _ = optim.make_encoder_optimizer(cfg, 10)
  # Adam's first step is scale-free (g / |g|), so the clip shows in how a large gradient
  # weighs against a small one in the moments: two steps, norms 50 (clipped to 1) then 0.5.
  params = {"w": jnp.zeros(2)}
  grads = [{"w": jnp.array([30.0, 40.0])}, {"w": jnp.array([0.3, 0.4])}]

  def second_step(transform):
    state = transform.init(params)
    for g in grads:
      updates, state = transform.update(g, state, params)
    return np.asarray(updates["w"])

  adamw = optax.adamw(cfg.encoder_lr, b2=cfg.b2, weight_decay=0.0)
  clipped = second_step(optax.chain(optax.clip_by_global_norm(1.0), adamw))
  unclipped = second_step(adamw)
  assert not np.allclose(clipped, unclipped, rtol=1e-3)
  np.testing.assert_allclose(second_step(tx), clipped if scope == "encoder" else unclipped,
                             rtol=1e-5)


def test_pool_keeps_repeats_as_multiplicity():
  # Query 0 returns 5, 6, 7, 1; query 1 returns 6, 7, 8, 5: 5, 6, 7 twice each.
  candidates = np.array([[5, 6, 7, 1], [6, 7, 8, 5]])
  positives = [np.array([1]), np.array([2])]
  pool = build_pool(candidates, positives, pool_size=10, num_rows=50, max_positives=1,
                    rng=np.random.default_rng(0), fill_valid=False, dedup=False)
  # Positives first (the positive 1 that query 0 also returned counts once), then each
  # returned row once with its count, then filler in the slots the repeats freed.
  assert pool.row_ids[:6].tolist() == [1, 2, 5, 6, 7, 8]
  assert pool.multiplicity[:6].tolist() == [1, 1, 2, 2, 2, 1]
  assert pool.valid.tolist() == [True] * 6 + [False] * 4
  assert pool.multiplicity[6:].tolist() == [1] * 4
  assert pool.arrays()["multiplicity"] is pool.multiplicity
  # The de-duplicating pool has no multiplicity and fills the free rows.
  plain = build_pool(candidates, positives, pool_size=10, num_rows=50, max_positives=1,
                     rng=np.random.default_rng(0), dedup=True)
  assert plain.multiplicity is None and "multiplicity" not in plain.arrays()
  assert plain.valid.all()


@pytest.mark.parametrize("seed", range(5))
def test_pool_with_repeats_draws_its_budget_from_the_returns(seed):
  rng = np.random.default_rng(seed)
  candidates = rng.integers(0, 40, size=(4, 12))  # 48 returns over 40 rows: repeats
  positives = [np.array([r]) for r in rng.choice(40, 4, replace=False)]
  pool = build_pool(candidates, positives, pool_size=20, num_rows=60, max_positives=1,
                    rng=np.random.default_rng(seed), fill_valid=False, dedup=False)
  num_pos = 4
  negatives = pool.valid.copy()
  negatives[:num_pos] = False
  # 16 draws among the returns that are no positive, without replacement: no row is
  # drawn more often than it was returned.
  assert pool.multiplicity[negatives].sum() == 20 - num_pos
  returned = np.bincount(candidates.ravel(), minlength=60)
  assert (pool.multiplicity[negatives] <= returned[pool.row_ids[negatives]]).all()
  assert not np.isin(pool.row_ids[negatives], np.concatenate(positives)).any()
  assert np.unique(pool.row_ids).size == 20
  again = build_pool(candidates, positives, pool_size=20, num_rows=60, max_positives=1,
                     rng=np.random.default_rng(seed), fill_valid=False, dedup=False)
  np.testing.assert_array_equal(again.multiplicity, pool.multiplicity)


def test_multiplicity_is_the_loss_of_repeated_columns():
  """A row standing n times in the pool: the loss and every gradient equal those of a
  pool holding n equal columns (the reference's layout)."""
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)
  rows = jnp.asarray(rng.normal(size=(5, 8)), jnp.float32)
  positive = np.zeros((3, 5), bool)
  positive[[0, 1, 2], [0, 1, 0]] = True
  counts = np.array([1, 1, 3, 2, 1], np.float32)
  hidden, valid = np.zeros((3, 5), bool), np.ones(5, bool)

  def weighted(q, rows):
    return contrastive_loss(q, rows, positive, hidden, valid, temperature=0.5,
                            multiplicity=jnp.asarray(counts))[0]

  expand = np.repeat(np.arange(5), counts.astype(int))
  def repeated(q, rows):
    return contrastive_loss(q, rows[expand], positive[:, expand], hidden[:, expand],
                            valid[expand], temperature=0.5)[0]

  np.testing.assert_allclose(weighted(q, rows), repeated(q, rows), rtol=1e-6)
  for a, b in zip(jax.grad(weighted, (0, 1))(q, rows), jax.grad(repeated, (0, 1))(q, rows)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # Unit multiplicities are the plain loss.
  plain = contrastive_loss(q, rows, positive, hidden, valid, temperature=0.5)[0]
  ones = contrastive_loss(q, rows, positive, hidden, valid, temperature=0.5,
                          multiplicity=jnp.ones(5))[0]
  np.testing.assert_allclose(plain, ones, rtol=1e-7)


def test_max_positives_keeps_the_first_labels_in_their_order():
  corpus = Corpus(ids=["a", "b", "c", "d"], titles=[""] * 4, texts=[""] * 4)
  split = Split(queries=Queries(ids=["q0", "q1"], texts=["x", "y"]),
                qrels={"q0": {"c": 1, "a": 1, "d": 1}, "q1": {"b": 1}})
  every = training_queries(split, corpus)
  assert [p.tolist() for p in every.positives] == [[0, 2, 3], [1]]
  first = training_queries(split, corpus, max_positives=1)
  assert [p.tolist() for p in first.positives] == [[2], [1]]  # "c" is listed first
  two = training_queries(split, corpus, max_positives=2)
  assert [p.tolist() for p in two.positives] == [[0, 2], [1]]


@pytest.mark.parametrize("key, value, expected", [
    ("optim.decay_steps", 20, "config.optim.decay_steps=20: expected 0 or > "
                              "config.optim.warmup_steps=20"),
    ("optim.decay_steps", -1, "config.optim.decay_steps=-1: expected a number >= 0"),
    ("optim.row_schedule", "linear", "config.optim.row_schedule='linear': expected one of "
                                     "'shared', 'constant'"),
    ("optim.clip_scope", "rows", "config.optim.clip_scope='rows': expected one of "
                                 "'encoder', 'all'"),
    ("negatives.max_positives", -1, "config.negatives.max_positives=-1: expected a number "
                                    ">= 0"),
])
def test_recipe_options_are_validated(key, value, expected):
  config = base_config()
  section, name = key.split(".")
  config[section][name] = value
  with pytest.raises(ConfigError) as e:
    validate_config(config)
  assert e.value.problems == [expected]


@pytest.mark.parametrize("mode", ["dback_no_ste", "rows_only"])
def test_reference_options_train_end_to_end(tiny_config, tmp_path, mode):
  """The recipe's options through the training loop on the tiny data: repeats kept,
  first positive, constant row rate, one clip over rows and encoder; rows_only leaves
  the encoder as it was."""
  from qdr_jax.data.loader import load_dataset
  from qdr_jax.targets.encoders import embed_passages, load_encoders
  from qdr_jax.targets.table import build_or_load_table
  from qdr_jax.train.loop import train
  from qdr_jax.train.modes import get_mode
  c = tiny_config
  c.train.steps, c.index.rebuild_every, c.train.mode = 4, 2, mode
  c.negatives.dedup, c.negatives.max_positives = False, 1
  c.optim.row_schedule, c.optim.clip_scope, c.optim.decay_steps = "constant", "all", 100
  dataset = load_dataset(c.data)
  encoders = load_encoders(c.model)
  table0 = np.asarray(build_or_load_table(c, dataset.corpus, tmp_path / "cache",
                                          embed_passages(encoders, c)))
  result = train(c, get_mode(mode), dataset, encoders, table0, tmp_path / "run")
  assert result.step == 4
  records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
  steps = [r for r in records if "loss" in r]
  assert len(steps) == 4 and all(np.isfinite(r["loss"]) for r in steps)
  assert [r["row_lr"] for r in steps] == [c.optim.row_lr] * 4  # no warmup
  table = result.lifecycle.table_to_lead(result.state.table)
  assert (np.abs(table - table0).max(axis=1) > 0).sum() > 20
  unchanged = [np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
               zip(jax.tree.leaves(encoders.query_params), jax.tree.leaves(result.params))]
  assert all(unchanged) == (mode == "rows_only")
