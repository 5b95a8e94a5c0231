"""The workflows the experiment scripts run: train then evaluate, evaluate a config or a
checkpoint, compare modes.

This is the top of the package: it joins the trainer (``qdr_jax.train``) and the
evaluators (``qdr_jax.eval``), which do not import each other; the trainer receives its
in-loop evaluation as a callback.
"""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Iterator, Sequence

import ml_collections
import numpy as np
from absl import logging

from qdr_jax import distributed, sharding
from qdr_jax.config import apply_mode_spec
from qdr_jax.data.loader import load_dataset
from qdr_jax.eval.compare import (paired_comparison, summarize_seeds,
                                  with_pq_subquantizers)
from qdr_jax.eval.evaluator import evaluate_index, search_depth
from qdr_jax.eval.metrics import split_seen
from qdr_jax.eval.report import compare_table, format_table, subset_table
from qdr_jax.eval.table_eval import (EvalQueries, evaluate_splits, evaluate_table,
                                     mean_and_spread, run_files)
from qdr_jax.data.types import RetrievalDataset, Split
from qdr_jax.fingerprint import input_fingerprints
from qdr_jax.index.exact import exact_search
from qdr_jax.index.lifecycle import IndexLifecycle
from qdr_jax.targets.encoders import Encoders, embed_passages, embed_queries, load_encoders
from qdr_jax.targets.table import build_or_load_table
from qdr_jax.io_utils import check_writable_dir, workdir_lock, write_json_atomic
from qdr_jax.train.checkpoint import check_resumable, checkpoint_dir, has_checkpoint
from qdr_jax.train.loop import train
from qdr_jax.train.metric_writers import MetricsWriter
from qdr_jax.train.modes import configured_learn, mode_from_config
from qdr_jax.train.restore import restore_trained
from qdr_jax.validation import ConfigError, overlapping_queries, validate_config, validate_runs


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Trains per ``config`` and writes ``metrics.jsonl`` and ``results.json`` in ``workdir``.

  In a multi-process job (``config.distributed``, see ``qdr_jax.distributed``) every
  process trains its part; process 0 alone evaluates and writes files.

  A second concurrent run on the same workdir is refused (``WorkdirLockedError``).

  Returns:
    The results dictionary written to ``results.json`` (on other processes than 0, only
    ``process_index`` and ``steps``); ``{"preempted": True, "step"}`` after a SIGTERM.
  """
  distributed.initialize_distributed(config)  # before anything touches a device
  lead = distributed.is_lead_process()
  workdir = pathlib.Path(workdir)
  check_writable_dir(workdir)
  dataset, encoders = _validated_inputs(config)
  inputs = input_fingerprints(dataset.corpus, encoders)
  # Refuse a resume with another corpus, encoder or config before the corpus embedding.
  check_resumable(config, workdir, corpus_size=len(dataset.corpus), dim=_dim(encoders),
                  inputs=inputs)
  workdir.mkdir(parents=True, exist_ok=True)
  # Before any work: two runs on one workdir would interleave logs and checkpoints.
  with workdir_lock(workdir, enabled=lead):
    return _train_and_evaluate(config, workdir, lead, dataset, encoders, inputs)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: pathlib.Path, lead: bool,
                        dataset: RetrievalDataset, encoders: Encoders,
                        inputs: dict[str, str]) -> dict:
  mode = mode_from_config(config)
  corpus = dataset.corpus
  eval_split = dataset.split(config.data.eval_split)
  # The selection split: in-loop evaluation (and so best checkpoints) read it, never the
  # evaluated split; the final evaluation reports it beside the evaluated one.
  dev_split = dataset.split(config.data.dev_split) if config.data.dev_split else None
  cache_dir = pathlib.Path(config.table.cache_dir or workdir / "cache")
  table0 = build_or_load_table(config, corpus, cache_dir, embed_passages(encoders, config))

  def eval_queries(params, desc: str) -> dict[str, EvalQueries]:
    splits = {"eval": eval_split, **({"dev": dev_split} if dev_split is not None else {})}
    return {name: EvalQueries(embed_queries(encoders, params, split.queries.texts, config,
                                            desc=f"{desc} ({name})"),
                              split, seen_subsets(config, dataset, split))
            for name, split in splits.items()}

  def evaluate_in_loop(params, index) -> dict[str, float]:
    query_emb = embed_queries(encoders, params, dev_split.queries.texts, config, desc="eval")
    return evaluate_index(index, query_emb, dev_split, corpus, depth=config.eval.depth,
                          answer_ks=tuple(config.eval.answer_ks),
                          measures=tuple(config.eval.measures))

  start = time.perf_counter()
  start_index = []

  def evaluate_before() -> dict | None:
    # The initial table goes to the devices as training places it (in float32, as it is
    # evaluated), so no host holds it whole; training places its own copy.
    mesh = sharding.make_mesh(config.sharding)
    table = sharding.put_rows(table0, mesh, config.sharding.shard_table,
                              sharding.padded_rows(len(corpus), mesh), dtype=np.float32)
    lifecycle = IndexLifecycle(config.index, mesh=mesh, num_rows=len(corpus),
                               padded_rows=table.shape[0], quantize=False,
                               codes_from_index=False, learn_index=False,
                               shard_rows=config.sharding.shard_table)
    keep = start_index if mode.trains and distributed.jax.process_count() == 1 else None
    return _evaluate_on_devices(config, lifecycle, table,
                                eval_queries(encoders.query_params, "eval before"), corpus,
                                keep=keep)

  logging.info("evaluating before training")
  before = _before_metrics(config, workdir, evaluate_before, lead)
  if lead:
    logging.info("before: flat %s | quantized %s", before["eval"]["flat"],
                 before["eval"]["quantized"])
  trained = (train(config, mode, dataset, encoders, table0, workdir,
                   evaluate_in_loop if dev_split is not None else None,
                   initial_index=start_index.pop() if start_index else None)
             if mode.trains else None)
  if trained is not None and trained.preempted:
    # Stopped by SIGTERM after a checkpoint: no results yet; rerunning resumes.
    return {"preempted": True, "step": trained.step}
  after = before
  if trained is not None:
    logging.info("trained to step %d; evaluating after training", trained.step)
    final_index = None
    if mode.quantize:
      # The quantizer the loss was trained against, with the final table re-encoded (and
      # the learned index parameters written in): what serving without a retrain gives.
      trained.lifecycle.write_index_params(trained.state.table, trained.state.index_params,
                                           sync=False)
      final_index = trained.lifecycle.index
    after = _evaluate_on_devices(config, trained.lifecycle, trained.state.table,
                                 eval_queries(trained.params, "eval after"), corpus,
                                 served_index=final_index)
  if not lead:
    return {"process_index": distributed.jax.process_index(), "steps": config.train.steps}
  results = {"dataset": config.data.name, "model": config.model.query_encoder,
             "mode": config.train.mode, "index": before["eval"]["index"],
             "selection_split": config.data.dev_split or None,
             "before": before["eval"], **_provenance(config, inputs)}
  if overlap := overlapping_queries(config, dataset):  # allowed by data.allow_query_overlap
    results["query_overlap"] = {"count": len(overlap), "query_ids": overlap}
  if trained is not None:
    results.update(steps=config.train.steps, train_seconds=trained.train_seconds,
                   seconds_per_step=trained.seconds_per_step)
  else:
    results.update(steps=0, train_seconds=0.0,
                   seconds_per_step={k: 0.0 for k in ("encode", "search", "step", "rebuild")})
  results["after"] = after["eval"]
  if dev_split is not None:
    results["dev"] = {"split": config.data.dev_split, "count": len(dev_split.queries),
                      "before": before["dev"], "after": after["dev"]}
  results["total_seconds"] = time.perf_counter() - start
  write_json_atomic(workdir / "results.json", results)
  _write_eval_events(workdir, results)
  return results


def _write_eval_events(workdir: pathlib.Path, results: dict) -> None:
  """The evaluations before and after training as TensorBoard scalars ``eval/flat/...``
  and ``eval/quantized/...`` at step 0 and the last step, beside the training curves."""
  writer = MetricsWriter(workdir / "metrics.jsonl", enabled=True)
  for step, metrics in ((0, results["before"]), (results["steps"], results["after"])):
    writer.write_scalars(step, {"eval": {k: metrics[k] for k in ("flat", "quantized")}})
  writer.close()


def _evaluate_on_devices(config: ml_collections.ConfigDict, lifecycle: IndexLifecycle,
                         table, queries: dict[str, EvalQueries], corpus,
                         served_index=None, keep: list | None = None) -> dict | None:
  """`evaluate_splits` of the device table ``table`` (row-sharded over ``lifecycle``'s
  mesh) without a host copy of it; a collective: every process calls it with the same
  queries, and process 0 alone gets the result (None elsewhere).

  The flat figures come from the exact search on the devices (`exact_search`: process 0
  receives each query's top-k), the quantized ones from `IndexLifecycle.built_indexes`
  for ``eval.index_seeds`` (each training sample gathered, the rows streamed in), so
  process 0 holds the queries, their rankings, the training samples and the FAISS
  indexes (``eval.concurrent_builds`` at a time, beside ``served_index``), never an
  (N, d) float array. With ``keep``, seed ``index.seed``'s build is appended to it (for
  training to take over).
  """
  eval_cfg = config.eval
  flat = {name: exact_search(table, q.embeddings,
                             search_depth(q.split, corpus, eval_cfg.depth,
                                          tuple(eval_cfg.answer_ks)),
                             lifecycle.mesh, lifecycle.num_rows)
          for name, q in queries.items()}
  seeds = [int(s) for s in eval_cfg.index_seeds]
  builds = lifecycle.built_indexes(table, seeds, eval_cfg.concurrent_builds)
  if keep is not None:
    # Seed index.seed's build is the index training would build first (same table,
    # sample, seed and options): training takes it over instead of building it again.
    builds = _keeping(builds, seeds, int(config.index.seed), keep)
  if not lifecycle.lead:
    for _ in builds:  # every build is a collective: join each, in order
      pass
    return None
  return evaluate_splits(None, queries, corpus, config.index, eval_cfg,
                         served_index=served_index, quantized_indexes=builds,
                         flat_searches=flat)


def _keeping(indexes: Iterator, seeds: list[int], seed: int, kept: list) -> Iterator:
  """Passes ``indexes`` (one per seed of ``seeds``) through, appending seed ``seed``'s
  to ``kept``."""
  for index_seed, index in zip(seeds, indexes):
    if index_seed == seed:
      kept.append(index)
    yield index
    del index  # not held while the next one builds


def _validated_inputs(config: ml_collections.ConfigDict, *, training: bool = True
                      ) -> tuple[RetrievalDataset, Encoders]:
  """The run's data set and encoders, once the config is validated against them.

  The config alone is checked before anything is loaded, then against the corpus, the
  splits and the encoder's dimension: every refusal comes before the (long) corpus
  embedding and before the workdir is touched.
  """
  validate_config(config, training=training)
  dataset = load_dataset(config.data)
  encoders = load_encoders(config.model)
  validate_config(config, dataset=dataset, dim=_dim(encoders), training=training)
  return dataset, encoders


def seen_subsets(config: ml_collections.ConfigDict, dataset: RetrievalDataset, split: Split
                 ) -> dict[str, list[str]] | None:
  """{'seen', 'unseen'} query ids of the evaluated split (`split_seen` against the
  training split's positives), or None when the data set has no training split or the
  evaluated split names no positives (answers only: nothing to match)."""
  if config.data.train_split not in dataset.splits or not split.qrels:
    return None
  seen, unseen = split_seen(split.qrels, dataset.split(config.data.train_split).qrels,
                            [str(q) for q in split.queries.ids])
  return {"seen": seen, "unseen": unseen}


def _evaluation_fields(metrics: dict) -> dict:
  """What results.json of `evaluate_config` / `evaluate_checkpoint` keeps of an
  `evaluate_table` result."""
  keys = ("flat", "quantized", "quantized_std", "quantized_per_seed", "subsets", "per_query")
  return {k: metrics[k] for k in keys if k in metrics}


def _evaluation_text(config: ml_collections.ConfigDict, metrics: dict) -> str:
  text = format_table({"flat": metrics["flat"], config.index.factory: metrics["quantized"]},
                      {config.index.factory: metrics["quantized_std"]})
  metric = config.eval.primary_metric
  if "subsets" in metrics and metric in metrics["quantized"]:
    text += "\n\n" + subset_table({"": metrics}, metric)
  return text


def _dim(encoders: Encoders) -> int:
  return encoders.query_module.config.hidden_size


def _provenance(config: ml_collections.ConfigDict, inputs: dict[str, str]) -> dict:
  """What a results file records to be checked later: the whole config and the corpus
  and encoder fingerprints (`qdr_jax.fingerprint`)."""
  return {"config": json.loads(config.to_json_best_effort()), "input_fingerprints": inputs}


def _before_metrics(config, workdir: pathlib.Path, compute, lead: bool) -> dict | None:
  """The "before" evaluation (``compute``, a collective: process 0's result, None
  elsewhere); a resumed run (the workdir has a checkpoint) reads it back from
  ``eval_before.json`` when the config is unchanged, so its results.json reports the
  same figures without re-embedding and re-indexing. Process 0 decides and tells the
  others, so that all skip ``compute`` alike: another process could see the files
  otherwise (process 0 finalises the last checkpoint after the others' waits return).
  Process 0 writes the file only after ``compute``, which every process has joined."""
  path = workdir / "eval_before.json"
  key = json.loads(config.to_json_best_effort())
  # Where the job runs (coordinator, process count, timeouts) does not change what it
  # computes: a resume on another port reads the figures back.
  key.pop("distributed", None)

  def saved_before() -> dict | None:
    if path.exists() and has_checkpoint(workdir):
      saved = json.loads(path.read_text())
      if saved.get("config") == key:
        return saved["before"]
    return None

  saved = saved_before() if lead else None
  if distributed.broadcast_from_lead(lambda: np.int32(saved is not None), np.int32(0)):
    return saved
  before = compute()
  if lead:
    write_json_atomic(path, {"config": key, "before": before}, indent=None)
  return before


def evaluate_config(config: ml_collections.ConfigDict, workdir: pathlib.Path
                    ) -> tuple[dict, str]:
  """Embeds (or loads the cached table), evaluates both indexes, writes results.json.

  Returns:
    (results, printable table).
  """
  check_writable_dir(workdir)
  dataset, encoders = _validated_inputs(config, training=False)
  workdir.mkdir(parents=True, exist_ok=True)
  with workdir_lock(workdir, enabled=distributed.is_lead_process()):
    return _evaluate_config(config, workdir, dataset, encoders)


def _evaluate_config(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                     dataset: RetrievalDataset, encoders: Encoders) -> tuple[dict, str]:
  split = dataset.split(config.data.eval_split)
  cache_dir = pathlib.Path(config.table.cache_dir or workdir / "cache")
  table = build_or_load_table(config, dataset.corpus, cache_dir,
                              embed_passages(encoders, config))
  query_emb = embed_queries(encoders, encoders.query_params, split.queries.texts, config)
  metrics = evaluate_table(table, query_emb, split, dataset.corpus, config.index, config.eval,
                           seen_subsets(config, dataset, split), runs_dir=workdir)
  results = {"dataset": config.data.name, "model": config.model.query_encoder,
             "split": config.data.eval_split,
             "run_files": [str(p) for p in run_files(workdir, config.eval.index_seeds).values()],
             "index": {"factory": config.index.factory, **metrics["index"]},
             **_evaluation_fields(metrics),
             **_provenance(config, input_fingerprints(dataset.corpus, encoders))}
  write_json_atomic(workdir / "results.json", results)
  return results, _evaluation_text(config, metrics)


def evaluate_checkpoint(workdir: str | pathlib.Path, *, step: int | None = None,
                        config: ml_collections.ConfigDict | None = None,
                        out: str | pathlib.Path | None = None) -> tuple[dict, str]:
  """Evaluates a checkpoint's query encoder and table on flat and quantized indexes.

  The quantized index is rebuilt over the trained table for each of
  ``config.eval.index_seeds``, as the "after" figures of training are. Writes
  ``out`` (default ``{workdir}/eval_step_{step}.json``).

  Args:
    workdir: the training workdir.
    step: checkpoint step; None = the latest readable one.
    config: optional config (e.g. to change the eval split or the index); it must match
      the checkpoint's model, dimension and corpus size. None = the checkpoint's config.
      Either way the corpus and encoder must have the fingerprints the checkpoint
      recorded (`restore_trained`); a refusal writes nothing.
    out: results path.

  Returns:
    (results, printable table).
  """
  if config is not None:
    validate_config(config, training=False)
  trained = restore_trained(workdir, step=step, config=config)
  config, dataset = trained["config"], trained["dataset"]
  validate_config(config, dataset=dataset, dim=int(trained["table"].shape[1]), training=False)
  split = dataset.split(config.data.eval_split)
  query_emb = embed_queries(trained["encoders"], trained["params"], split.queries.texts,
                            config)
  metrics = evaluate_table(trained["table"], query_emb, split, dataset.corpus, config.index,
                           config.eval, seen_subsets(config, dataset, split))
  results = {"dataset": config.data.name, "model": config.model.query_encoder,
             "split": config.data.eval_split, "step": trained["step"],
             "checkpoint": str(checkpoint_dir(workdir) / str(trained["step"])),
             "index": {"factory": config.index.factory, **metrics["index"]},
             **_evaluation_fields(metrics),
             # Checked equal to the current files by restore_trained.
             **_provenance(config, trained["metadata"].get("input_fingerprints", {}))}
  out = pathlib.Path(out) if out else pathlib.Path(workdir) / f"eval_step_{trained['step']}.json"
  write_json_atomic(out, results)
  return results, _evaluation_text(config, metrics)


def compare_modes(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                  levels: Sequence[int], modes: Sequence[str], seeds: int = 1) -> dict:
  """Trains each mode at each level; writes and returns the compare.json summary.

  With ``seeds`` > 1 every (level, mode) trains once per training seed ``config.seed``,
  ``config.seed + 1``, ... (in ``pq{level}/{mode}/seed{seed}``; one seed keeps
  ``pq{level}/{mode}``) with the k-means seed ``config.index.seed``, ``+ 1``, ... of the
  index it trains with and serves, each evaluated on ``config.eval.index_seeds``. A level's entry
  gives per mode the mean, the spread ('modes_std', 'modes_min', 'modes_max': over the
  training seeds' index-seed means, or over the index seeds with one training seed) and,
  under 'paired', sign-flip tests of each mode against 'dback' and 'query_only' (when
  compared) on ``config.eval.primary_metric``: over the (training seed, index seed) cells
  and over queries, on all queries and the seen / unseen subsets. 'subsets' gives each
  mode's quantized metrics on those subsets.

  Every (level, mode, seed) config is validated before the first one trains.
  """
  if seeds < 1:
    raise ConfigError([f"compare_modes needs seeds >= 1, got {seeds}."])
  learned = configured_learn(config)
  if learned:
    # A mode spec adds its index parameters to the config's, so every compared mode,
    # plain dback and query_only included, would silently learn these too.
    raise ConfigError([(
        f"compare_modes: the base config learns index parameters (config.quant.learn="
        f"{learned}), which every compared mode would inherit; start from a plain mode "
        f"(e.g. --config=configs/demo.py:mode=dback) and name what a mode learns in its "
        f"spec (--modes=dback,dback+codebooks+centroids).")])
  check_writable_dir(workdir)
  cache_dir = config.table.cache_dir or str(workdir / "cache")
  train_seeds = [config.seed + i for i in range(seeds)]
  runs = {(level, mode, seed): _run_config(config, level, mode, cache_dir, seed)
          for level in levels for mode in modes for seed in train_seeds}
  describe = {id(cfg): f"level {level}, mode {mode!r}, seed {seed}"
              for (level, mode, seed), cfg in runs.items()}
  validate_runs(list(runs.values()), lambda cfg: describe[id(cfg)])
  dataset, encoders = load_dataset(config.data), load_encoders(config.model)
  validate_runs(list(runs.values()), lambda cfg: describe[id(cfg)], dataset=dataset,
                dim=_dim(encoders))
  subsets = seen_subsets(config, dataset, dataset.split(config.data.eval_split))
  del dataset, encoders  # each run loads its own
  workdir.mkdir(parents=True, exist_ok=True)
  lead = distributed.is_lead_process()  # every process trains; process 0 summarises
  # Each run also locks its own workdir; this one guards compare.json.
  with workdir_lock(workdir, enabled=lead):
    return _compare_modes(config, workdir, levels, modes, train_seeds, runs, subsets, lead)


# The modes every other mode is tested against, when they are compared.
PAIRED_REFERENCES = ("dback", "query_only")


def _compare_modes(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                   levels: Sequence[int], modes: Sequence[str], train_seeds: Sequence[int],
                   runs: dict, subsets: dict | None, lead: bool) -> dict:
  metric = config.eval.primary_metric
  summary: dict = {"dataset": config.data.name, "steps": config.train.steps,
                   "training_seeds": list(train_seeds), "metric": metric, "levels": []}
  for level in levels:
    entry: dict = {"modes": {}, "modes_std": {}}
    afters: dict[str, list[dict]] = {}
    devs: dict[str, list[dict]] = {}
    for mode in modes:
      afters[mode] = []
      for seed in train_seeds:
        run_cfg = runs[level, mode, seed]
        run_dir = workdir / f"pq{level}" / mode
        if len(train_seeds) > 1:
          run_dir = run_dir / f"seed{seed}"
        results = _finished_run(run_cfg, run_dir) or train_and_evaluate(run_cfg, run_dir)
        if not lead:
          continue
        afters[mode].append(results["after"])
        if "dev" in results:
          devs.setdefault(mode, []).append(results["dev"])
        entry["bytes_per_vector"] = results["index"]["bytes_per_vector"]
        entry["factory"] = run_cfg.index.factory
        summary.setdefault("flat_before", results["before"]["flat"])
      if not lead:
        continue
      stats = summarize_seeds(afters[mode])
      entry["modes"][mode], entry["modes_std"][mode] = stats["mean"], stats["std"]
      entry["spread_over"] = stats["spread_over"]
      for key, name in (("min", "modes_min"), ("max", "modes_max"),
                        ("per_training_seed", "modes_per_training_seed"),
                        ("subsets", "subsets")):
        if key in stats:
          entry.setdefault(name, {})[mode] = stats[key]
      _add_served(entry.setdefault("served", {}), mode, afters[mode], metric)
      if devs.get(mode):
        entry.setdefault("dev", {})[mode] = _dev_summary(devs[mode], metric)
      write_json_atomic(workdir / "compare.json",
                        summary | {"levels": summary["levels"] + [entry]})
    if not lead:
      continue
    for key, evaluations in (("paired", afters), ("served_paired", _served(afters))):
      entry[key] = {
          mode: {f"vs_{ref}": paired_comparison(evaluations[mode], evaluations[ref], metric,
                                                subsets)
                 for ref in PAIRED_REFERENCES if ref in modes and ref != mode}
          for mode in modes}
    summary["levels"].append(entry)
    print(f"\n{entry['factory']} ({entry['bytes_per_vector']:.0f} bytes/vector), quantized "
          f"test metrics after training ({len(train_seeds)} training seed(s)):")
    print(compare_table(summary["flat_before"], entry, metric))
  if lead:
    write_json_atomic(workdir / "compare.json", summary)
  return summary


def _dev_summary(devs: list[dict], metric: str) -> dict:
  """One mode's ``metric`` on the selection split over its training seeds: mean and
  spread of the flat index before and after training, fresh quantized builds after, and
  the served index (its training quantizer, where it has one)."""
  columns = {"flat before": [d["before"]["flat"][metric] for d in devs],
             "quantized before": [d["before"]["quantized"][metric] for d in devs],
             "flat after": [d["after"]["flat"][metric] for d in devs],
             "quantized after": [d["after"]["quantized"][metric] for d in devs],
             "served": [d["after"].get("served", d["after"])["quantized"][metric]
                        for d in devs]}
  return {"split": devs[0]["split"], "count": devs[0]["count"],
          "mean": {k: float(np.mean(v)) for k, v in columns.items()},
          "std": {k: float(np.std(v)) for k, v in columns.items()}}


def _served(afters: dict[str, list[dict]]) -> dict[str, list[dict]]:
  """Each mode's evaluations of the index it serves: its training quantizer ('served')
  where it has one, otherwise the fresh builds over its table."""
  return {mode: [after.get("served", after) for after in runs] for mode, runs in afters.items()}


def _add_served(served: dict, mode: str, afters: list[dict], metric: str) -> None:
  """Adds ``mode``'s served-index summary (mean, spread, subsets, its flat index after
  training and the served / flat ratio of ``metric``) to a level's 'served' entry."""
  stats = summarize_seeds(_served({mode: afters})[mode])
  flat = mean_and_spread([after["flat"] for after in afters])[0]
  for key, value in (("modes", stats["mean"]), ("modes_std", stats["std"]), ("flat", flat),
                     ("served_over_flat", stats["mean"][metric] / flat[metric]
                      if flat[metric] else None),
                     ("subsets", stats.get("subsets"))):
    served.setdefault(key, {})[mode] = value


# Config sections that cannot change a run's results (a resumed run equals an
# uninterrupted one), left out when a finished run is matched to a compare's config.
_RESULT_NEUTRAL = ("checkpoint",)


def _finished_run(config: ml_collections.ConfigDict, run_dir: pathlib.Path) -> dict | None:
  """The results of an earlier run of ``config`` in ``run_dir`` (a compare rerun after a
  stop skips the runs it finished), or None. Every process reads the file (the workdir
  is on storage all of them see), so all skip the same runs."""
  path = run_dir / "results.json"
  if not path.exists():
    return None
  results = json.loads(path.read_text())
  saved = results.get("config", {})
  wanted = json.loads(config.to_json_best_effort())
  same = all(saved.get(k) == v for k, v in wanted.items() if k not in _RESULT_NEUTRAL)
  if not same or set(saved) - set(wanted):
    return None
  logging.info("reusing the finished run in %s", run_dir)
  return results


def _run_config(config: ml_collections.ConfigDict, level: int, mode: str, cache_dir: str,
                seed: int) -> ml_collections.ConfigDict:
  """``config`` for one (PQ level, mode, training seed) run of `compare_modes`.

  ``mode`` is a mode spec (`qdr_jax.config.split_mode_spec`): a mode name, optionally
  followed by index parameters it learns on top of ``config.quant.learn`` and config
  overrides, so that ``dback+codebooks+centroids`` or
  ``dback+codebooks+centroids@loss.distill_weight=0.5`` compare against plain ``dback`` in
  one summary.
  """
  run_cfg = config.copy_and_resolve_references()
  # Each training seed draws its own k-means too: the index a run serves (the last k-means
  # rebuild, or the one a learned index starts from) is one draw, and on SciFact one
  # seed's draw served about 0.02 nDCG@10 more than the others' for every training seed;
  # with one shared draw, served figures compare that draw, not the modes. A mode spec's
  # own index.seed wins.
  run_cfg.index.seed = config.index.seed + seed - config.seed
  try:
    factory = with_pq_subquantizers(config.index.factory, level)
    apply_mode_spec(run_cfg, mode)
  except ValueError as e:
    raise ConfigError([str(e)]) from None
  with run_cfg.unlocked():
    run_cfg.index.factory = factory
    run_cfg.table.cache_dir = cache_dir
    run_cfg.seed = seed
  return run_cfg
