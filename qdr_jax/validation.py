"""One validation pass over a run's config and inputs before any expensive work.

`validate_config` checks every value's type and range, the known enums, the index
factory (parsed by FAISS on an untrained dummy), the values that depend on the model or
the metrics (sequence lengths against the encoder's positions, read from its
config.json; the eval depth against every measure's cut-off; the primary metric among
those computed), ambiguous input files, and, given the data set and the embedding
dimension, everything that otherwise fails only after the corpus has been embedded: too
few points per centroid, a batch larger than the training queries, nprobe above nlist, k
above the corpus size, a table file of the wrong dtype, empty queries, test queries that
are also training queries. It collects every problem and raises them together as one
`ConfigError`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from qdr_jax.data.pseudo import PSEUDO_QUERY_SOURCES
from qdr_jax.data.types import Corpus, RetrievalDataset, Split
# The evaluator's own parser, so that validation accepts exactly what it will.
from qdr_jax.eval.metrics import _parse as parse_measure  # pylint: disable=protected-access
from qdr_jax.index.build import MIN_POINTS_PER_CENTROID
from qdr_jax.index.layout import factory_layout
from qdr_jax.index.rules import check_index_for_mode
from qdr_jax.models.loading import max_input_tokens
from qdr_jax.train.modes import MODES, mode_from_config

# The enumerated settings and their allowed values.
ENUMS: dict[str, tuple] = {
    "data.format": ("beir", "dpr", "squad"),
    "model.dtype": ("float32", "bfloat16"),
    "model.passage_style": ("concat", "pair"),
    "model.pooling": ("", "cls", "mean", "ance"),
    "table.init": ("encode", "npy", "faiss"),
    "table.dtype": ("float32", "bfloat16"),
    "loss.multi_positive": ("mean", "marginal"),
    "quant.codes": ("index", "recompute"),
    "negatives.pseudo_query_source": PSEUDO_QUERY_SOURCES,
    "optim.row_optimizer": ("adam", "sgd"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "optim.row_schedule": ("shared", "constant"),
    "optim.clip_scope": ("encoder", "all"),
    "train.mode": tuple(MODES),
    "distributed.cpu_collectives": ("", "gloo", "mpi"),
}

# (key, lower bound, strict, upper bound or None): numbers and their ranges.
_RANGES: tuple[tuple[str, float, bool, float | None], ...] = (
    ("seed", 0, False, None),
    ("data.max_passages", 0, False, None),
    ("data.test_fraction", 0, True, 1),
    ("data.dev_queries", 0, False, None),
    ("model.max_query_length", 1, False, None),
    ("model.max_passage_length", 1, False, None),
    ("model.embed_batch_size", 1, False, None),
    ("table.embed_chunk_rows", 0, False, None),
    ("index.nprobe", 1, False, None),
    ("index.ef_search", 0, False, None),
    ("index.train_size", 0, False, None),
    ("index.opq_niter", 1, False, None),
    ("eval.concurrent_builds", 1, False, None),
    ("index.rebuild_every", 0, False, None),
    ("index.full_rebuild_every", 0, False, None),
    ("negatives.k", 1, False, None),
    ("negatives.pool_size", 0, False, None),
    ("negatives.max_positives", 0, False, None),
    ("loss.temperature", 0, True, None),
    ("loss.distill_weight", 0, False, None),
    ("loss.balance_weight", 0, False, None),
    ("negatives.pseudo_queries", 0, False, None),
    ("optim.encoder_lr", 0, False, None),
    ("optim.row_lr", 0, False, None),
    ("optim.codebook_lr", 0, False, None),
    ("optim.centroid_lr", 0, False, None),
    ("optim.rotation_lr", 0, False, None),
    ("optim.warmup_steps", 0, False, None),
    ("optim.decay_steps", 0, False, None),
    ("optim.end_lr_fraction", 0, False, 1),
    ("optim.weight_decay", 0, False, None),
    ("optim.grad_clip", 0, False, None),
    ("train.batch_size", 1, False, None),
    ("train.steps", 0, False, None),
    ("train.log_every", 1, False, None),
    ("eval.every", 0, False, None),
    ("eval.depth", 1, False, None),
    ("sharding.num_devices", 0, False, None),
    ("distributed.num_processes", 1, False, None),
    ("distributed.process_id", 0, False, None),
    ("distributed.timeout_seconds", 1, False, None),
    ("checkpoint.every", 0, False, None),
    ("checkpoint.keep", 1, False, None),
    ("checkpoint.keep_best", 0, False, None),
)
# Keys that must hold whole numbers (the others of _RANGES may be floats).
_FLOATS = {"data.test_fraction", "loss.temperature", "loss.distill_weight",
           "loss.balance_weight", "optim.encoder_lr", "optim.row_lr",
           "optim.codebook_lr", "optim.centroid_lr", "optim.rotation_lr",
           "optim.end_lr_fraction", "optim.weight_decay", "optim.grad_clip"}
# What a table file may hold: floats are cast losslessly enough; integers are not embeddings.
_TABLE_DTYPES = (np.float16, np.float32, np.float64)


class ConfigError(ValueError):
  """Config values or inputs a run would use wrongly; one line per problem."""

  def __init__(self, problems: Sequence[str]):
    self.problems = list(problems)
    super().__init__("\n".join(self.problems))


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def _problem(key: str, value: Any, expected: str) -> str:
  return f"config.{key}={value!r}: expected {expected}"


def _check_ranges(config: ml_collections.ConfigDict, problems: list[str]) -> None:
  for key, low, strict, high in _RANGES:
    value = _get(config, key)
    is_int = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if key in _FLOATS:
      if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) \
          or not math.isfinite(value):
        problems.append(_problem(key, value, "a finite number"))
        continue
    elif not is_int:
      problems.append(_problem(key, value, "an integer"))
      continue
    bound = f"> {low}" if strict else f">= {low}"
    if high is not None:
      bound = f"in ({low}, {high}]" if strict else f"in [{low}, {high}]"
    if value < low or (strict and value == low) or (high is not None and value > high):
      problems.append(_problem(key, value, f"a number {bound}"))


def _check_enums(config: ml_collections.ConfigDict, problems: list[str]) -> None:
  for key, allowed in ENUMS.items():
    value = _get(config, key)
    if value not in allowed:
      problems.append(_problem(key, value, "one of " + ", ".join(map(repr, allowed))))


def _check_settings(config: ml_collections.ConfigDict, problems: list[str]) -> None:
  """Relations between settings that need no data."""
  index = config.index
  if not isinstance(index.factory, str) or not index.factory.strip():
    problems.append(_problem("index.factory", index.factory, "a FAISS index_factory string"))
  if (isinstance(index.full_rebuild_every, int) and isinstance(index.rebuild_every, int)
      and index.full_rebuild_every > 0
      and (index.rebuild_every <= 0 or index.full_rebuild_every % index.rebuild_every)):
    problems.append(_problem("index.full_rebuild_every", index.full_rebuild_every,
                             f"a multiple of config.index.rebuild_every="
                             f"{index.rebuild_every} (or 0)"))
  optim = config.optim
  if (isinstance(optim.decay_steps, int) and isinstance(optim.warmup_steps, int)
      and 0 < optim.decay_steps <= optim.warmup_steps):
    problems.append(_problem("optim.decay_steps", optim.decay_steps,
                             f"0 or > config.optim.warmup_steps={optim.warmup_steps}"))
  learn = config.quant.learn
  if not isinstance(learn, (tuple, list)) or not all(isinstance(p, str) for p in learn):
    problems.append(_problem("quant.learn", learn, 'a tuple of "codebooks", "centroids", '
                             '"rotation"'))
  elif config.train.mode in MODES:
    try:
      mode_from_config(config)
    except ValueError as e:
      problems.append(str(e))
  if config.table.init in ("npy", "faiss") and not config.table.path:
    problems.append(_problem("table.path", config.table.path,
                             f"a file for config.table.init={config.table.init!r}"))
  seeds = config.eval.index_seeds
  if (not isinstance(seeds, (tuple, list)) or not seeds
      or not all(isinstance(s, int) and s >= 0 for s in seeds)):
    problems.append(_problem("eval.index_seeds", seeds, "a non-empty tuple of seeds >= 0"))
  measures = config.eval.measures
  for measure in measures if isinstance(measures, (tuple, list)) else [measures]:
    try:
      parse_measure(str(measure))
    except ValueError:
      problems.append(_problem("eval.measures", measure, "ir_measures names such as "
                               "'nDCG@10', 'MRR@10', 'R@100'"))
  ks = config.eval.answer_ks
  if (not isinstance(ks, (tuple, list)) or not ks
      or not all(isinstance(k, int) and k >= 1 for k in ks)):
    problems.append(_problem("eval.answer_ks", ks, "a non-empty tuple of cut-offs >= 1"))
  _check_selection(config, problems)
  profile, steps = config.train.profile_steps, config.train.steps
  if (not isinstance(profile, (tuple, list)) or len(profile) != 2
      or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in profile)
      or profile[0] > profile[1]
      or (isinstance(steps, int) and profile[1] > max(steps, profile[0]))):
    problems.append(_problem("train.profile_steps", profile,
                             f"(start, stop) with 0 <= start <= stop <= config.train.steps="
                             f"{steps} (start == stop: no trace)"))
  dist = config.distributed
  if (isinstance(dist.process_id, int) and isinstance(dist.num_processes, int)
      and dist.process_id >= dist.num_processes >= 1):
    problems.append(_problem("distributed.process_id", dist.process_id,
                             f"< config.distributed.num_processes={dist.num_processes}"))


def _check_selection(config: ml_collections.ConfigDict, problems: list[str]) -> None:
  """What selects (in-loop evaluation, best checkpoints) reads the dev split, which must
  be neither the trained nor the evaluated split."""
  data = config.data
  dev = data.dev_split
  if not isinstance(dev, str):
    problems.append(_problem("data.dev_split", dev, "a split name or \"\""))
    return
  if dev and dev in (data.train_split, data.eval_split):
    problems.append(_problem("data.dev_split", dev, "a split other than data.train_split="
                             f"{data.train_split!r} and data.eval_split={data.eval_split!r}"))
  if not dev and isinstance(data.dev_queries, int) and data.dev_queries > 0:
    problems.append(_problem("data.dev_split", dev,
                             f"a split name to carve data.dev_queries={data.dev_queries} into"))
  # Best checkpoints are ranked by the in-loop evaluation, so this check covers them too.
  if not dev and isinstance(config.eval.every, int) and config.eval.every > 0:
    problems.append(_problem("eval.every", config.eval.every, "0 without a selection split: "
                             "in-loop evaluation reads data.dev_split, never the test split "
                             "(set data.dev_split, and data.dev_queries to carve one)"))


def _check_dependencies(config: ml_collections.ConfigDict, problems: list[str]) -> None:
  """Values that depend on the encoder, the metrics or the input files, checked before
  anything is loaded."""
  model = config.model
  lengths = [("model.max_query_length", model.query_encoder)]
  if config.table.init == "encode":
    lengths.append(("model.max_passage_length", model.passage_encoder or model.query_encoder))
  for key, encoder in lengths:
    value = _get(config, key)
    limit = max_input_tokens(encoder) if isinstance(encoder, str) and encoder else None
    if limit is not None and isinstance(value, int) and value > limit:
      # Positions past the table embed as NaN (or out-of-range gathers), found only once
      # the corpus has been embedded.
      problems.append(_problem(key, value, f"<= {limit}, the positions of encoder "
                               f"{encoder!r} (max_position_embeddings in its config.json)"))
  ev = config.eval
  measures = [str(m) for m in ev.measures] if isinstance(ev.measures, (tuple, list)) else []
  if isinstance(ev.depth, int) and not isinstance(ev.depth, bool):
    deeper = {}  # measure -> its cut-off, where rankings of ev.depth would cut it short
    for measure in measures:
      try:
        cutoff = parse_measure(measure).params.get("cutoff")
      except ValueError:  # reported by _check_settings
        continue
      if isinstance(cutoff, int) and cutoff > ev.depth:
        deeper[measure] = cutoff
    if deeper:
      problems.append(_problem(
          "eval.depth", ev.depth, f">= {max(deeper.values())}, the cut-offs of "
          f"config.eval.measures {', '.join(map(repr, deeper))} (rankings {ev.depth} deep "
          "would report them wrong)"))
  answers = ([f"top{k}" for k in ev.answer_ks] if isinstance(ev.answer_ks, (tuple, list))
             else [])
  if ev.primary_metric not in measures + answers:
    problems.append(_problem("eval.primary_metric", ev.primary_metric,
                             "one of config.eval.measures " + repr(tuple(measures))
                             + " or an answer accuracy top{k} of config.eval.answer_ks"))
  data = config.data
  if data.format == "beir" and isinstance(data.root, str) and data.root:
    from qdr_jax.data.loader import resolve_path  # pylint: disable=g-import-not-at-top
    root = resolve_path(data.root)
    if os.path.isfile(root):
      problems.append(f"config.data.root={data.root!r}: a file; config.data.format='beir' "
                      "reads a directory with corpus.jsonl, queries.jsonl and qrels/ (a "
                      "SQuAD JSON file is format 'squad')")
    for name in ("corpus.jsonl", "queries.jsonl"):
      both = [f for f in (name, name + ".gz") if os.path.isfile(os.path.join(root, f))]
      if len(both) == 2:
        problems.append(f"config.data.root={data.root!r}: holds both {name} and {name}.gz; "
                        "remove the one that should not be read")
  if data.format == "squad" and isinstance(data.root, str) and data.root:
    from qdr_jax.data.loader import resolve_path  # pylint: disable=g-import-not-at-top
    if os.path.isdir(resolve_path(data.root)):
      problems.append(f"config.data.root={data.root!r}: a directory; config.data.format="
                      "'squad' reads a SQuAD v1.1 JSON file (a BEIR directory is format "
                      "'beir')")


def _check_quantization_terms(config: ml_collections.ConfigDict, warnings: list[str]) -> None:
  """Optional loss terms and pseudo-queries set where they do nothing (warnings)."""
  loss, mode = config.loss, MODES.get(config.train.mode)
  if mode is None or not mode.trains:
    return
  if not mode.quantize:
    for key in ("distill_weight", "balance_weight"):
      if loss[key]:
        warnings.append(f"config.loss.{key}={loss[key]!r}: ignored by the non-quantizing "
                        f"mode {config.train.mode!r}")
  if (config.negatives.pseudo_queries and config.negatives.pseudo_query_source != "positive"
      and not (mode.quantize and loss.distill_weight)):
    warnings.append(f"config.negatives.pseudo_queries={config.negatives.pseudo_queries!r} "
                    "without the distillation term (config.loss.distill_weight > 0 in a "
                    "quantizing mode) or config.negatives.pseudo_query_source='positive': their "
                    "candidates only add negatives to the pool")


def check_table_file(path: str | os.PathLike, *, num_rows: int | None = None,
                     dim: int | None = None, key: str = "table.path") -> str | None:
  """A problem with an ``.npy`` table file, read from its header only; None if fine.

  Refuses what loading would silently cast (an integer table) and a shape that does not
  match the corpus and the encoder.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    return f"config.{key}: {path} does not exist"
  try:  # memory-mapped: reads the header, not the data
    array = np.load(path, mmap_mode="r", allow_pickle=False)
  except (OSError, ValueError) as e:
    return f"config.{key}: {path} is not a readable .npy array ({e})"
  shape, dtype = array.shape, array.dtype
  del array
  if dtype not in _TABLE_DTYPES:
    return (f"config.{key}: {path} holds {dtype} values; expected a floating-point "
            "embedding table")
  if len(shape) != 2:
    return f"config.{key}: {path} has shape {shape}; expected (passages, dim)"
  if num_rows is not None and shape[0] != num_rows:
    return f"config.{key}: {path} has {shape[0]} rows; the corpus has {num_rows} passages"
  if dim is not None and shape[1] != dim:
    return f"config.{key}: {path} has dimension {shape[1]}; the encoder gives {dim}"
  return None


