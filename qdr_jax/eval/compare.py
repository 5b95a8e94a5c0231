"""Side-by-side comparison of the training modes at several PQ compression levels."""

from __future__ import annotations

import pathlib
import re

from qdr_jax.io_utils import save_figure_atomic


def with_pq_subquantizers(factory: str, num_subquantizers: int) -> str:
  """``factory`` with its PQ part's sub-quantizer count (and OPQ's) replaced."""
  if not re.search(r"PQ\d+", factory):
    raise ValueError(f"config.index.factory {factory!r} has no PQ part to vary.")
  factory = re.sub(r"OPQ\d+", f"OPQ{num_subquantizers}", factory)
  return re.sub(r"(?<!O)PQ\d+", f"PQ{num_subquantizers}", factory)


def plot_comparison(summary: dict, metric: str, out: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  levels = sorted(summary["levels"], key=lambda e: e["bytes_per_vector"])
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for mode in levels[0]["modes"]:
    ax.errorbar([e["bytes_per_vector"] for e in levels],
                [e["modes"][mode][metric] for e in levels],
                yerr=[e["modes_std"][mode][metric] for e in levels], marker="o", label=mode,
                capsize=3)
  ax.axhline(summary["flat_before"][metric], color="k", ls="--", label="flat (before)")
  ax.set_xlabel("bytes per vector")
  ax.set_ylabel(f"{metric} (quantized, test)")
  ax.set_title(f"{summary['dataset']}: {summary['steps']} steps")
  ax.legend(fontsize=8)
  fig.tight_layout()
  save_figure_atomic(fig, out, dpi=110)
  plt.close(fig)
