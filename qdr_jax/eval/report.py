"""Plain-text tables of metrics for the console."""

from __future__ import annotations

from typing import Mapping, Sequence


def format_table(rows: Mapping[str, Mapping[str, float | None]],
                 spreads: Mapping[str, Mapping[str, float]] | None = None,
                 row_header: str = "index") -> str:
  """One row per entry of ``rows``, one column per metric (union, in first-seen order);
  '-' for a missing or None value."""
  columns: list[str] = []
  for metrics in rows.values():
    columns += [m for m in metrics if m not in columns]
  name_width = max([len(row_header)] + [len(n) for n in rows])
  cells = {}
  for name, metrics in rows.items():
    for col in columns:
      value = metrics.get(col)
      text = "-" if value is None else f"{value:.4f}"
      spread = (spreads or {}).get(name, {}).get(col)
      cells[name, col] = text + (f"±{spread:.3f}" if spread is not None else "")
  widths = {c: max(len(c), *(len(cells[n, c]) for n in rows)) for c in columns}
  header = "  ".join([f"{row_header:<{name_width}}"] + [f"{c:>{widths[c]}}" for c in columns])
  lines = [header, "-" * len(header)]
  for name in rows:
    lines.append("  ".join([f"{name:<{name_width}}"] +
                           [f"{cells[name, c]:>{widths[c]}}" for c in columns]))
  return "\n".join(lines)


def subset_table(evaluations: Mapping[str, Mapping], metric: str,
                 without_flat: Sequence[str] = ()) -> str:
  """One row per query subset ('all', 'seen', 'unseen'), with its query count and
  ``metric`` on the flat and the quantized index (mean over index seeds) of each
  evaluation (e.g. {'before': ..., 'after': ...}, each an `evaluate_table` result with
  'subsets'); '-' where a subset is empty. Evaluations named in ``without_flat`` show
  only their quantized column (a served index shares the flat one of 'after')."""
  first = next(iter(evaluations.values()))["subsets"]
  rows, spreads = {}, {}
  for name, entry in first.items():
    row = f"{name} (n={entry['count']})"
    rows[row], spreads[row] = {}, {}
    for label, evaluation in evaluations.items():
      subset = evaluation["subsets"][name]
      if label not in without_flat:
        rows[row][f"flat {label}".strip()] = subset["flat"][metric]
      rows[row][f"quantized {label}".strip()] = subset["quantized"][metric]
      if len(evaluation.get("quantized_per_seed", ())) != 1:  # one index has no spread
        spreads[row][f"quantized {label}".strip()] = subset["quantized_std"][metric]
  return format_table(rows, spreads, row_header=f"{metric} on")


def _before_after_rows(before: Mapping, after: Mapping) -> str:
  """Flat and quantized rows of one split before and after training (and the served
  index, when the run has one)."""
  rows = {"flat before": before["flat"], "quantized before": before["quantized"],
          "flat after": after["flat"], "quantized after": after["quantized"]}
  spreads = {"quantized before": before.get("quantized_std", {}),
             "quantized after": after.get("quantized_std", {})}
  if after.get("served") is not None:
    rows["quantized after (served: training's quantizer)"] = after["served"]["quantized"]
  return format_table(rows, spreads)


def before_after_table(results: Mapping) -> str:
  """Flat and quantized rows before and after training, with the share of the
  flat-minus-quantized gap (before training) that training closed."""
  served = results["after"].get("served")
  lines = [_before_after_rows(results["before"], results["after"])]
  if "subsets" in results["before"] and "subsets" in results["after"]:
    metric = results.get("config", {}).get("eval", {}).get("primary_metric")
    if metric not in results["after"]["quantized"]:
      metric = next(iter(results["after"]["quantized"]))
    evaluations = {"before": results["before"], "after": results["after"]}
    if served is not None and "subsets" in served:
      evaluations["served"] = served
    lines += ["", subset_table(evaluations, metric, without_flat=("served",)), ""]
  dev = results.get("dev")
  if dev is not None:
    lines += ["", f"selection split {dev['split']!r} ({dev['count']} queries):",
              _before_after_rows(dev["before"], dev["after"]), ""]
  flat_b, quant_b = results["before"]["flat"], results["before"]["quantized"]
  quant_a = results["after"]["quantized"]
  for metric in quant_a:
    gap = flat_b[metric] - quant_b[metric]
    gain = quant_a[metric] - quant_b[metric]
    closed = f", {100 * gain / gap:.0f}% of the flat-quantized gap" if gap > 1e-9 else ""
    lines.append(f"quantized {metric}: {quant_b[metric]:.4f} -> {quant_a[metric]:.4f} "
                 f"({gain:+.4f}{closed})")
  return "\n".join(lines)


def _p(value: float | None) -> str:
  return "-" if value is None else f"{value:.2g}"


def compare_table(flat_before: Mapping[str, float], entry: Mapping, metric: str) -> str:
  """One level of a `compare_modes` summary: every mode's quantized metrics (± spread),
  ``metric`` on the query subsets, and the paired tests' differences and p-values; then
  the same for the index each mode serves, with its flat index after training."""
  lines = [format_table({"flat before": flat_before, **entry["modes"]}, entry["modes_std"])]
  lines += _subset_and_test_lines(entry.get("subsets"), entry.get("paired", {}), metric)
  dev = entry.get("dev")
  if dev:
    first = next(iter(dev.values()))
    lines += ["", f"{metric} on the selection split {first['split']!r} "
              f"({first['count']} queries):",
              format_table({mode: d["mean"] for mode, d in dev.items()},
                           {mode: d["std"] for mode, d in dev.items()}, row_header="mode")]
  served = entry.get("served")
  if served:
    rows = {mode: {f"served {metric}": values[metric],
                   f"flat after {metric}": served["flat"][mode][metric],
                   "served / flat": served["served_over_flat"][mode]}
            for mode, values in served["modes"].items()}
    spreads = {mode: {f"served {metric}": std[metric]}
               for mode, std in served["modes_std"].items()}
    lines += ["", "The index each mode serves (its training quantizer, else fresh builds):",
              format_table(rows, spreads, row_header="served")]
    lines += _subset_and_test_lines(served.get("subsets"), entry.get("served_paired", {}),
                                    metric)
  return "\n".join(lines)


def _subset_and_test_lines(subsets: Mapping | None, paired: Mapping, metric: str
                           ) -> list[str]:
  lines = []
  if subsets and all(subsets.values()):
    rows, spreads = {}, {}
    for mode, by_name in subsets.items():
      rows[mode] = {f"{name} (n={s['count']})": s["quantized"][metric]
                    for name, s in by_name.items()}
      spreads[mode] = {f"{name} (n={s['count']})": s["quantized_std"][metric]
                       for name, s in by_name.items()}
    lines += ["", format_table(rows, spreads, row_header=f"{metric} on")]
  for mode, tests in paired.items():
    for against, test in tests.items():
      cells = test["cells"]
      line = (f"{mode} {against.replace('_', ' ', 1)}: {cells['mean_diff']:+.4f} "
              f"(p={_p(cells['p'])} over {cells['n']} seed cells)")
      if "queries" in test:
        line += "; per query p: " + ", ".join(f"{name} {_p(q['p'])}"
                                              for name, q in test["queries"].items())
      lines.append(line)
  return lines