def _check_index(config: ml_collections.ConfigDict, dim: int, num_rows: int | None,
                 training: bool, problems: list[str], warnings: list[str]) -> None:
  """The factory parsed by FAISS for ``dim`` and the mode; its training needs."""
  index = config.index
  try:
    mode = mode_from_config(config)
  except ValueError:  # reported by _check_settings; check the factory on its own
    training = False
    mode = MODES["posthoc"]
  try:
    check_index_for_mode(index.factory, dim, needs_quantizer=training and mode.quantize,
                         learn=mode.learn if training else (),
                         incremental=training and index.full_rebuild_every > 0)
    layout = factory_layout(index.factory, dim)
  except ValueError as e:
    problems.append(f"config.index.factory={index.factory!r}: {e}")
    return
  if training and mode.quantize and layout["rabitq_bits"]:
    _check_rabitq_training(config, layout["rabitq_bits"], problems)
  nlist = layout["nlist"]
  if nlist and index.nprobe > nlist:
    problems.append(_problem("index.nprobe", index.nprobe,
                             f"<= nlist={nlist} of {index.factory!r}"))
  if num_rows is None:
    return
  points = min(index.train_size, num_rows) if index.train_size > 0 else num_rows
  source = (f"config.index.train_size={index.train_size}" if 0 < index.train_size < num_rows
            else f"the corpus's {num_rows} passages")
  for stage, centroids in layout["clusterings"]:
    if points < centroids:
      problems.append(f"config.index.factory={index.factory!r}: its {stage} needs at least "
                      f"{centroids} training points, {source} give {points}")
    elif points < MIN_POINTS_PER_CENTROID * centroids:
      warnings.append(f"config.index.factory={index.factory!r}: {source} give {points} "
                      f"training points for the {stage} ({centroids} centroids), fewer "
                      f"than the {MIN_POINTS_PER_CENTROID * centroids} FAISS recommends "
                      f"({MIN_POINTS_PER_CENTROID} per centroid)")


