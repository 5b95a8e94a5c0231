r"""Seconds per train step, split by phase, against the encoder's forward+backward floor.

  python benchmarks/bench_step.py --config=configs/demo.py:mode=dback --workdir=runs/demo --steps=30

Runs ``--steps`` real training steps of the config's mode on its data, reusing the table
cache of the workdir (``mode=dback``: the paper's step, which docs/benchmarks.md compares with
the reference recipe; the demo's default also learns the index, about 0.13 s more a step)
and times, on the same batch shape, one jitted forward+backward of the query
encoder alone: a train step cannot cost less than that. Prints and writes
``{workdir}/bench_step.json`` (or ``--out``) with the per-phase seconds and the ratio.

Overlapped search at scale, on a CPU-only host:

  python benchmarks/bench_step.py --config=configs/demo.py:mode=dback --workdir=runs/demo \
      --synthetic_rows=1000000 --emulate_device_core --config.negatives.k=500 \
      --config.index.factory=IVF1024_HNSW32,PQ48x8 --config.index.nprobe=128 \
      --config.negatives.overlap=True

``--synthetic_rows`` grows the corpus with unlabelled rows drawn around the real ones, so
the index search costs what it would on a large corpus. ``--emulate_device_core`` pins
XLA's threads to core 0 and the host thread (tokenizing, FAISS with one thread, pool
building) to core 1, so that the jitted step and the search run side by side as on a
host with an accelerator; the floor is timed under the same pinning.

Host seconds per step (``host_seconds_per_step``): the median, over the steady steps, of
the wall seconds from the moment a step's update has been dispatched to the moment the
next step's query forward has been dispatched (``overlap=False``). The devices run the
update during that interval; whatever of it the host spends waiting for the update's
results, converting metrics or in collectives, instead of already preparing the next
batch, is time the devices then wait on the host. On 8 simulated devices:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/bench_step.py \
      --config=configs/demo.py:mode=dback --workdir=runs/demo --steps=30
"""

import os
import threading

import json
import pathlib
import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from qdr_jax import host_memory, platform
from qdr_jax.cli import run_main
from qdr_jax.data.loader import load_dataset
from qdr_jax.data.types import Corpus, RetrievalDataset
from qdr_jax.index import set_num_threads
from qdr_jax.targets.encoders import embed_passages, load_encoders
from qdr_jax.targets.table import build_or_load_table
from qdr_jax.train import loop as train_loop
from qdr_jax.train.loop import train
from qdr_jax.negatives.source import (NegativeSource, batch_indices, query_tokens,
                                      training_queries)
from qdr_jax.train.step import StepFunctions
from qdr_jax.train.modes import mode_from_config

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (its table cache is reused).")
_STEPS = flags.DEFINE_integer("steps", 30, "Train steps to time (the first 3 compile).")
_SYNTHETIC_ROWS = flags.DEFINE_integer(
    "synthetic_rows", 0, "Grow the corpus to this many rows with synthetic passages (0: off).")
_EMULATE_DEVICE = flags.DEFINE_bool(
    "emulate_device_core", False, "Pin XLA to core 0 and the host thread to core 1.")
_OUT = flags.DEFINE_string("out", "", "Result JSON (default {workdir}/bench_step.json).")
_WARMUP = 3
flags.mark_flags_as_required(["config", "workdir"])


def encoder_forward_backward_seconds(encoders, config, texts, repeats=5) -> float:
  """Median seconds of one jitted forward+backward of the query encoder on a batch."""
  tokens = query_tokens(encoders.tokenizer, texts, config.model, jax.device_count())
  module = encoders.query_module

  @jax.jit
  def fwd_bwd(params):
    return jax.grad(lambda p: module.apply({"params": p}, **tokens).sum())(params)

  jax.block_until_ready(fwd_bwd(encoders.query_params))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fwd_bwd(encoders.query_params))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


class DispatchGaps:
  """Records, per step, the wall seconds from the return of the update's dispatch to the
  return of the next step's forward dispatch (see the module docstring), by wrapping the
  loop's step functions and ``NegativeSource.encode`` while in use."""

  def __init__(self):
    self.gaps: list[float] = []
    self._dispatched: float | None = None

  def __enter__(self):
    make_fns, encode = train_loop.make_step_functions, NegativeSource.encode

    def update(fn):
      def timed(*args, **kwargs):
        out = fn(*args, **kwargs)
        self._dispatched = time.perf_counter()
        return out
      return timed

    def timed_encode(source, *args, **kwargs):
      out = encode(source, *args, **kwargs)
      if self._dispatched is not None:
        self.gaps.append(time.perf_counter() - self._dispatched)
        self._dispatched = None
      return out

    train_loop.make_step_functions = lambda *a, **k: (lambda fns: StepFunctions(
        fns.encode, update(fns.update)))(make_fns(*a, **k))
    NegativeSource.encode = timed_encode
    self._restore = (make_fns, encode)
    return self

  def __exit__(self, *exc):
    train_loop.make_step_functions, NegativeSource.encode = self._restore


