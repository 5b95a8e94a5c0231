"""The training loop: batches, index rebuilds, negative pools, jitted steps, evaluation.

Everything with side effects (FAISS, files, logging, the progress bar) happens here, at
the edge of the pure step functions in ``qdr_jax.train.step``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from qdr_jax import distributed, sharding
from qdr_jax.data.loader import load_dataset
from qdr_jax.data.types import Corpus, RetrievalDataset, Split
from qdr_jax.eval.answers import AnswerMatcher
from qdr_jax.eval.evaluator import evaluate_index
from qdr_jax.eval.table_eval import build_quantized, evaluate_table
from qdr_jax.index.faiss_index import search, set_search_params
from qdr_jax.index.refresh import ChangedRows, incremental_refresh, refresh_kind
from qdr_jax.models import tokenize
from qdr_jax.negatives.pool import build_pool
from qdr_jax.quant import Quantizer, quantizer_from_faiss, stored_codes, write_codebooks_to_faiss
from qdr_jax.targets.encoders import Encoders, embed_passages, embed_queries, load_encoders
from qdr_jax.targets.table import build_or_load_table
from qdr_jax.train import optim
from qdr_jax.train.checkpoint import (Checkpointer, StopSignal, has_checkpoint, make_metadata,
                                      validate_metadata)
from qdr_jax.train.modes import Mode, get_mode
from qdr_jax.train.state import TrainState, host_table, init_state
from qdr_jax.train.step import StepFunctions, make_step_functions

TIMERS = ("encode", "search", "step", "rebuild")


@dataclasses.dataclass(frozen=True)
class TrainQueries:
  """Training queries that have at least one positive in the corpus."""
  texts: list[str]
  positives: list[np.ndarray]
  answers: list[list[str]] | None


def training_queries(split: Split, corpus: Corpus) -> TrainQueries:
  texts, positives, answers = [], [], []
  for qid, text in zip(split.queries.ids, split.queries.texts):
    rows = [corpus.row_of[d] for d in split.positives(qid) if d in corpus.row_of]
    if not rows:
      continue
    texts.append(text)
    positives.append(np.asarray(sorted(set(rows)), dtype=np.int64))
    if split.answers is not None:
      answers.append(list(split.answers.get(qid, ())))
  if not texts:
    raise ValueError("the training split has no query with a positive passage in the corpus.")
  return TrainQueries(texts, positives, answers if split.answers is not None else None)


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


class MetricsWriter:
  """Appends one JSON object a line to ``metrics.jsonl``."""

  def __init__(self, path: pathlib.Path):
    self.path = path

  def write(self, record: dict) -> None:
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")


def _to_float(tree) -> dict:
  return {k: float(v) for k, v in jax.device_get(tree).items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Trains per ``config`` and writes ``metrics.jsonl`` and ``results.json`` in ``workdir``.

  In a multi-process job (``config.distributed``, see ``qdr_jax.distributed``) every
  process trains its part; process 0 alone evaluates and writes files.

  Returns:
    The results dictionary written to ``results.json`` (on other processes than 0, only
    ``process_index`` and ``steps``).
  """
  distributed.initialize_distributed(config)  # before anything touches a device
  lead = distributed.is_lead_process()
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mode = get_mode(config.train.mode, config.quant.learn_codebooks)
  dataset = load_dataset(config.data)
  corpus = dataset.corpus
  eval_split = dataset.split(config.data.eval_split)
  encoders = load_encoders(config.model)
  cache_dir = pathlib.Path(config.table.cache_dir or workdir / "cache")
  table0 = build_or_load_table(config, corpus, cache_dir, embed_passages(encoders, config))

  def evaluate(table: np.ndarray, params, tag: str) -> dict:
    query_emb = embed_queries(encoders, params, eval_split.queries.texts, config, desc=tag)
    return evaluate_table(table, query_emb, eval_split, corpus, config.index, config.eval)

  start = time.perf_counter()
  before = None
  if lead:
    before = _before_metrics(config, workdir,
                             lambda: evaluate(table0, encoders.query_params, "eval before"))
    logging.info("before: flat %s | quantized %s", before["flat"], before["quantized"])
  trained = train(config, mode, dataset, encoders, table0, workdir) if mode.trains else None
  if trained is not None and trained.get("preempted"):
    # Stopped by SIGTERM after a checkpoint: no results yet; rerunning resumes.
    return {"preempted": True, "step": trained["step"]}
  if not lead:
    return {"process_index": jax.process_index(), "steps": config.train.steps}
  results = {"dataset": config.data.name, "model": config.model.query_encoder,
             "mode": config.train.mode, "index": before["index"], "before": before}
  if trained is not None:
    after = evaluate(trained["table"], trained["params"], "eval after")
    if mode.quantize:
      after["quantized_trained_quantizer"] = trained["final_index_metrics"]
    results.update(after=after, steps=config.train.steps,
                   train_seconds=trained["train_seconds"],
                   seconds_per_step=trained["seconds_per_step"])
  else:
    results.update(after=before, steps=0, train_seconds=0.0,
                   seconds_per_step={k: 0.0 for k in TIMERS})
  results["total_seconds"] = time.perf_counter() - start
  (workdir / "results.json").write_text(json.dumps(results, indent=1))
  return results


