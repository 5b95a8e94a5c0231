"""The training loop: jitted steps between the components that own the side effects.

Each component owns its state: ``IndexLifecycle`` the FAISS index and what the loss reads
from it, ``NegativeSource`` the batches, the search and the pool, ``Checkpointer`` the
saved states, ``PhaseTimers`` the timings. The loop only sequences them around the pure
step functions of ``qdr_jax.train.step``.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any, Callable

import faiss
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from qdr_jax import distributed, sharding
from qdr_jax.data.answers import AnswerMatcher
from qdr_jax.data.types import RetrievalDataset
from qdr_jax.fingerprint import input_fingerprints
from qdr_jax.index.lifecycle import IndexLifecycle, placeholder_quantizer
from qdr_jax.negatives.source import (NegativeSource, PhaseTimers, StepInputs, batch_indices,
                                      training_queries)
from qdr_jax.targets.encoders import Encoders
from qdr_jax.train import optim
from qdr_jax.train.metric_writers import MetricsWriter
from qdr_jax.train.checkpoint import Checkpointer, has_checkpoint
from qdr_jax.train.modes import Mode
from qdr_jax.train.resume import MetadataMismatchError, make_metadata, validate_metadata
from qdr_jax.train.signals import StopSignal
from qdr_jax.train.state import TrainState, init_state
from qdr_jax.train.step import StepFunctions, make_step_functions

# (params on the host, the index being searched) -> quantized metrics; process 0 only.
InLoopEval = Callable[[Any, faiss.Index], dict[str, float]]

__all__ = ["NonFiniteError", "TrainResult", "batch_indices", "train", "training_queries"]

# Step metrics that must be finite; the others (accuracies, learning rates) follow them.
_GUARDED_METRICS = ("loss", "contrastive_loss", "encoder_grad_norm", "row_grad_norm")


class NonFiniteError(FloatingPointError):
  """A step produced a NaN or infinite loss, gradient or update; raised at the next step
  whose metrics reach the host (a log, checkpoint or evaluation step), before anything of
  that step is logged or saved, naming the first step that went non-finite."""


@dataclasses.dataclass
class TrainResult:
  """What a finished (or preempted) run hands back.

  state: the final train state, still on the devices (the table row-sharded: read it
    with ``lifecycle.table_to_lead`` or search it with ``index.exact.exact_search``).
  params: the query encoder's parameters on the host.
  lifecycle: the run's index, whose quantizer the loss was trained against.
  """
  step: int
  preempted: bool = False
  state: TrainState | None = None
  params: Any = None
  lifecycle: IndexLifecycle | None = None
  train_seconds: float = 0.0
  seconds_per_step: dict[str, float] = dataclasses.field(default_factory=dict)


def train(config: ml_collections.ConfigDict, mode: Mode, dataset: RetrievalDataset,
          encoders: Encoders, table0, workdir: pathlib.Path,
          evaluate_fn: InLoopEval | None = None, *,
          initial_index: faiss.Index | None = None) -> TrainResult:
  """Runs ``config.train.steps`` steps from the (N, d) table ``table0`` (any array-like
  with row slicing, e.g. a memory-mapped ``.npy``; each device reads only its rows).

  With ``config.checkpoint.every`` > 0 the state is saved every that many steps and at the
  end, and SIGTERM saves after the current step and returns a preempted result. A workdir
  that already holds a checkpoint is resumed from it. ``evaluate_fn`` is called every
  ``config.eval.every`` steps and after the last one, on process 0, with an index of the
  table as it is at that step (``_eval_index``); its metrics rank the best checkpoints.

  Step metrics reach the host only at log (``train.log_every``), checkpoint and
  evaluation steps and the last, so the devices need not wait for the host in between. A
  NaN or infinite loss, gradient norm or updated value stops the run with
  ``NonFiniteError`` at the next such step, naming the step that first went non-finite,
  before anything of that step (or a later one) is logged or saved.

  A SIGTERM stops a single-process run after the current step; in a multi-process run
  the processes agree on stopping (a collective) at log and checkpoint steps only.

  Multi-process: every process loads its block of each batch and holds its rows of the
  table; process 0 owns FAISS and broadcasts the pool and the quantizer, and alone writes
  logs. Process 0 saves the FAISS index into every checkpoint, and a resume on any number
  of processes takes it over from there.

  ``initial_index``: an index over ``table0`` exactly as ``config.index`` builds it (e.g.
  the "before" evaluation's build with seed ``index.seed``), taken instead of building
  the first one; ignored when the run resumes. Single-process runs only.
  """
  with StopSignal(enabled=bool(config.checkpoint.every)) as stop:
    return _train(config, mode, dataset, encoders, table0, pathlib.Path(workdir),
                  evaluate_fn, stop, initial_index)


def _train(config, mode: Mode, dataset: RetrievalDataset, encoders: Encoders, table0,
           workdir: pathlib.Path, evaluate_fn: InLoopEval | None, stop: StopSignal,
           initial_index: faiss.Index | None = None) -> TrainResult:
  steps, num_rows = config.train.steps, len(dataset.corpus)
  multi, lead = jax.process_count() > 1, distributed.is_lead_process()
  run = _start_run(config, mode, dataset, encoders, table0, workdir, initial_index)
  state, start_step, lifecycle, source, fns = (run.state, run.start_step, run.lifecycle,
                                               run.source, run.fns)
  ckpt, writer, timers = run.ckpt, run.writer, run.timers

  # Overlap: the next batch's forward is dispatched before this step's update and its
  # search runs while the device updates; the next step's negatives, embeddings and VJP
  # then come from parameters one update old (a one-step-stale gradient). Exact mode
  # encodes after each update.
  overlap = bool(config.negatives.overlap)
  inputs = source.negatives(source.encode(start_step, state.params)) \
      if start_step < steps else None
  bar = tqdm(range(start_step, steps), initial=start_step, total=steps,
             desc=f"train {config.train.mode}", unit="step", disable=not lead)
  window = (time.perf_counter(), 0)
  train_start, stopping = time.perf_counter(), False
  profile = _Profile(config.train.profile_steps, workdir / "profile")
  watch = _FiniteWatch()
  for step in bar:
    done, last = step + 1, step + 1 == steps
    current: StepInputs = inputs
    profile.before(step)
    tick = time.perf_counter()
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      upcoming = source.encode(done, state.params) if overlap and not last else None
      state, metrics = fns.update(state, current.encoder_vjp, current.query_emb,
                                  current.pool_dev, lifecycle.loss_inputs.quantizer,
                                  lifecycle.loss_inputs.codes)
      searched = time.perf_counter()
      inputs = source.negatives(upcoming) if upcoming is not None else None
      searched = time.perf_counter() - searched  # counted by the source's own timers
      watch.add(done, metrics)
      log_due = done % config.train.log_every == 0 or last
      save_due = bool(ckpt is not None and config.checkpoint.every and (
          done % config.checkpoint.every == 0 or last))
      eval_due = bool(evaluate_fn is not None and config.eval.every and (
          done % config.eval.every == 0 or last))
      # All processes must stop after the same step: in a multi-process run that takes a
      # collective, so it is asked at log and checkpoint steps only (a single process
      # reads its flag at the end of the step).
      stopping = multi and (log_due or save_due) and _any_process(stop.requested)
      fetched = log_due or save_due or eval_due or stopping
      if fetched:  # waits for the step
        metrics = _fetch_finite_metrics(config, done, metrics, watch, bar, ckpt)
    profile.after(step)
    timers.seconds["step"] += time.perf_counter() - tick - searched
    window = (window[0], window[1] + 1)

    if mode.update_rows:
      lifecycle.note_updated(current.updated_rows)
    if not last and lifecycle.refresh_due(done):
      with timers.time("rebuild"):
        lifecycle.maybe_refresh(done, state.table, state.index_params)
    # A process that got SIGTERM still prepares the next batch in a multi-process job:
    # the others, which may not have it yet, need it for the collectives inside.
    if not overlap and not last and (multi or not stop.requested):
      inputs = source.negatives(source.encode(done, state.params))

    if log_due:
      now = time.perf_counter()
      writer.write({"step": done, **metrics, "encoder_lr": float(run.encoder_lr(step)),
                    "row_lr": float(run.row_lr(step)),
                    "steps_per_second": window[1] / (now - window[0]),
                    **_pool_stats(config, current),
                    **{f"seconds_{n}": v for n, v in timers.per_step(done - start_step).items()}})
      bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['pool_accuracy']:.2f}")
      window = (now, 0)

    eval_metrics = None
    # The last step too, so that the best-checkpoint ranking sees the final state.
    if eval_due:
      eval_metrics = _evaluate_in_loop(evaluate_fn, state, lifecycle, writer, done, multi,
                                       config, mode)
    if not multi and stop.requested:
      stopping = True
      if not fetched:  # a stop saves this step: check it first
        metrics = _fetch_finite_metrics(config, done, metrics, watch, bar, ckpt)
    if save_due or (stopping and ckpt is not None and config.checkpoint.every):
      # The index goes along (process 0 writes it): it may predate the table (built at
      # the last refresh), and so do the rows moved since, which its next incremental
      # refresh re-encodes.
      ckpt.save(state, _checkpoint_metadata(config, state, done, num_rows, run.digests),
                index=lifecycle.index, changed_rows=lifecycle.changed.mask(),
                metrics=eval_metrics)
    if stopping:
      break
  profile.stop()
  bar.close()
  writer.close()
  stop.release()
  if ckpt is not None:
    ckpt.wait_until_finished()
    ckpt.close()
  done_steps = int(distributed.global_to_host(state.step))
  if stopping:
    stop.acknowledge()
    logging.warning("stopped by signal after step %d; checkpoint saved", done_steps)
    return TrainResult(step=done_steps, preempted=True)
  train_seconds = time.perf_counter() - train_start
  return TrainResult(
      step=done_steps, state=state, params=distributed.global_to_host(state.params),
      lifecycle=lifecycle, train_seconds=train_seconds,
      seconds_per_step=timers.per_step(steps - start_step))


@dataclasses.dataclass
class _Run:
  """The components of one run, as ``_start_run`` builds (or resumes) them."""
  state: TrainState
  start_step: int
  lifecycle: IndexLifecycle
  source: NegativeSource
  fns: StepFunctions
  ckpt: Checkpointer | None
  writer: MetricsWriter
  timers: PhaseTimers
  encoder_lr: optim.Schedule
  row_lr: optim.Schedule
  digests: dict[str, str]


def _start_run(config, mode: Mode, dataset: RetrievalDataset, encoders: Encoders, table0,
               workdir: pathlib.Path, initial_index: faiss.Index | None = None) -> _Run:
  """Optimizers, the index, the state (fresh, or resumed from the workdir's latest
  checkpoint), the step functions and the negative source of a run."""
  corpus, steps, num_rows = dataset.corpus, config.train.steps, len(dataset.corpus)
  lead = distributed.is_lead_process()
  if lead:
    workdir.mkdir(parents=True, exist_ok=True)
  digests = input_fingerprints(corpus, encoders)  # recorded in and checked against checkpoints
  mesh = sharding.make_mesh(config.sharding)
  if config.train.batch_size % mesh.devices.size:
    raise ValueError(f"config.train.batch_size={config.train.batch_size} is not divisible "
                     f"by the {mesh.devices.size} devices of the mesh.")
  queries = training_queries(dataset.split(config.data.train_split), corpus,
                             config.negatives.max_positives)
  encoder_tx, encoder_lr = optim.make_encoder_optimizer(config.optim, steps)
  row_tx = optim.make_row_transform(config.optim)
  row_lr = optim.make_row_schedule(config.optim, steps)
  index_tx = (optim.make_index_optimizer(config.optim, steps, mode.learn)[0]
              if mode.learns_index else None)
  timers = PhaseTimers()

  lifecycle = IndexLifecycle(
      config.index, mesh=mesh, num_rows=num_rows,
      padded_rows=sharding.padded_rows(num_rows, mesh), quantize=mode.quantize,
      codes_from_index=config.quant.codes == "index", learn_index=mode.learns_index,
      shard_rows=config.sharding.shard_table)
  ckpt = (Checkpointer.from_config(config, workdir)
          if config.checkpoint.every or has_checkpoint(workdir) else None)
  resuming = ckpt is not None and ckpt.latest_step() is not None
  with timers.time("rebuild"):
    # A resumed run takes the checkpoint's index instead.
    if not resuming and initial_index is not None:
      if jax.process_count() > 1:
        raise ValueError("train(initial_index=...) is for single-process runs: every "
                         "process must build the first index alike.")
      lifecycle.adopt(initial_index, moved_since=False)
      logging.info("first index: the one given (%d rows), not rebuilt", initial_index.ntotal)
    elif not resuming:
      lifecycle.build(table0)
  quantizer = None
  if mode.learns_index:  # the index's, or placeholders of its shapes for the restore
    quantizer = (placeholder_quantizer(config.index.factory, table0.shape[1])
                 if resuming else lifecycle.loss_inputs.quantizer)
  state = init_state(config, mode, encoders.query_params, table0, quantizer, mesh,
                     encoder_tx, row_tx, index_tx, abstract_rows=resuming)
  writer = MetricsWriter(workdir / "metrics.jsonl", enabled=lead)
  start_step = 0
  if resuming:
    # Only the initial state's shapes and shardings are the restore's target (the rows
    # were never placed): the devices never hold the initial and the restored state
    # together.
    state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    with timers.time("rebuild"):
      state, start_step = _resume(config, ckpt, state, lifecycle, num_rows, writer, digests)
  writer.write_config(config, metric_tags=(
      "loss", f"eval_quantized/{config.eval.primary_metric}"))

  fns = make_step_functions(
      lambda p, **tokens: encoders.query_module.apply({"params": p}, **tokens),
      mode, config, encoder_tx, row_tx, row_lr, index_tx, mesh)
  relevance_fn = None
  if queries.answers is not None and config.negatives.hide_answer_matches:
    matcher = AnswerMatcher(corpus.texts)
    relevance_fn = lambda query_rows, rows: matcher.contains_answer_matrix(
        [queries.answers[q] for q in query_rows], rows)
  # Host randomness of a step derives from the state's key and the step alone, so resumed
  # and overlapped runs draw the same pools; computed up front because a JAX op in the
  # host path would queue behind the update in flight.
  source = NegativeSource(config, queries, encoders.tokenizer, fns.encode, mesh, lifecycle,
                          num_rows, _step_seeds(state.rng, steps), relevance_fn, timers)

  return _Run(state, start_step, lifecycle, source, fns, ckpt, writer, timers, encoder_lr,
              row_lr, digests)


class _Profile:
  """A ``jax.profiler`` trace of the steps ``[start, stop)`` (``train.profile_steps``)
  into ``directory``; ``start == stop`` traces nothing. Each step is also annotated
  (``StepTraceAnnotation``), so a trace started from outside shows steps too."""

  def __init__(self, steps: tuple[int, int], directory: pathlib.Path):
    self.start, self.end = (int(s) for s in steps)
    self.directory, self.running = directory, False

  def before(self, step: int) -> None:
    if step == self.start and self.start < self.end:
      jax.profiler.start_trace(str(self.directory))
      self.running = True

  def after(self, step: int) -> None:
    if step + 1 == self.end:
      self.stop()

  def stop(self) -> None:
    if self.running:
      jax.profiler.stop_trace()
      self.running = False
      logging.info("profile of steps %d-%d written under %s", self.start, self.end - 1,
                   self.directory)


class _FiniteWatch:
  """The first step whose guarded metrics or written values were not finite, and its
  metrics, kept on the devices (a small jitted update per step, no host wait) until the
  next step whose metrics are fetched."""

  def __init__(self):
    self.first_bad = None  # {"step": int32 (-1: none), "metrics": that step's metrics}

  def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
    if self.first_bad is None:
      self.first_bad = {"step": np.int32(-1), "metrics": metrics}
    self.first_bad = _watch_step(self.first_bad, metrics, np.int32(step))

  def fetch(self, metrics: dict[str, jax.Array]) -> tuple[int, dict, dict]:
    """(first bad step or -1, its metrics, ``metrics``) on the host."""
    first_bad, metrics = jax.device_get((self.first_bad, metrics))
    to_host = lambda m: {k: float(v) for k, v in m.items()}
    return int(first_bad["step"]), to_host(first_bad["metrics"]), to_host(metrics)


@jax.jit
def _watch_step(first_bad: dict, metrics: dict, step: jax.Array) -> dict:
  finite = metrics.get("updates_finite", jnp.float32(1)) > 0
  for name in _GUARDED_METRICS:
    if name in metrics:
      finite &= jnp.isfinite(metrics[name])
  new = (first_bad["step"] < 0) & ~finite
  return {"step": jnp.where(new, step, first_bad["step"]),
          "metrics": jax.tree.map(lambda old, now: jnp.where(new, now, old),
                                  first_bad["metrics"], metrics)}


def _fetch_finite_metrics(config, step: int, metrics: dict[str, jax.Array],
                          watch: _FiniteWatch, bar, ckpt: Checkpointer | None
                          ) -> dict[str, float]:
  """``step``'s metrics on the host, without the ``updates_finite`` flag; raises
  ``NonFiniteError`` (after letting earlier saves finish) when any step since the last
  fetch had a non-finite loss, gradient norm or written value."""
  first_bad, bad_metrics, metrics = watch.fetch(metrics)
  metrics.pop("updates_finite", None)
  if first_bad < 0:
    return metrics
  bar.close()
  if ckpt is not None:  # earlier steps' saves are good: let them finish
    ckpt.wait_until_finished()
    ckpt.close()
  updates_finite = bool(bad_metrics.pop("updates_finite", 1.0))
  message = _non_finite_message(config, first_bad, bad_metrics, updates_finite)
  if first_bad != step:
    message += f" Found at step {step}: nothing after step {first_bad - 1} was saved."
  raise NonFiniteError(message)


def _pool_stats(config, inputs: StepInputs) -> dict[str, float]:
  """How many distinct candidates the index returned for the pool, and the duplicates."""
  candidates = int(inputs.pool["num_candidates"])
  searched = (config.train.batch_size + config.negatives.pseudo_queries) * config.negatives.k
  return {"pool_candidates": candidates,
          "pool_duplicate_fraction": 1.0 - candidates / searched}


def _evaluate_in_loop(evaluate_fn: InLoopEval, state: TrainState, lifecycle: IndexLifecycle,
                      writer: MetricsWriter, step: int, multi: bool, config, mode: Mode
                      ) -> dict[str, float]:
  """In-training quantized metrics on process 0, shared with every process (their
  checkpoint managers rank by the same figures)."""
  params_host = distributed.global_to_host(state.params)  # collective: every process
  index = _eval_index(config, mode, lifecycle, state)  # collective too
  metrics = distributed.lead_work(evaluate_fn, params_host, index)  # process 0
  if metrics is not None:
    writer.write({"step": step, "eval_quantized": metrics})
  if multi:
    metrics = {n: float(v) for n, v in distributed.broadcast_arrays(
        None if metrics is None else {n: np.float32(v) for n, v in metrics.items()}).items()}
  return metrics


def _eval_index(config, mode: Mode, lifecycle: IndexLifecycle, state: TrainState
                ) -> faiss.Index | None:
  """An index of ``state.table`` as it is now (process 0; None elsewhere): the index a
  checkpoint of this step is served with, so that the figures that rank checkpoints
  are those of the checkpoint saved, not of the table of the last refresh.

  * learned index parameters: a copy of the run's index with the current ones written in
    and every row re-encoded, coarse quantizer kept (what ``export_bundle`` serves for
    such a run; a k-means retrain would discard them);
  * otherwise: a fresh build of the current table with ``config.index`` and its seed,
    streamed like the run's own builds; equal to ``build_quantized(table, config.index,
    config.index.seed)``, i.e. what ``export_bundle`` serves from the checkpoint;
  * a table that never moves (``query_only``) keeps the run's index, which is that build.

  The run's own index is left as it is: evaluation must not change the negatives, or
  ``eval.every`` would change the training.
  """
  if not mode.update_rows and not mode.learns_index:
    return lifecycle.index
  fresh = IndexLifecycle(
      config.index, mesh=lifecycle.mesh, num_rows=lifecycle.num_rows,
      padded_rows=lifecycle.padded_rows, quantize=False, codes_from_index=False,
      learn_index=False, shard_rows=lifecycle.shard_rows)
  if mode.learns_index:
    fresh.adopt(faiss.clone_index(lifecycle.index) if lifecycle.lead else None,
                moved_since=False)
    fresh.write_index_params(state.table, state.index_params, sync=False)
  else:
    fresh.build(state.table)
  return fresh.index


def _non_finite_message(config, step: int, metrics: dict[str, float],
                        updates_finite: bool) -> str:
  """What went non-finite at ``step`` (1-based) and the settings that likely caused it."""
  bad = [f"{k} is {metrics[k]}" for k in _GUARDED_METRICS
         if k in metrics and not np.isfinite(metrics[k])]
  if not updates_finite:
    bad.append("the updated rows, encoder or codebooks hold NaN/inf")
  lrs = (f"the learning rates (optim.encoder_lr={config.optim.encoder_lr}, "
         f"optim.row_lr={config.optim.row_lr})")
  temperature = float(config.loss.temperature)
  if not temperature > 0:
    cause = f"config.loss.temperature ({temperature}) must be > 0; also check {lrs}"
  elif np.isfinite(metrics.get("loss", np.nan)):
    cause = f"check {lrs} (the loss was finite: the update diverged)"
  else:
    cause = (f"check config.loss.temperature ({temperature}) and {lrs}; at the first "
             "step, also the table and encoder weights for NaN/inf")
  # The first is the root (a NaN loss makes every gradient NaN too).
  return f"{bad[0]} at step {step}: {cause}. Nothing of this step was saved."


def _checkpoint_metadata(config, state: TrainState, step: int, num_rows: int,
                         digests: dict[str, str]) -> dict:
  return make_metadata(config, step=step, corpus_size=num_rows, table_rows=state.table.shape[0],
                       dim=state.table.shape[1], table_dtype=str(state.table.dtype),
                       has_codebooks=state.index_params is not None, inputs=digests,
                       index_params=sorted(state.index_params or ()))


def _resume(config, ckpt: Checkpointer, state: TrainState, lifecycle: IndexLifecycle,
            num_rows: int, writer: MetricsWriter, digests: dict[str, str]
            ) -> tuple[TrainState, int]:
  """(state, step) of the workdir's latest readable checkpoint; the lifecycle takes over
  its index (or rebuilds one from the restored table, for a checkpoint saved without).

  The state (with its PRNG key), the FAISS index the loop was searching and the rows
  moved since its last refresh are restored (the index on process 0, its quantizer
  broadcast as after a build), and ``batch_indices`` is a pure function of the step, so
  the resumed steps repeat the uninterrupted run's exactly (except with
  ``negatives.overlap``: see docs/scaling.md). Log records past the checkpoint are
  dropped.
  """
  meta = ckpt.read_metadata()
  validate_metadata(meta, config, num_rows, state.table.shape[1], inputs=digests, resume=True)
  if meta.get("has_codebooks") and "index_params" not in meta:
    raise MetadataMismatchError(
        f"checkpoint {ckpt.step_path(meta['step'])} holds learned codebooks as "
        "'codebooks'/'codebook_opt_state', written before config.quant.learn moved them into "
        "TrainState.index_params: it cannot be resumed; export or evaluate it, or retrain.")
  restored = ckpt.restore(state, with_index=True)
  if restored.metadata["config"]["train"]["steps"] != config.train.steps:
    logging.warning("resuming with train.steps=%d, the checkpoint's run had %d: the "
                    "schedules differ from an uninterrupted run", config.train.steps,
                    restored.metadata["config"]["train"]["steps"])
  if restored.metadata.get("index_crc32") is not None:  # process 0 holds the index
    # Checkpoints that did not save the moved rows: re-add them all.
    lifecycle.adopt(restored.index, moved_since=True if restored.changed_rows is None
                    else restored.changed_rows)
  else:
    if restored.metadata.get("index_params"):
      logging.warning("checkpoint %s holds learned index parameters but no FAISS index "
                      "(a multi-process checkpoint of an older version): the index is "
                      "rebuilt with fresh k-means, which the learned parameters were not "
                      "trained with", ckpt.step_path(restored.step))
    lifecycle.build(restored.state.table, restored.step)
  writer.truncate_after(restored.step)
  logging.info("resumed from %s at step %d", ckpt.step_path(restored.step), restored.step)
  return restored.state, restored.step


def _any_process(flag: bool) -> bool:
  """Whether ``flag`` is set on any process (a SIGTERM may reach only some of them), so
  that all stop after the same step."""
  return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).any())


def _step_seeds(rng: jax.Array, steps: int) -> np.ndarray:
  """(steps, key words) host seeds: the raw data of ``fold_in(rng, step)`` per step."""
  base = jax.random.wrap_key_data(jax.device_get(jax.random.key_data(rng)))
  fold = jax.jit(jax.vmap(lambda s: jax.random.key_data(jax.random.fold_in(base, s))))
  return np.asarray(jax.device_get(fold(jnp.arange(max(steps, 1)))))