def _check_rabitq_training(config: ml_collections.ConfigDict, nb_bits: int,
                           problems: list[str]) -> None:
  """What the straight-through loss cannot score on a RaBitQ index: multi-bit codes it
  would have to encode, and the terms that read PQ codebooks or score without RaBitQ's
  per-row constant."""
  factory = config.index.factory
  if nb_bits > 1 and config.quant.codes != "index":
    problems.append(_problem("quant.codes", config.quant.codes,
                             f"'index' on the {nb_bits}-bit RaBitQ index {factory!r} (JAX "
                             "reads its codes, it does not encode them)"))
  for key in ("distill_weight", "balance_weight"):
    if config.loss[key]:
      problems.append(_problem(f"loss.{key}", config.loss[key],
                               f"0 on the RaBitQ index {factory!r} (the term is PQ's)"))


def _queries_with_positives(split: Split, corpus: Corpus) -> int:
  """How many queries of ``split`` train: those with a positive passage in the corpus
  (as `qdr_jax.negatives.source.training_queries` selects them), in one vectorised lookup."""
  owners, doc_ids = [], []
  for q, qid in enumerate(split.queries.ids):
    positives = split.positives(qid)
    owners.extend([q] * len(positives))
    doc_ids.extend(positives)
  found = corpus.find_rows(doc_ids) >= 0
  return int(np.unique(np.asarray(owners, dtype=np.int64)[found]).size)


