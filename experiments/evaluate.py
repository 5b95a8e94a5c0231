r"""Evaluates a retriever on flat and quantized indexes: a config's as is, or a checkpoint's.

  python experiments/evaluate.py --config=configs/demo.py --workdir=runs/demo
  python experiments/evaluate.py --config=configs/demo.py --workdir=runs/demo \
      --config.index.nprobe=64
  # A training workdir with checkpoints: its config is read from the checkpoint.
  python experiments/evaluate.py --workdir=runs/demo [--step=200]

Without checkpoints, embeds the corpus and writes ``{workdir}/results.json`` and TREC run
files of each search: ``run.flat.trec`` and ``run.quantized.seed{s}.trec`` for each seed of
``config.eval.index_seeds``. With checkpoints, restores the trained query encoder and table
(the latest step, or ``--step``) and writes ``{workdir}/eval_step_{step}.json``; a
``--config`` given as well must describe the same model, dimension and corpus (it may
change the eval split, the index or the metrics).
"""

import json
import pathlib

from absl import app, flags, logging
from ml_collections import config_flags

from qdr_jax.cli import run_main
from qdr_jax.experiment import evaluate_checkpoint, evaluate_config
from qdr_jax.train.checkpoint import has_checkpoint

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for caches and results.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  workdir = pathlib.Path(_WORKDIR.value)
  if has_checkpoint(workdir):
    results, table = evaluate_checkpoint(workdir, step=_STEP.value, config=_CONFIG.value)
    out = workdir / f"eval_step_{results['step']}.json"
  elif _CONFIG.value is None:
    raise app.UsageError(f"{workdir} has no checkpoint: give --config")
  elif _STEP.value is not None:
    raise app.UsageError(f"--step given but {workdir} has no checkpoint")
  else:
    results, table = evaluate_config(_CONFIG.value, workdir)
    out = workdir / "results.json"
  print(table)
  logging.info("results: %s", json.dumps(results))
  print("wrote " + ", ".join([str(out)] + results.get("run_files", [])))


if __name__ == "__main__":
  run_main(main)