def train(config: ml_collections.ConfigDict, mode: Mode, dataset: RetrievalDataset,
          encoders: Encoders, table0: np.ndarray, workdir: pathlib.Path) -> dict:
  """Runs ``config.train.steps`` steps; returns the final params and table and timings.

  With ``config.checkpoint.every`` > 0 the state is saved every that many steps and at the
  end, and SIGTERM saves after the current step and returns ``{"preempted": True,
  "step": ...}``. A workdir that already holds a checkpoint is resumed from it.

  Multi-process: every process loads its block of each batch and holds its rows of the
  table; process 0 owns FAISS (builds, searches, refreshes) and broadcasts the pool and
  the quantizer, and alone writes logs. Every process returns the same table and params.
  Checkpoints of a multi-process run leave the FAISS index out (only process 0 has it):
  a resume rebuilds it from the restored table.
  """
  with StopSignal(enabled=bool(config.checkpoint.every)) as stop:
    return _train(config, mode, dataset, encoders, table0, workdir, stop)


def _train(config: ml_collections.ConfigDict, mode: Mode, dataset: RetrievalDataset,
           encoders: Encoders, table0: np.ndarray, workdir: pathlib.Path,
           stop: StopSignal) -> dict:
  corpus = dataset.corpus
  num_rows = len(corpus)
  queries = training_queries(dataset.split(config.data.train_split), corpus)
  eval_split = dataset.split(config.data.eval_split)
  batch_size, k = config.train.batch_size, config.negatives.k
  # A corpus smaller than B*k is pooled whole: the softmax is then exact.
  pool_size = config.negatives.pool_size or min(batch_size * k, num_rows)
  steps = config.train.steps
  mesh = sharding.make_mesh(config.sharding)
  if batch_size % mesh.devices.size:
    raise ValueError(f"config.train.batch_size={batch_size} is not divisible by the "
                     f"{mesh.devices.size} devices of the mesh.")

  encoder_tx, encoder_lr = optim.make_encoder_optimizer(config.optim, steps)
  row_tx = optim.make_row_transform(config.optim)
  row_lr = optim.make_schedule(config.optim.row_lr, config.optim, steps)
  codebook_tx, _ = (optim.make_codebook_optimizer(config.optim, steps)
                    if mode.learn_codebooks else (None, None))

  lead = distributed.is_lead_process()
  multi = jax.process_count() > 1
  timers = {name: 0.0 for name in TIMERS}
  tick = time.perf_counter()
  # Only process 0 holds a FAISS index; the others get what the step needs by broadcast.
  index = build_quantized(table0, config.index, config.index.seed) if lead else None
  quantizer, _ = _shared_quantizer(index, with_codes=False)
  timers["rebuild"] += time.perf_counter() - tick

  state = init_state(config, mode, encoders.query_params, table0, quantizer, mesh,
                     encoder_tx, row_tx, codebook_tx)
  ckpt, start_step = None, 0
  if config.checkpoint.every or has_checkpoint(workdir):
    ckpt = Checkpointer.from_config(config, workdir)
    if ckpt.latest_step() is not None:
      state, index, start_step = _resume(config, mode, ckpt, state, index, num_rows, workdir)
  fns: StepFunctions = make_step_functions(
      lambda p, **t: encoders.query_module.apply({"params": p}, t["input_ids"],
                                                 t["attention_mask"], t["token_type_ids"]),
      mode, config, encoder_tx, row_tx, row_lr, codebook_tx, mesh)
  matcher = (AnswerMatcher(corpus.texts)
             if queries.answers is not None and config.negatives.hide_answer_matches else None)
  writer = MetricsWriter(workdir / "metrics.jsonl") if lead else None
  quantizer_dev, index_codes = _loss_quantizer(config, mode, index, mesh, state.table.shape[0])
  changed = ChangedRows(num_rows)  # rows moved since the last refresh
  if start_step:  # which rows moved before the checkpoint is not saved: re-add them all
    changed.add(np.arange(num_rows))

  bar = tqdm(range(start_step, steps), initial=start_step, total=steps,
             desc=f"train {config.train.mode}", unit="step", disable=not lead)
  window_start, window_steps = time.perf_counter(), 0
  train_start = time.perf_counter()
  # Host randomness of a step (pool subsampling and filler) derives from the state's key
  # and the step alone, so resumed and overlapped runs draw the same pools.
  # The per-step seeds are computed up front: a JAX op in the step's host path would queue
  # behind the update in flight and make the overlapped search wait for it.
  step_seeds = _step_seeds(state.rng, steps)

  def encode_batch(step: int, params):
    """Dispatches the query forward of ``step``'s batch; returns device futures."""
    idx = batch_indices(step, len(queries.texts), batch_size, config.seed)
    # The whole batch is tokenized on every host, so all pad to the same length; each
    # then places only its own block (one block per process, see distributed.py).
    tokens = tokenize(encoders.tokenizer, [queries.texts[i] for i in idx],
                      config.model.max_query_length,
                      pad_to_multiple_of=config.model.length_bucket)
    local = {n: distributed.process_batch_slice(a, jax.process_index(), jax.process_count())
             for n, a in tokens.items()}
    query_emb, encoder_vjp = fns.encode(params, distributed.host_local_to_global(local, mesh))
    return step, idx, query_emb, encoder_vjp

  def with_negatives(encoded, index):
    """Searches the quantized index with the batch's embeddings and pools the results."""
    step, idx, query_emb, encoder_vjp = encoded
    tick = time.perf_counter()
    query_host = np.asarray(distributed.global_to_host(query_emb))
    timers["encode"] += time.perf_counter() - tick
    tick = time.perf_counter()
    pool = None
    if lead:
      _, candidates = search(index, query_host, k)
      rng = np.random.default_rng(step_seeds[step])
      relevance_fn = None
      if matcher is not None:
        batch_answers = [queries.answers[i] for i in idx]
        relevance_fn = lambda b, rows: matcher.contains_answer(batch_answers[b], rows)
      built = build_pool(candidates, [queries.positives[i] for i in idx], pool_size=pool_size,
                         num_rows=num_rows, max_positives=config.negatives.max_positives,
                         rng=rng, fill_valid=config.negatives.fill_valid,
                         relevance_fn=relevance_fn)
      pool = {**built.arrays(), "num_candidates": np.asarray(built.num_candidates, np.int32)}
    pool = distributed.broadcast_arrays(pool)
    pool_dev = distributed.replicate_to_global(
        {n: a for n, a in pool.items() if n != "num_candidates"}, mesh)
    timers["search"] += time.perf_counter() - tick
    return query_emb, encoder_vjp, pool, pool_dev

  # Overlap: the next batch's forward is dispatched before this step's update, and its
  # index search runs on the host while the device updates. The next step's query
  # embeddings, negatives and VJP then come from parameters one update old (a one-step
  # stale gradient, as in pipelined training). Exact mode encodes after each update.
  overlap = bool(config.negatives.overlap)
  current = with_negatives(encode_batch(start_step, state.params), index) \
      if start_step < steps else None
  stopping = False
  for step in bar:
    eval_metrics = None
    last = step + 1 == steps
    query_emb, encoder_vjp, pool, pool_dev = current
    tick = time.perf_counter()
    upcoming = encode_batch(step + 1, state.params) if overlap and not last else None
    state, metrics = fns.update(state, encoder_vjp, query_emb, pool_dev, quantizer_dev,
                                index_codes)
    searched = 0.0  # overlapped encode + search, which their own timers count
    if upcoming is not None:
      searched = time.perf_counter()
      current = with_negatives(upcoming, index)
      searched = time.perf_counter() - searched
    metrics = _to_float(metrics)  # blocks: the step is timed to completion
    timers["step"] += time.perf_counter() - tick - searched
    window_steps += 1

    if mode.update_rows:
      changed.add(pool["row_ids"][pool["valid"]])
    kind = refresh_kind(step + 1, config.index.rebuild_every, config.index.full_rebuild_every)
    if kind is not None and not last:
      tick = time.perf_counter()
      if kind == "incremental" and not mode.learn_codebooks:
        rows = changed.take()  # only these rows moved since the last refresh
        moved = np.asarray(distributed.global_to_host(state.table[jnp.asarray(rows)]),
                           np.float32)
        if lead:
          index = incremental_refresh(index, rows, moved)
      else:
        index = _refresh_index(config, mode, state, index, num_rows)
        changed.clear()
      quantizer_dev, index_codes = _loss_quantizer(config, mode, index, mesh,
                                                   state.table.shape[0])
      timers["rebuild"] += time.perf_counter() - tick
    # A process that got SIGTERM still prepares the next batch in a multi-process job:
    # the others, which may not have it yet, need it for the collectives inside.
    if not overlap and not last and (multi or not stop.requested):
      current = with_negatives(encode_batch(step + 1, state.params), index)

    if lead and ((step + 1) % config.train.log_every == 0 or step + 1 == steps):
      now = time.perf_counter()
      num_candidates = int(pool["num_candidates"])
      record = {"step": step + 1, **metrics,
                "encoder_lr": float(encoder_lr(step)), "row_lr": float(row_lr(step)),
                "steps_per_second": window_steps / (now - window_start),
                "pool_candidates": num_candidates,
                "pool_duplicate_fraction": 1.0 - num_candidates / (batch_size * k),
                **{f"seconds_{n}": v / (step + 1 - start_step) for n, v in timers.items()}}
      writer.write(record)
      bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['pool_accuracy']:.2f}")
      window_start, window_steps = now, 0

    if config.eval.every and (step + 1) % config.eval.every == 0 and step + 1 < steps:
      params_host = distributed.global_to_host(state.params)  # collective: every process
      if lead:
        query_emb_eval = embed_queries(encoders, params_host, eval_split.queries.texts, config,
                                       desc="eval")
        record = {"step": step + 1, "eval_quantized": evaluate_index(
            index, query_emb_eval, eval_split, corpus, depth=config.eval.depth,
            answer_ks=tuple(config.eval.answer_ks), measures=tuple(config.eval.measures))}
        writer.write(record)
        eval_metrics = record["eval_quantized"]
      if multi:  # every process's checkpoint manager ranks by the same figures
        eval_metrics = {n: float(v) for n, v in distributed.broadcast_arrays(
            None if eval_metrics is None else
            {n: np.float32(v) for n, v in eval_metrics.items()}).items()}

    stopping = _any_process(stop.requested) if multi else stop.requested
    if config.checkpoint.every and ((step + 1) % config.checkpoint.every == 0
                                    or step + 1 == steps or stopping):
      # The index goes along: it may predate the table (built at the last rebuild). Only
      # process 0 has it, so a multi-process checkpoint leaves it out.
      ckpt.save(state, _checkpoint_metadata(config, state, step + 1, num_rows),
                index=None if multi else index, metrics=eval_metrics)
    if stopping:
      break
  bar.close()
  stop.release()
  if ckpt is not None:
    ckpt.wait_until_finished()
    ckpt.close()
  if stopping:
    stop.acknowledge()
    step_done = int(distributed.global_to_host(state.step))
    logging.warning("stopped by signal after step %d; checkpoint saved", step_done)
    return {"preempted": True, "step": step_done}
  train_seconds = time.perf_counter() - train_start

  table = host_table(state, num_rows)
  params = distributed.global_to_host(state.params)
  codebooks = (None if state.codebooks is None
               else distributed.global_to_host(state.codebooks))
  final_index_metrics = None
  if mode.quantize and lead:
    # The quantizer the loss was trained against, with the final table re-encoded
    # (and the learned codebooks written in): what serving without a retrain gives.
    final_index = _requantize(index, table, codebooks)
    query_emb_eval = embed_queries(encoders, params, eval_split.queries.texts, config,
                                   desc="eval trained quantizer")
    final_index_metrics = evaluate_index(
        final_index, query_emb_eval, eval_split, corpus, depth=config.eval.depth,
        answer_ks=tuple(config.eval.answer_ks), measures=tuple(config.eval.measures))
  return {"table": table, "params": params, "train_seconds": train_seconds,
          "seconds_per_step": {n: v / max(steps - start_step, 1) for n, v in timers.items()},
          "final_index_metrics": final_index_metrics}


