r"""Embeds a corpus, builds flat and quantized indexes and evaluates both.

  python experiments/evaluate.py --config=configs/demo.py --workdir=runs/demo
  python experiments/evaluate.py --config=configs/demo.py --workdir=runs/demo \
      --config.index.nprobe=64

Writes ``{workdir}/results.json`` and TREC run files for both indexes.
"""

import json
import pathlib

from absl import app, flags, logging
from ml_collections import config_flags

from qdr_jax.eval.evaluate import evaluate_config

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for caches and results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  results, table = evaluate_config(_CONFIG.value, pathlib.Path(_WORKDIR.value))
  print(table)
  logging.info("results: %s", json.dumps(results))


if __name__ == "__main__":
  app.run(main)
