r"""Tabulates and plots rehearsals at several corpus sizes (log-log).

  python benchmarks/plot_rehearsal.py runs/rehearsal/250k runs/rehearsal/500k \
      runs/rehearsal/1m runs/rehearsal/2m --out=runs/rehearsal/scaling.png

Reads each ``{dir}/rehearsal.json`` (``experiments/rehearse_scale.py``); prints a Markdown
table of seconds and peak RSS per phase and process, device bytes, Recall@100 and the
refresh comparison; draws seconds, peak RSS and device bytes against passages with the
reference slopes N x d x 4 / processes and N x d x 4 / devices.
"""

from __future__ import annotations

import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from absl import flags  # noqa: E402

from qdr_jax.cli import run_main  # noqa: E402

_OUT = flags.DEFINE_string("out", "rehearsal.png", "Plot path.")
MIB = 2 ** 20
ORDER = ("corpus", "embed", "train_until_kill", "corpus_reload", "embed_reload", "resume",
         "evaluate", "refresh", "export")


def load(dirs: list[str]) -> list[dict]:
  runs = [json.loads((pathlib.Path(d) / "rehearsal.json").read_text()) for d in dirs]
  return sorted(runs, key=lambda r: r["passages"])


def _phases(runs: list[dict]) -> list[str]:
  return [p for p in ORDER if any(p in r["phases"] for r in runs)]


def table(runs: list[dict]) -> str:
  phases = _phases(runs)
  lines = ["| phase | " + " | ".join(f"{r['passages']:,}" for r in runs) + " |",
           "|---|" + "---|" * len(runs)]
  for phase in phases:
    cells = []
    for run in runs:
      entry = run["phases"].get(phase)
      if entry is None:
        cells.append("")
        continue
      rss = "/".join(f"{b / MIB:,.0f}" for b in entry["peak_rss_bytes"])
      cells.append(f"{entry['seconds']:,.0f} s, {rss} MiB")
    lines.append(f"| {phase} | " + " | ".join(cells) + " |")
  lines.append("| device bytes (MiB per device) | " + " | ".join(
      "/".join(f"{b / MIB:,.0f}" for b in r["device_bytes"]) for r in runs) + " |")
  lines.append("| N x d x 4 / processes (MiB) | " + " | ".join(
      f"{r['passages'] * r['dim'] * 4 / r['processes'] / MIB:,.0f}" for r in runs) + " |")
  lines.append("| Recall@100 flat / quantized | " + " | ".join(
      f"{r['recall_at_100']['flat']:.3f} / {r['recall_at_100']['quantized']:.3f}"
      for r in runs) + " |")
  lines.append("| refresh of 5% rows: incremental / full (s), speed-up | " + " | ".join(
      f"{r['refresh']['incremental_seconds']:.1f} / {r['refresh']['full_rebuild_seconds']:.1f},"
      f" {r['refresh']['speedup']:.1f}x" for r in runs) + " |")
  lines.append("| Recall@100 after incremental / full | " + " | ".join(
      f"{r['refresh']['recall_at_100_incremental']:.3f} / "
      f"{r['refresh']['recall_at_100_full']:.3f}" for r in runs) + " |")
  lines.append("| share of the exact top-100 found: trained index | " + " | ".join(
      _maybe(r["recall_at_100"], "quantized_of_exact_top100") for r in runs) + " |")
  lines.append("| share of the exact top-100 found after incremental / full | " + " | ".join(
      f"{_maybe(r['refresh'], 'exact_top100_recall_incremental')} / "
      f"{_maybe(r['refresh'], 'exact_top100_recall_full')}" for r in runs) + " |")
  return "\n".join(lines)


def _maybe(record: dict, key: str) -> str:
  return f"{record[key]:.3f}" if key in record else "-"


def plot(runs: list[dict], out: pathlib.Path) -> None:
  n = [r["passages"] for r in runs]
  phases = _phases(runs)
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  for phase in phases:
    have = [(r["passages"], r["phases"][phase]) for r in runs if phase in r["phases"]]
    xs = [x for x, _ in have]
    axes[0].plot(xs, [e["seconds"] for _, e in have], marker="o", label=phase)
    axes[1].plot(xs, [max(e["peak_rss_bytes"]) / MIB for _, e in have], marker="o",
                 label=phase)
  ref = [r["passages"] * r["dim"] * 4 / r["processes"] / MIB for r in runs]
  axes[1].plot(n, ref, "k--", label="N·d·4 / processes")
  axes[2].plot(n, [max(r["device_bytes"]) / MIB for r in runs], marker="o",
               label="max over devices")
  axes[2].plot(n, [r["passages"] * r["dim"] * 4 / len(r["device_bytes"]) / MIB for r in runs],
               "k--", label="N·d·4 / devices (table)")
  titles = ("seconds per phase", "peak RSS per process (MiB, max)", "bytes per device (MiB)")
  for ax, title in zip(axes, titles):
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("passages")
    ax.set_title(title)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out, dpi=110)


def main(argv):
  runs = load(argv[1:])
  if not runs:
    sys.exit("give one or more rehearsal directories")
  print(table(runs))
  plot(runs, pathlib.Path(_OUT.value))
  print(f"plot: {_OUT.value}")


if __name__ == "__main__":
  run_main(main)