def _checkpoint_metadata(config, state: TrainState, step: int, num_rows: int) -> dict:
  return make_metadata(config, step=step, corpus_size=num_rows, table_rows=state.table.shape[0],
                       dim=state.table.shape[1], table_dtype=str(state.table.dtype),
                       has_codebooks=state.codebooks is not None)


def _resume(config, mode: Mode, ckpt: Checkpointer, state: TrainState, index, num_rows: int,
            workdir: pathlib.Path):
  """(state, index, step) of the workdir's latest readable checkpoint.

  The state (with its PRNG key) and the FAISS index the loop was searching are restored,
  and ``batch_indices`` is a pure function of the step, so the resumed steps repeat the
  uninterrupted run's exactly. Log records past the checkpoint are dropped.
  """
  validate_metadata(ckpt.read_metadata(), config, num_rows, state.table.shape[1],
                    also=("train.mode", "quant.learn_codebooks"))
  restored = ckpt.restore(state)
  if restored.metadata["config"]["train"]["steps"] != config.train.steps:
    logging.warning("resuming with train.steps=%d, the checkpoint's run had %d: the "
                    "schedules differ from an uninterrupted run", config.train.steps,
                    restored.metadata["config"]["train"]["steps"])
  if restored.index is not None:
    index = restored.index
    set_search_params(index, nprobe=config.index.nprobe,
                      ef_search=config.index.ef_search or None, strict=False)
  else:
    index = _refresh_index(config, mode, restored.state, index, num_rows)
  if distributed.is_lead_process():
    _truncate_records(workdir / "metrics.jsonl", restored.step)
  logging.info("resumed from %s at step %d", ckpt.step_path(restored.step), restored.step)
  return restored.state, index, restored.step


