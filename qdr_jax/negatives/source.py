"""The negative source of a training run: a step's queries, their embeddings, the index's
top-k for them, and the cross-batch pool the jitted update scores, on every process.

Split in two calls so the loop can overlap them: ``encode`` dispatches the query
forward of a step (device futures and the encoder's VJP); ``negatives`` fetches the
embeddings, searches the quantized index on process 0, builds the pool there and
broadcasts it, in one collective: the config fixes the pool's shapes (``pool_shapes``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Iterator
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from qdr_jax import distributed
from qdr_jax.data.pseudo import PSEUDO_QUERY_SOURCES, pseudo_query_texts
from qdr_jax.data.types import Corpus, Split
from qdr_jax.index.lifecycle import IndexLifecycle
from qdr_jax.index.searching import search
from qdr_jax.models import LENGTH_BUCKET, tokenize
from qdr_jax.negatives.pool import build_pool

# Training queries are packed several to a row of max_query_length tokens, in a multiple
# of this many rows (rounded to the device count); 0 = one query per padded row. Packed
# queries encode as they would alone (the attention keeps them apart), at a fraction of
# the padded compute: SciFact's 32 queries average 23 tokens and fill 12-16 rows of 64.
PACK_QUERY_ROWS = 4


@dataclasses.dataclass(frozen=True)
class TrainQueries:
  """Training queries that have at least one positive in the corpus, and the corpus
  (the source of label-free pseudo-queries)."""
  texts: list[str]
  positives: list[np.ndarray]
  answers: list[list[str]] | None
  corpus: Corpus | None = dataclasses.field(default=None, repr=False, compare=False)


def training_queries(split: Split, corpus: Corpus, max_positives: int = 0) -> TrainQueries:
  """The queries of ``split`` with a positive in ``corpus``, each with its first
  ``max_positives`` distinct positive rows in label order (0: all), sorted."""
  texts, positives, answers = [], [], []
  for qid, text in zip(split.queries.ids, split.queries.texts):
    rows = list(dict.fromkeys(corpus.row_of[d] for d in split.positives(qid)
                              if d in corpus.row_of))
    if not rows:
      continue
    texts.append(text)
    positives.append(np.asarray(sorted(rows[:max_positives or None]), dtype=np.int64))
    if split.answers is not None:
      answers.append(list(split.answers.get(qid, ())))
  if not texts:
    raise ValueError("the training split has no query with a positive passage in the corpus.")
  return TrainQueries(texts, positives, answers if split.answers is not None else None,
                      corpus)


def batch_indices(step: int, num_queries: int, batch_size: int, seed: int) -> np.ndarray:
  """Queries of ``step``: shuffled epochs by seed, last partial batch dropped.

  A pure function of the step, so a resumed run sees exactly the batches it would have.
  """
  per_epoch = num_queries // batch_size
  if per_epoch == 0:
    raise ValueError(f"config.train.batch_size={batch_size} exceeds the {num_queries} "
                     "training queries.")
  epoch, slot = divmod(step, per_epoch)
  order = np.random.default_rng((seed, epoch)).permutation(num_queries)
  return order[slot * batch_size:(slot + 1) * batch_size]


# Mixed into the pseudo-query draws' seed, so they are a stream apart from the batches'.
_PSEUDO_STREAM = 0x9E0D


def pseudo_query_rows(step: int, num_rows: int, count: int, seed: int) -> np.ndarray:
  """The ``count`` distinct corpus rows whose pseudo-queries join ``step``'s batch.

  A pure function of (seed, step), like ``batch_indices``: a resumed run draws the same.
  """
  if count > num_rows:
    raise ValueError(f"config.negatives.pseudo_queries={count} exceeds the corpus's "
                     f"{num_rows} passages.")
  rng = np.random.default_rng((seed, _PSEUDO_STREAM, step))
  return np.sort(rng.choice(num_rows, size=count, replace=False))


def query_tokens(tokenizer, texts: list[str], model_cfg: ml_collections.ConfigDict,
                 num_devices: int) -> dict[str, np.ndarray]:
  """A training batch's queries as the encoder takes them: packed into a multiple of
  ``PACK_QUERY_ROWS`` rows (and of ``num_devices``, so the rows split evenly over the
  mesh) or, with 0, one per row padded to a multiple of ``LENGTH_BUCKET``."""
  rows = PACK_QUERY_ROWS
  return tokenize(tokenizer, texts, model_cfg.max_query_length,
                  pad_to_multiple_of=LENGTH_BUCKET,
                  pack_rows_multiple=math.lcm(rows, num_devices) if rows else 0)


class PhaseTimers:
  """Wall seconds spent per phase of the loop (encode, search, step, rebuild)."""

  PHASES = ("encode", "search", "step", "rebuild")

  def __init__(self):
    self.seconds = {name: 0.0 for name in self.PHASES}

  @contextlib.contextmanager
  def time(self, phase: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
      yield
    finally:
      self.seconds[phase] += time.perf_counter() - start

  def per_step(self, steps: int) -> dict[str, float]:
    return {name: value / max(steps, 1) for name, value in self.seconds.items()}


def pseudo_query_labels(positives: list[np.ndarray], pseudo_rows: np.ndarray, source: str
                        ) -> tuple[list[np.ndarray], list[np.ndarray] | None, int]:
  """``build_pool``'s positives, hidden rows and unlabelled count for a batch whose last
  queries are the pseudo-queries of ``pseudo_rows``.

  Args:
    positives: the training queries' positive rows, in batch order.
    pseudo_rows: the corpus rows the pseudo-queries came from.
    source: ``config.negatives.pseudo_query_source``: 'positive' labels each pseudo-query
      with its own passage, so the contrastive loss trains on (title, passage) pairs drawn
      from the whole corpus and reaches rows and index parameters no training query names;
      'hide' hides that passage from it (a passage trivially matches its own title, which
      would teach the distillation nothing but its own top rank); 'candidate' leaves it an
      ordinary pool row.
  """
  if source not in PSEUDO_QUERY_SOURCES:
    raise ValueError(f"config.negatives.pseudo_query_source must be one of "
                     f"{PSEUDO_QUERY_SOURCES}; got {source!r}")
  sources = [np.asarray([r], np.int64) for r in pseudo_rows]
  if source == "positive":
    return list(positives) + sources, None, 0
  empty = np.zeros(0, np.int64)
  hidden = [empty] * len(positives) + sources if sources and source == "hide" else None
  return list(positives) + [empty] * len(sources), hidden, len(sources)


@dataclasses.dataclass(frozen=True)
class EncodedBatch:
  """A step's queries dispatched through the encoder (device futures)."""
  step: int
  query_rows: np.ndarray  # indices into TrainQueries
  query_emb: jax.Array    # the training queries, then the pseudo-queries
  encoder_vjp: Any
  pseudo_rows: np.ndarray = dataclasses.field(  # corpus rows of the pseudo-queries
      default_factory=lambda: np.zeros(0, np.int64))