def overlapping_queries(config: ml_collections.ConfigDict, dataset: RetrievalDataset
                        ) -> list[str]:
  """Query ids of the evaluated split that are also in the training split (none when
  the config evaluates on the training split itself, deliberately)."""
  train, test = config.data.train_split, config.data.eval_split
  if train == test or train not in dataset.splits or test not in dataset.splits:
    return []
  seen = {str(q) for q in dataset.splits[train].queries.ids}
  return [str(q) for q in dataset.splits[test].queries.ids if str(q) in seen]


def _check_data(config: ml_collections.ConfigDict, dataset: RetrievalDataset,
                num_devices: int | None, training: bool, problems: list[str]) -> None:
  """Settings against the data set: splits, queries, corpus size, batch."""
  num_rows = len(dataset.corpus)
  mode_trains = (training and config.train.mode in MODES and MODES[config.train.mode].trains
                 and config.train.steps != 0)
  k = config.negatives.k
  if mode_trains and isinstance(k, int) and k > num_rows:
    problems.append(_problem("negatives.k", k, f"<= the corpus's {num_rows} passages"))
  wanted = [("data.eval_split", config.data.eval_split)]
  if mode_trains:
    wanted.append(("data.train_split", config.data.train_split))
  if config.data.dev_split:
    wanted.append(("data.dev_split", config.data.dev_split))
  for key, name in wanted:
    if name not in dataset.splits:
      problems.append(_problem(key, name, f"a split of {dataset.name!r}: "
                               + ", ".join(sorted(dataset.splits))))
      continue
    queries = dataset.splits[name].queries
    empty = [qid for qid, text in zip(queries.ids, queries.texts) if not text.strip()]
    if empty:
      problems.append(f"config.{key}={name!r}: {len(empty)} queries have empty text "
                      f"(ids {', '.join(map(repr, empty[:5]))}{', ...' if len(empty) > 5 else ''})")
    if key == "data.train_split" and isinstance(config.train.batch_size, int):
      count = _queries_with_positives(dataset.splits[name], dataset.corpus)
      if config.train.batch_size > count:
        problems.append(_problem("train.batch_size", config.train.batch_size,
                                 f"<= the {count} queries of split {name!r} with a positive "
                                 "passage in the corpus"))
  overlap = overlapping_queries(config, dataset) if mode_trains else []
  if overlap and not config.data.allow_query_overlap:
    problems.append(f"config.data.eval_split={config.data.eval_split!r}: {len(overlap)} of its "
                    f"queries are also in config.data.train_split="
                    f"{config.data.train_split!r} (ids {', '.join(map(repr, overlap[:5]))}"
                    f"{', ...' if len(overlap) > 5 else ''}); they would be trained on and "
                    "reported as test queries (config.data.allow_query_overlap=True runs "
                    "anyway and records the overlap in results.json)")
  if (mode_trains and num_devices and isinstance(config.train.batch_size, int)
      and config.train.batch_size % num_devices):
    problems.append(_problem("train.batch_size", config.train.batch_size,
                             f"a multiple of the {num_devices} devices"))
  pseudo = config.negatives.pseudo_queries
  if mode_trains and isinstance(pseudo, int) and pseudo:
    if num_devices and pseudo % num_devices:  # encoded in one batch with the queries
      problems.append(_problem("negatives.pseudo_queries", pseudo,
                               f"a multiple of the {num_devices} devices"))
    if pseudo > num_rows:
      problems.append(_problem("negatives.pseudo_queries", pseudo,
                               f"<= the corpus's {num_rows} passages"))