def _truncate_records(path: pathlib.Path, step: int) -> None:
  """Drops metric records of steps after ``step``, so a resumed log has no duplicates."""
  if not path.exists():
    return
  lines = [line for line in path.read_text().splitlines() if line.strip()]
  keep = [line for line in lines if json.loads(line).get("step", 0) <= step]
  if len(keep) != len(lines):
    path.write_text("".join(line + "\n" for line in keep))


def _before_metrics(config, workdir: pathlib.Path, compute) -> dict:
  """The "before" evaluation; a resumed run (the workdir has a checkpoint) reads it back
  from ``eval_before.json`` when the config is unchanged, so its results.json reports
  the same figures without re-embedding and re-indexing."""
  path = workdir / "eval_before.json"
  key = json.loads(config.to_json_best_effort())
  if path.exists() and has_checkpoint(workdir):
    saved = json.loads(path.read_text())
    if saved.get("config") == key:
      return saved["before"]
  before = compute()
  path.write_text(json.dumps({"config": key, "before": before}))
  return before


def _shared_quantizer(index, with_codes: bool
                      ) -> tuple[Quantizer, dict[str, np.ndarray] | None]:
  """The index's quantizer and (``with_codes``) the codes and lists it stores for every
  row, on every process: process 0 reads them from its FAISS index (the others pass
  None) and broadcasts them."""
  arrays = None
  if index is not None:
    q = quantizer_from_faiss(index)
    arrays = {"codebooks": np.asarray(q.codebooks),
              "static": np.asarray([q.by_residual, q.coarse_metric == "ip"], np.int32)}
    for name in ("rotation", "coarse_centroids"):
      if getattr(q, name) is not None:
        arrays[name] = np.asarray(getattr(q, name))
    if with_codes:
      arrays["codes"], arrays["lists"] = stored_codes(index)
  arrays = distributed.broadcast_arrays(arrays)
  by_residual, ip = (bool(v) for v in arrays["static"])
  quantizer = Quantizer(codebooks=jnp.asarray(arrays["codebooks"]),
                        rotation=_optional(arrays, "rotation"),
                        coarse_centroids=_optional(arrays, "coarse_centroids"),
                        by_residual=by_residual, coarse_metric="ip" if ip else "l2")
  codes = {"codes": arrays["codes"], "lists": arrays["lists"]} if with_codes else None
  return quantizer, codes