@dataclasses.dataclass(frozen=True)
class StepInputs:
  """Everything the jitted update of one step consumes, plus the host pool for logging."""
  query_emb: jax.Array
  encoder_vjp: Any
  pool: dict[str, np.ndarray]   # host copy, identical on every process
  pool_dev: dict[str, jax.Array]  # replicated on the mesh

  @property
  def updated_rows(self) -> np.ndarray:
    """The rows the update writes (valid pooled rows)."""
    return self.pool["row_ids"][self.pool["valid"]]


class NegativeSource:
  """Batches of training queries with their similarity-guided negative pools.

  Args:
    config: the full config (``train``, ``negatives``, ``model``, ``seed`` are read).
    queries: the training queries.
    tokenizer: the query tokenizer.
    encode_fn: the jitted ``(params, tokens) -> (query_emb, vjp)`` half of the step.
    mesh: the training mesh.
    lifecycle: the run's index (searched on process 0).
    num_rows: passages in the corpus.
    step_seeds: (steps, key words) host seeds, one per step, for pool subsampling.
    relevance_fn: ``(query rows of the batch, pooled rows) -> (B, n) mask`` of pooled
      rows to hide from each query (answer-matching passages), or None.
    timers: where the encode and search seconds go.
  """

  def __init__(self, config: ml_collections.ConfigDict, queries: TrainQueries, tokenizer,
               encode_fn: Callable, mesh: Mesh, lifecycle: IndexLifecycle, num_rows: int,
               step_seeds: np.ndarray, relevance_fn: Callable | None, timers: PhaseTimers):
    self.config = config
    self.queries = queries
    self.tokenizer = tokenizer
    self.encode_fn = encode_fn
    self.mesh = mesh
    self.lifecycle = lifecycle
    self.num_rows = num_rows
    self.step_seeds = step_seeds
    self.relevance_fn = relevance_fn
    self.timers = timers
    self.batch_size = config.train.batch_size
    self.k = config.negatives.k
    self.num_pseudo = config.negatives.pseudo_queries
    if self.num_pseudo and queries.corpus is None:
      raise ValueError("config.negatives.pseudo_queries > 0 needs the corpus: build the "
                       "queries with training_queries(split, corpus).")
    if (self.batch_size + self.num_pseudo) % mesh.devices.size:
      raise ValueError(f"config.train.batch_size + config.negatives.pseudo_queries = "
                       f"{self.batch_size + self.num_pseudo} is not divisible by the "
                       f"{mesh.devices.size} devices of the mesh.")
    # A corpus smaller than (B + pseudo-queries) * k is pooled whole: the softmax is
    # then exact.
    self.pool_size = config.negatives.pool_size or min(
        (self.batch_size + self.num_pseudo) * self.k, num_rows)

  def encode(self, step: int, params) -> EncodedBatch:
    """Dispatches the query forward of ``step``'s batch; returns device futures."""
    rows = batch_indices(step, len(self.queries.texts), self.batch_size, self.config.seed)
    texts = [self.queries.texts[i] for i in rows]
    pseudo_rows = np.zeros(0, np.int64)
    if self.num_pseudo:
      pseudo_rows = pseudo_query_rows(step, self.num_rows, self.num_pseudo, self.config.seed)
      texts += pseudo_query_texts(self.queries.corpus, pseudo_rows)
    # The whole batch is tokenized on every host, so all pad to the same length; each
    # then places only its own block (one block per process, see distributed.py).
    tokens = query_tokens(self.tokenizer, texts, self.config.model, self.mesh.devices.size)
    local = {name: distributed.process_batch_slice(a, jax.process_index(),
                                                   jax.process_count())
             for name, a in tokens.items()}
    query_emb, vjp = self.encode_fn(params, distributed.host_local_to_global(local, self.mesh))
    return EncodedBatch(step, rows, query_emb, vjp, pseudo_rows)

  def negatives(self, batch: EncodedBatch) -> StepInputs:
    """Searches the index with the batch's embeddings and pools the results."""
    with self.timers.time("encode"):  # waits for the forward to finish
      query_host = np.asarray(distributed.global_to_host(batch.query_emb))
    with self.timers.time("search"):
      pool = distributed.broadcast_from_lead(lambda: self._pool(batch, query_host),
                                             self.pool_shapes())
      pool_dev = distributed.replicate_to_global(
          {name: a for name, a in pool.items() if name != "num_candidates"}, self.mesh)
    return StepInputs(batch.query_emb, batch.encoder_vjp, pool, pool_dev)

  def pool_shapes(self) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes and dtypes of ``_pool``'s arrays, which the config fixes."""
    queries, size = self.batch_size + self.num_pseudo, self.pool_size
    shapes = {"row_ids": ((size,), np.int32), "valid": ((size,), np.bool_),
              "positive_mask": ((queries, size), np.bool_),
              "hidden_mask": ((queries, size), np.bool_), "num_candidates": ((), np.int32)}
    if not self.config.negatives.dedup:
      shapes["multiplicity"] = ((size,), np.float32)
    return {name: jax.ShapeDtypeStruct(shape, dtype) for name, (shape, dtype) in shapes.items()}

  def _pool(self, batch: EncodedBatch, query_host: np.ndarray) -> dict[str, np.ndarray]:
    _, candidates = search(self.lifecycle.index, query_host, self.k)
    relevance = None
    num_pseudo = batch.pseudo_rows.size
    if self.relevance_fn is not None:  # pseudo-queries have no answers: nothing to hide
      relevance = lambda rows: np.concatenate(
          [self.relevance_fn(batch.query_rows, rows), np.zeros((num_pseudo, rows.size), bool)])
    positives, hidden, unlabelled = pseudo_query_labels(
        [self.queries.positives[i] for i in batch.query_rows], batch.pseudo_rows,
        self.config.negatives.pseudo_query_source)
    built = build_pool(candidates, positives,
                       pool_size=self.pool_size, num_rows=self.num_rows,
                       max_positives=max(len(p) for p in positives + [[0]]),
                       rng=np.random.default_rng(self.step_seeds[batch.step]),
                       fill_valid=self.config.negatives.dedup, hidden=hidden,
                       relevance_fn=relevance, unlabelled=unlabelled,
                       dedup=self.config.negatives.dedup)
    return {**built.arrays(), "num_candidates": np.asarray(built.num_candidates, np.int32)}