def validate_config(config: ml_collections.ConfigDict, *,
                    dataset: RetrievalDataset | None = None, dim: int | None = None,
                    num_devices: int | None = None, training: bool = True) -> list[str]:
  """Checks ``config`` (and, when given, its data and dimension) before any work.

  Args:
    config: the full experiment config.
    dataset: the loaded data set; enables the checks against the corpus and the splits.
    dim: the embedding dimension; enables the FAISS factory checks.
    num_devices: devices the batch is split over; None = ``config.sharding.num_devices``
      (0: every visible device).
    training: the run trains (False: it only evaluates, so the training split, the
      batch, the negatives and the mode's needs of the index are not checked).

  Returns:
    Warnings (also logged): settings that work but are likely poor.

  Raises:
    ConfigError: every problem found, one line each, naming the key, the value and what
      was expected.
  """
  problems: list[str] = []
  warnings: list[str] = []
  _check_ranges(config, problems)
  _check_enums(config, problems)
  _check_settings(config, problems)
  _check_dependencies(config, problems)
  if training:
    _check_quantization_terms(config, warnings)
  num_rows = len(dataset.corpus) if dataset is not None else None
  if dim is not None and isinstance(config.index.factory, str) and config.index.factory:
    _check_index(config, dim, num_rows, training, problems, warnings)
  if config.table.init == "npy" and config.table.path:
    problem = check_table_file(config.table.path, num_rows=num_rows, dim=dim)
    if problem:
      problems.append(problem)
  if dataset is not None:
    # Checked once the data is loaded: JAX's backend (and the job's processes) are up.
    requested = config.sharding.num_devices
    if (isinstance(requested, int) and requested and jax.process_count() > 1
        and requested != jax.device_count()):
      problems.append(_problem(
          "sharding.num_devices", requested,
          f"0 (every device) or {jax.device_count()} in a job of {jax.process_count()} "
          "processes: the mesh must hold devices of every process"))
    if num_devices is None and isinstance(requested, int):
      num_devices = requested or jax.device_count()
    _check_data(config, dataset, num_devices, training, problems)
  if problems:
    raise ConfigError(problems)
  for warning in warnings:
    logging.warning("%s", warning)
  return warnings


def validate_runs(configs: Sequence[ml_collections.ConfigDict],
                  describe: Callable[[ml_collections.ConfigDict], str], **kwargs) -> None:
  """Validates several run configs (``compare.py``'s modes and levels) before the first
  trains; every problem of every run is reported, each prefixed by ``describe(config)``."""
  problems: list[str] = []
  for config in configs:
    try:
      validate_config(config, **kwargs)
    except ConfigError as e:
      problems.extend(f"{describe(config)}: {p}" for p in e.problems)
  if problems:
    raise ConfigError(problems)