def _optional(arrays: dict, name: str):
  return jnp.asarray(arrays[name]) if name in arrays else None


def _loss_quantizer(config, mode: Mode, index, mesh, padded_rows: int):
  """The quantizer the loss decodes with and, for ``quant.codes='index'``, the codes the
  index stores for every row (row-sharded like the table), both on the mesh. A
  collective in a multi-process job: process 0 passes its index, the others None."""
  if not mode.quantize:
    return None, None
  if config.quant.codes not in ("index", "recompute"):
    raise ValueError(f"config.quant.codes must be index or recompute; got {config.quant.codes!r}")
  quantizer, stored = _shared_quantizer(index, with_codes=config.quant.codes == "index")
  quantizer = distributed.replicate_to_global(quantizer, mesh)
  if stored is None:
    return quantizer, None
  shard = config.sharding.shard_table
  return quantizer, {
      "codes": sharding.put_rows(stored["codes"].astype(np.uint8), mesh, shard, padded_rows),
      "lists": sharding.put_rows(stored["lists"].astype(np.int32), mesh, shard, padded_rows)}


def _refresh_index(config, mode: Mode, state: TrainState, index, num_rows: int):
  """The quantized index over the current table, which also refreshes the negatives.

  Learned codebooks are kept (written into the index, codes recomputed); otherwise the
  quantizer is retrained from the table, as a user rebuilding FAISS would. Every process
  calls it (the table is gathered from all of them); only process 0 builds, and the
  others get None.
  """
  table = host_table(state, num_rows)
  codebooks = (distributed.global_to_host(state.codebooks) if mode.learn_codebooks
               else None)
  if not distributed.is_lead_process():
    return None
  if mode.learn_codebooks:
    return _requantize(index, table, codebooks)
  return build_quantized(table, config.index, config.index.seed)


def _requantize(index, table: np.ndarray, codebooks):
  """``index`` with its coarse quantizer kept, ``codebooks`` (or its own) written in and
  ``table`` re-encoded: serving the trained table without retraining the quantizer."""
  quantizer = quantizer_from_faiss(index)
  if codebooks is not None:
    quantizer = quantizer.replace(codebooks=jnp.asarray(codebooks))
  return write_codebooks_to_faiss(index, quantizer, table)


def _any_process(flag: bool) -> bool:
  """Whether ``flag`` is set on any process (a SIGTERM may reach only some of them), so
  that all stop after the same step."""
  return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).any())


def _step_seeds(rng: jax.Array, steps: int) -> np.ndarray:
  """(steps, key words) host seeds: the raw data of ``fold_in(rng, step)`` per step."""
  base = jax.random.wrap_key_data(jax.device_get(jax.random.key_data(rng)))
  fold = jax.jit(jax.vmap(lambda s: jax.random.key_data(jax.random.fold_in(base, s))))
  return np.asarray(jax.device_get(fold(jnp.arange(max(steps, 1)))))
