r"""Runs every training mode at two compression levels on one data set, same budget.

  python experiments/compare.py --config=configs/demo.py:mode=dback --workdir=runs/compare-scifact
  python experiments/compare.py --config=configs/squad.py --workdir=runs/compare-squad \
      --levels=48,16 --modes=posthoc,query_only,jpq,dback_no_ste,dback
  python experiments/compare.py --config=configs/demo.py:mode=dback --workdir=runs/compare-3x3 --seeds=3

Each (level, mode) trains in its own sub-directory from the same cached table, seeds and
step budget; ``{workdir}/compare.json`` gathers the quantized test metrics (mean over the
config's index seeds), the seen / unseen query subsets and paired tests against ``dback``
and ``query_only``, and ``{workdir}/compare.png`` plots the primary metric against bytes
per vector, with the flat index before training as the reference line. ``--seeds=3``
trains every mode with 3 training seeds (config.seed, +1, +2), each with its own k-means
draw for the index it trains with and serves (config.index.seed, +1, +2) and each
evaluated on the config's index seeds: means, error bars and tests are then over
training seeds.
A mode may name index parameters it learns on top of ``config.quant.learn``:
``--modes=query_only,jpq,dback,dback+codebooks+centroids``. So the base config must learn
none itself, or every mode would (refused): the demo's default mode learns the centroids
and codebooks, hence ``configs/demo.py:mode=dback`` above.
"""

import json
import pathlib

from absl import flags, logging
from ml_collections import config_flags

from qdr_jax import distributed
from qdr_jax.cli import run_main
from qdr_jax.eval.compare import plot_comparison
from qdr_jax.experiment import compare_modes

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
_LEVELS = flags.DEFINE_list("levels", ["48", "16"],
                            "PQ sub-quantizer counts (bytes per vector at 8 bits).")
_MODES = flags.DEFINE_list("modes", ["posthoc", "query_only", "jpq", "dback_no_ste", "dback"],
                           "Training modes to compare.")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Training seeds per (level, mode).", lower_bound=1)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  workdir = pathlib.Path(_WORKDIR.value)
  summary = compare_modes(_CONFIG.value, workdir, [int(m) for m in _LEVELS.value],
                          list(_MODES.value), seeds=_SEEDS.value)
  if not distributed.is_lead_process():  # process 0 of a multi-process job summarises
    return
  plot_comparison(summary, _CONFIG.value.eval.primary_metric, workdir / "compare.png")
  logging.info("wrote %s", workdir / "compare.json")
  print(json.dumps(summary, indent=1))


if __name__ == "__main__":
  run_main(main)
