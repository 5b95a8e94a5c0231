"""Side-by-side comparison of the training modes at several PQ compression levels: the
summary of a mode over training seeds and paired significance tests between modes."""

from __future__ import annotations

import pathlib
import re
from collections.abc import Collection, Mapping, Sequence

import numpy as np

from qdr_jax.eval.table_eval import mean_and_spread
from qdr_jax.io_utils import save_figure_atomic

# Sign-flip tests enumerate all 2**n sign vectors up to this n, and sample above it.
EXACT_MAX = 16
SAMPLES = 20_000


def with_pq_subquantizers(factory: str, num_subquantizers: int) -> str:
  """``factory`` with its PQ part's sub-quantizer count (and OPQ's) replaced."""
  if not re.search(r"PQ\d+", factory):
    raise ValueError(f"config.index.factory {factory!r} has no PQ part to vary.")
  factory = re.sub(r"OPQ\d+", f"OPQ{num_subquantizers}", factory)
  return re.sub(r"(?<!O)PQ\d+", f"PQ{num_subquantizers}", factory)


def plot_comparison(summary: dict, metric: str, out: pathlib.Path) -> None:
  """``metric`` against bytes per vector, one line per mode with spread error bars; a
  second panel for the unseen queries when the summary has that subset."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  levels = sorted(summary["levels"], key=lambda e: e["bytes_per_vector"])
  modes = list(levels[0]["modes"])
  unseen = all(e.get("subsets") and all(e["subsets"][m]["unseen"]["count"] and
                                         e["subsets"][m]["unseen"]["quantized"][metric]
                                         is not None for m in modes) for e in levels)
  panels = [("all test queries", lambda e, m: (e["modes"][m][metric],
                                               e["modes_std"][m][metric]))]
  if unseen:
    panels.append(("unseen test queries", lambda e, m: (
        e["subsets"][m]["unseen"]["quantized"][metric],
        e["subsets"][m]["unseen"]["quantized_std"][metric])))
  fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
  spread = levels[0].get("spread_over", "index seeds")
  for ax, (title, value) in zip(axes[0], panels):
    for mode in modes:
      points = [value(e, mode) for e in levels]
      ax.errorbar([e["bytes_per_vector"] for e in levels], [p[0] for p in points],
                  yerr=[p[1] for p in points], marker="o", label=mode, capsize=3)
    if title.startswith("all"):
      ax.axhline(summary["flat_before"][metric], color="k", ls="--", label="flat (before)")
    ax.set_xlabel("bytes per vector")
    ax.set_ylabel(f"{metric} (quantized, test)")
    ax.set_title(f"{summary['dataset']}, {title}: {summary['steps']} steps", fontsize=9)
    ax.legend(fontsize=8)
  fig.text(0.01, 0.01, f"error bars: std over {spread}", fontsize=7)
  fig.tight_layout()
  save_figure_atomic(fig, out, dpi=110)
  plt.close(fig)


def sign_flip_p_value(differences: Sequence[float] | np.ndarray, *, exact_max: int = EXACT_MAX,
                      samples: int = SAMPLES, seed: int = 0) -> float | None:
  """Two-sided paired permutation test of "mean difference = 0" by flipping signs.

  Under the null each paired difference is as likely negative as positive, so the
  statistic |sum(d)| is compared with |sum(s * d)| over sign vectors s: all 2**n of them
  when n <= `exact_max` (the exact p), else `samples` random ones (p = (1 + hits) /
  (1 + samples), never 0). Ties count as at least as extreme.

  Returns:
    The p-value, or None without differences.
  """
  d = np.asarray(differences, dtype=np.float64).ravel()
  if d.size == 0:
    return None
  observed = abs(d.sum())
  # Sums of the same numbers in another order differ by rounding: tie within it.
  tolerance = 1e-9 * max(float(np.abs(d).sum()), 1e-300)
  if d.size <= exact_max:
    bits = (np.arange(2 ** d.size)[:, None] >> np.arange(d.size)[None, :]) & 1
    signs = 1.0 - 2.0 * bits
    return float(np.mean(np.abs(signs @ d) >= observed - tolerance))
  rng = np.random.default_rng(seed)
  hits, done, chunk = 0, 0, max(1, 4_000_000 // d.size)
  while done < samples:
    n = min(chunk, samples - done)
    signs = rng.integers(0, 2, size=(n, d.size)) * 2.0 - 1.0
    hits += int(np.sum(np.abs(signs @ d) >= observed - tolerance))
    done += n
  return (1 + hits) / (1 + samples)


def paired_test(a: Sequence[float], b: Sequence[float]) -> dict:
  """{'n', 'mean_diff' (a - b), 'p'} of paired values (`sign_flip_p_value`)."""
  d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
  return {"n": int(d.size), "mean_diff": float(d.mean()) if d.size else None,
          "p": sign_flip_p_value(d)}


def summarize_seeds(afters: Sequence[Mapping]) -> dict:
  """One mode's quantized metrics over its training seeds.

  Args:
    afters: the "after" evaluation (`evaluate_table` result) of each training seed.

  Returns:
    {'mean', 'std', 'min', 'max': {metric: value}, 'spread_over'} and, with several
    training seeds, 'per_training_seed' (each seed's mean over the index seeds). With one
    training seed the spread is over its index seeds (as a single run reports it);
    with several it is over the training seeds' index-seed means. With 'subsets' in the
    evaluations, 'subsets': {name: {'count', 'quantized', 'quantized_std'}} likewise.
  """
  if len(afters) == 1:
    after = afters[0]
    cells = after["quantized_per_seed"]
    out = {"mean": after["quantized"], "std": after["quantized_std"],
           "spread_over": "index seeds"}
  else:
    cells = [after["quantized"] for after in afters]
    mean, std = mean_and_spread(cells)
    out = {"mean": mean, "std": std, "spread_over": "training seeds",
           "per_training_seed": cells}
  out["min"] = {k: min(c[k] for c in cells) for k in cells[0]}
  out["max"] = {k: max(c[k] for c in cells) for k in cells[0]}
  if all("subsets" in after for after in afters):
    out["subsets"] = {}
    for name, entry in afters[0]["subsets"].items():
      if len(afters) == 1:
        mean, std = entry["quantized"], entry["quantized_std"]
      else:
        mean, std = mean_and_spread([after["subsets"][name]["quantized"] for after in afters])
      out["subsets"][name] = {"count": entry["count"], "quantized": mean, "quantized_std": std}
  return out


def paired_comparison(afters: Sequence[Mapping], reference: Sequence[Mapping], metric: str,
                      subsets: Mapping[str, Collection[str]] | None = None) -> dict:
  """A mode against a reference mode, paired by training seed and index seed.

  Args:
    afters / reference: the "after" evaluations of each training seed, in the same seed
      order for both modes.
    metric: the measure compared.
    subsets: optional {name: query ids} for per-query tests on subsets (e.g. seen/unseen).

  Returns:
    {'metric', 'cells': `paired_test` over the (training seed, index seed) cells' means
    (over the training seeds' means when the two have different numbers of index seeds),
    'queries': {'all' and each subset: `paired_test` over queries of the difference
    averaged over the cells}} ('queries' only when both modes kept per-query values of
    `metric` for the same queries).
  """
  if len(afters) != len(reference):
    raise ValueError(f"{len(afters)} training seeds against {len(reference)} for the "
                     "reference mode; pairs need the same seeds.")
  mine = [cell[metric] for after in afters for cell in after["quantized_per_seed"]]
  theirs = [cell[metric] for after in reference for cell in after["quantized_per_seed"]]
  if len(mine) != len(theirs):
    # One served index per training seed against one build per index seed: pair the
    # training seeds' means.
    mine, theirs = ([float(np.mean([cell[metric] for cell in after["quantized_per_seed"]]))
                     for after in evaluations] for evaluations in (afters, reference))
  out = {"metric": metric, "cells": paired_test(mine, theirs)}
  per_query = [after.get("per_query") for after in (*afters, *reference)]
  if all(p is not None and p["metric"] == metric and p["query_ids"] == per_query[0]["query_ids"]
         for p in per_query):
    query_ids = per_query[0]["query_ids"]

    def cell_mean(evaluations: Sequence[Mapping]) -> np.ndarray:
      return np.mean([values for after in evaluations
                      for values in after["per_query"]["quantized"]], axis=0)

    d = cell_mean(afters) - cell_mean(reference)
    groups = {"all": query_ids, **(subsets or {})}
    out["queries"] = {}
    for name, members in groups.items():
      wanted = set(members)
      keep = np.fromiter((q in wanted for q in query_ids), dtype=bool, count=len(query_ids))
      out["queries"][name] = paired_test(d[keep], np.zeros(int(keep.sum())))
  return out