def with_synthetic_rows(dataset: RetrievalDataset, table: np.ndarray, rows: int, seed: int = 0
                        ) -> tuple[RetrievalDataset, np.ndarray]:
  """The dataset with unlabelled passages appended up to ``rows``; their vectors are real
  rows plus noise, renormalised, so the index's lists fill like a larger corpus's."""
  extra = rows - len(dataset.corpus)
  if extra <= 0:
    return dataset, table
  rng = np.random.default_rng(seed)
  dim = table.shape[1]
  synthetic = np.empty((extra, dim), np.float32)
  for start in range(0, extra, 100_000):  # in blocks: no float64 copy of the whole table
    n = min(100_000, extra - start)
    block = table[rng.integers(0, len(table), n)] + rng.normal(
        scale=0.5 / np.sqrt(dim), size=(n, dim)).astype(np.float32)
    synthetic[start:start + n] = block / np.linalg.norm(block, axis=1, keepdims=True)
  corpus = dataset.corpus
  ids = [f"synthetic-{i}" for i in range(extra)]
  grown = Corpus(ids=list(corpus.ids) + ids, titles=list(corpus.titles) + [""] * extra,
                 texts=list(corpus.texts) + [""] * extra)
  return (RetrievalDataset(f"{dataset.name}+{extra}-synthetic", grown, dataset.splits),
          np.concatenate([table, synthetic]))


def pin_device_and_host_threads() -> None:
  """XLA's threads on core 0, this (host) thread on core 1, FAISS single-threaded.

  Run after a jitted computation has created XLA's thread pool; threads it starts later
  inherit core 0 from the pool.
  """
  if len(os.sched_getaffinity(0)) < 2:
    raise SystemExit("--emulate_device_core needs at least 2 cores.")
  host = threading.get_native_id()
  for tid in map(int, os.listdir("/proc/self/task")):
    os.sched_setaffinity(tid, {1} if tid == host else {0})
  set_num_threads(1)


def main(argv):
  del argv
  config = _CONFIG.value
  workdir = pathlib.Path(_WORKDIR.value)
  with config.unlocked():
    config.train.steps = _STEPS.value
    # Records at the warm-up step and the last, so the phases difference out compiling;
    # steps between them are not logged, as in a run with train.log_every > 1.
    config.train.log_every = _WARMUP
    config.eval.every = 0
    if _SYNTHETIC_ROWS.value:
      config.index.rebuild_every = _STEPS.value + 1  # time steps and searches, not builds
  dataset = load_dataset(config.data)
  encoders = load_encoders(config.model)
  table = build_or_load_table(config, dataset.corpus,
                              pathlib.Path(config.table.cache_dir or workdir / "cache"),
                              embed_passages(encoders, config))
  if _SYNTHETIC_ROWS.value:
    dataset, table = with_synthetic_rows(dataset, table, _SYNTHETIC_ROWS.value)
  queries = training_queries(dataset.split(config.data.train_split), dataset.corpus)
  texts = [queries.texts[i] for i in batch_indices(0, len(queries.texts),
                                                    config.train.batch_size, config.seed)]
  if _EMULATE_DEVICE.value:
    jax.block_until_ready(jax.jit(lambda x: x @ x)(np.ones((64, 64), np.float32)))
    pin_device_and_host_threads()
  floor = encoder_forward_backward_seconds(encoders, config, texts)
  bench_dir = workdir / "bench_step"
  bench_dir.mkdir(parents=True, exist_ok=True)
  (bench_dir / "metrics.jsonl").unlink(missing_ok=True)
  with DispatchGaps() as gaps:
    train(config, mode_from_config(config), dataset, encoders,
          table, bench_dir)
  records = [json.loads(l) for l in (bench_dir / "metrics.jsonl").read_text().splitlines()]
  records = [r for r in records if "step" in r and "seconds_step" in r]
  # Cumulative per-phase means are logged; difference out the compile steps.
  last, first = records[-1], next(r for r in records if r["step"] == _WARMUP)
  steady = _STEPS.value - _WARMUP
  phases = {p: (last[f"seconds_{p}"] * _STEPS.value - first[f"seconds_{p}"] * _WARMUP) / steady
            for p in ("encode", "search", "step", "rebuild")}
  whole = sum(phases.values())
  result = {"config": config.data.name, "batch_size": config.train.batch_size,
            "k": config.negatives.k, "mode": config.train.mode,
            "overlap": bool(config.negatives.overlap), "rows": len(table),
            "index": config.index.factory, "nprobe": config.index.nprobe,
            "emulated_device_core": _EMULATE_DEVICE.value,
            "devices": jax.device_count(), "platform": jax.devices()[0].platform,
            "host_heap_kept": host_memory.applied, "cpu_model": platform.cpu_model(),
            "device_kind": platform.device_kind(),
            "seconds_per_step": phases, "whole_step_seconds": whole,
            "encoder_forward_backward_seconds": floor, "ratio": whole / floor,
            "host_seconds_per_step": float(np.median(gaps.gaps[_WARMUP:]))
            if len(gaps.gaps) > _WARMUP else None}
  pathlib.Path(_OUT.value or workdir / "bench_step.json").write_text(
      json.dumps(result, indent=1))
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  run_main(main)
