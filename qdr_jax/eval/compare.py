"""Side-by-side comparison of the training modes at several PQ compression levels."""

from __future__ import annotations

import json
import pathlib
import re
from typing import Sequence

import ml_collections

from qdr_jax import distributed
from qdr_jax.eval.report import format_table
from qdr_jax.train.loop import train_and_evaluate


def with_pq_subquantizers(factory: str, num_subquantizers: int) -> str:
  """``factory`` with its PQ part's sub-quantizer count (and OPQ's) replaced."""
  if not re.search(r"PQ\d+", factory):
    raise ValueError(f"config.index.factory {factory!r} has no PQ part to vary.")
  factory = re.sub(r"OPQ\d+", f"OPQ{num_subquantizers}", factory)
  return re.sub(r"(?<!O)PQ\d+", f"PQ{num_subquantizers}", factory)


def compare_modes(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                  levels: Sequence[int], modes: Sequence[str]) -> dict:
  """Trains each mode at each level; writes and returns the compare.json summary."""
  workdir.mkdir(parents=True, exist_ok=True)
  lead = distributed.is_lead_process()  # every process trains; process 0 summarises
  cache_dir = config.table.cache_dir or str(workdir / "cache")
  summary: dict = {"dataset": config.data.name, "steps": config.train.steps, "levels": []}
  for level in levels:
    entry: dict = {"modes": {}, "modes_std": {}}
    for mode in modes:
      run_cfg = config.copy_and_resolve_references()
      with run_cfg.unlocked():
        run_cfg.train.mode = mode
        run_cfg.index.factory = with_pq_subquantizers(config.index.factory, level)
        run_cfg.table.cache_dir = cache_dir
      results = train_and_evaluate(run_cfg, workdir / f"pq{level}" / mode)
      if not lead:
        continue
      entry["bytes_per_vector"] = results["index"]["bytes_per_vector"]
      entry["factory"] = run_cfg.index.factory
      entry["modes"][mode] = results["after"]["quantized"]
      entry["modes_std"][mode] = results["after"]["quantized_std"]
      summary.setdefault("flat_before", results["before"]["flat"])
      (workdir / "compare.json").write_text(json.dumps(summary | {"levels": summary["levels"]
                                                                  + [entry]}, indent=1))
    if not lead:
      continue
    summary["levels"].append(entry)
    print(f"\n{entry['factory']} ({entry['bytes_per_vector']:.0f} bytes/vector), quantized "
          "test metrics after training:")
    print(format_table({"flat before": summary["flat_before"], **entry["modes"]},
                       entry["modes_std"]))
  if lead:
    (workdir / "compare.json").write_text(json.dumps(summary, indent=1))
  return summary


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
  fig.savefig(out, dpi=110)
  plt.close(fig)
