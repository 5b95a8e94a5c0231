"""Plain-text tables of metrics for the console."""

from __future__ import annotations

from typing import Mapping


def format_table(rows: Mapping[str, Mapping[str, float]],
                 spreads: Mapping[str, Mapping[str, float]] | None = None) -> str:
  """One row per entry of ``rows``, one column per metric (union, in first-seen order)."""
  columns: list[str] = []
  for metrics in rows.values():
    columns += [m for m in metrics if m not in columns]
  name_width = max([len("index")] + [len(n) for n in rows])
  cells = {}
  for name, metrics in rows.items():
    for col in columns:
      value = metrics.get(col)
      text = "-" if value is None else f"{value:.4f}"
      spread = (spreads or {}).get(name, {}).get(col)
      cells[name, col] = text + (f"±{spread:.3f}" if spread is not None else "")
  widths = {c: max(len(c), *(len(cells[n, c]) for n in rows)) for c in columns}
  header = "  ".join([f"{'index':<{name_width}}"] + [f"{c:>{widths[c]}}" for c in columns])
  lines = [header, "-" * len(header)]
  for name in rows:
    lines.append("  ".join([f"{name:<{name_width}}"] +
                           [f"{cells[name, c]:>{widths[c]}}" for c in columns]))
  return "\n".join(lines)


def before_after_table(results: Mapping) -> str:
  """Flat and quantized rows before and after training, with the share of the
  flat-minus-quantized gap (before training) that training closed."""
  rows = {"flat before": results["before"]["flat"],
          "quantized before": results["before"]["quantized"],
          "flat after": results["after"]["flat"],
          "quantized after": results["after"]["quantized"]}
  spreads = {"quantized before": results["before"].get("quantized_std", {}),
             "quantized after": results["after"].get("quantized_std", {})}
  if "quantized_trained_quantizer" in results["after"]:
    rows["quantized after (training's quantizer)"] = \
        results["after"]["quantized_trained_quantizer"]
  lines = [format_table(rows, spreads)]
  flat_b, quant_b = results["before"]["flat"], results["before"]["quantized"]
  quant_a = results["after"]["quantized"]
  for metric in quant_a:
    gap = flat_b[metric] - quant_b[metric]
    gain = quant_a[metric] - quant_b[metric]
    closed = f", {100 * gain / gap:.0f}% of the flat-quantized gap" if gap > 1e-9 else ""
    lines.append(f"quantized {metric}: {quant_b[metric]:.4f} -> {quant_a[metric]:.4f} "
                 f"({gain:+.4f}{closed})")
  return "\n".join(lines)
