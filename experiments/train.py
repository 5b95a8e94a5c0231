r"""Trains a retriever with DBACK (or a peer mode) and evaluates flat vs quantized.

  python experiments/train.py --config=configs/demo.py --workdir=runs/demo
  python experiments/train.py --config=configs/squad.py --workdir=runs/squad \
      --config.train.steps=300

Writes ``{workdir}/metrics.jsonl`` during training and ``{workdir}/results.json`` at the end.
With ``--config.checkpoint.every=N`` the state is saved under ``{workdir}/checkpoints``;
rerunning the same command resumes from the latest one, and SIGTERM saves and exits.
"""

import pathlib

from absl import app, flags
from ml_collections import config_flags

from qdr_jax import distributed
from qdr_jax.eval.report import before_after_table
from qdr_jax.experiment import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for caches, metrics and results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  results = train_and_evaluate(_CONFIG.value, pathlib.Path(_WORKDIR.value))
  if results.get("preempted"):
    print(f"stopped at step {results['step']} (checkpoint saved); rerun to resume")
    return
  if distributed.is_lead_process():  # the other processes of a job have no results
    print(before_after_table(results))


if __name__ == "__main__":
  app.run(main)
