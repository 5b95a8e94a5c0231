r"""Seconds per train step, split by phase, against the encoder's forward+backward floor.

  python experiments/bench_step.py --config=configs/demo.py --workdir=runs/demo --steps=30

Runs ``--steps`` real DBACK steps on the config's data (the table cache of the workdir is
reused) and times, on the same batch shape, one jitted forward+backward of the query
encoder alone: a train step cannot cost less than that. Prints and writes
``{workdir}/bench_step.json`` with the per-phase seconds and the ratio.
"""

import json
import pathlib
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from qdr_jax.data.loader import load_dataset
from qdr_jax.models import tokenize
from qdr_jax.targets.encoders import embed_passages, load_encoders
from qdr_jax.targets.table import build_or_load_table
from qdr_jax.train.loop import batch_indices, train, training_queries
from qdr_jax.train.modes import get_mode

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (its table cache is reused).")
_STEPS = flags.DEFINE_integer("steps", 30, "Train steps to time (the first 3 compile).")
_WARMUP = 3
flags.mark_flags_as_required(["config", "workdir"])


def encoder_forward_backward_seconds(encoders, config, texts, repeats=5) -> float:
  """Median seconds of one jitted forward+backward of the query encoder on a batch."""
  tokens = tokenize(encoders.tokenizer, texts, config.model.max_query_length,
                    pad_to_multiple_of=config.model.length_bucket)
  module = encoders.query_module

  @jax.jit
  def fwd_bwd(params):
    return jax.grad(lambda p: module.apply({"params": p}, tokens["input_ids"],
                                           tokens["attention_mask"],
                                           tokens["token_type_ids"]).sum())(params)

  jax.block_until_ready(fwd_bwd(encoders.query_params))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fwd_bwd(encoders.query_params))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main(argv):
  del argv
  config = _CONFIG.value
  workdir = pathlib.Path(_WORKDIR.value)
  with config.unlocked():
    config.train.steps = _STEPS.value
    config.train.log_every = 1
    config.eval.every = 0
  dataset = load_dataset(config.data)
  encoders = load_encoders(config.model)
  table = build_or_load_table(config, dataset.corpus,
                              pathlib.Path(config.table.cache_dir or workdir / "cache"),
                              embed_passages(encoders, config))
  queries = training_queries(dataset.split(config.data.train_split), dataset.corpus)
  texts = [queries.texts[i] for i in batch_indices(0, len(queries.texts),
                                                    config.train.batch_size, config.seed)]
  floor = encoder_forward_backward_seconds(encoders, config, texts)
  bench_dir = workdir / "bench_step"
  bench_dir.mkdir(parents=True, exist_ok=True)
  (bench_dir / "metrics.jsonl").unlink(missing_ok=True)
  train(config, get_mode(config.train.mode, config.quant.learn_codebooks), dataset, encoders,
        table, bench_dir)
  records = [json.loads(l) for l in (bench_dir / "metrics.jsonl").read_text().splitlines()]
  # Cumulative per-phase means are logged each step; difference out the compile steps.
  last, first = records[-1], records[_WARMUP - 1]
  steady = _STEPS.value - _WARMUP
  phases = {p: (last[f"seconds_{p}"] * _STEPS.value - first[f"seconds_{p}"] * _WARMUP) / steady
            for p in ("encode", "search", "step", "rebuild")}
  whole = sum(phases.values())
  result = {"config": config.data.name, "batch_size": config.train.batch_size,
            "k": config.negatives.k, "mode": config.train.mode,
            "devices": jax.device_count(), "platform": jax.devices()[0].platform,
            "seconds_per_step": phases, "whole_step_seconds": whole,
            "encoder_forward_backward_seconds": floor, "ratio": whole / floor}
  (workdir / "bench_step.json").write_text(json.dumps(result, indent=1))
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  app.run(main)
