r"""Draws a run's training curves and its before/after metrics as PNG files.

  python experiments/plot.py runs/demo

Reads ``metrics.jsonl`` and ``results.json`` from the run directory and writes
``curves.png`` and ``before_after.png`` next to them (each when its input is there) and
names what it wrote; a directory with neither is refused (exit status 2).
"""

import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from absl import app  # noqa: E402

from qdr_jax.cli import run_main  # noqa: E402
from qdr_jax.data.types import DataFormatError  # noqa: E402
from qdr_jax.io_utils import save_figure_atomic  # noqa: E402


def read_metrics(path: pathlib.Path) -> list[dict]:
  records = []
  for number, line in enumerate(path.read_text().splitlines(), 1):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      raise DataFormatError(str(path), f"not a JSON line ({e.msg})", number) from None
  return records


def plot_curves(records: list[dict], out: pathlib.Path) -> None:
  train = [r for r in records if "loss" in r]
  panels = [("loss", "training loss"), ("pool_accuracy", "in-pool accuracy"),
            ("encoder_lr", "learning rates"), ("steps_per_second", "steps / s")]
  fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
  steps = [r["step"] for r in train]
  for ax, (key, title) in zip(axes, panels):
    ax.plot(steps, [r.get(key, float("nan")) for r in train])
    if key == "encoder_lr" and any("row_lr" in r for r in train):
      ax.lines[-1].set_label("encoder lr")
      ax.plot(steps, [r.get("row_lr", float("nan")) for r in train], label="row lr")
      ax.legend()
    ax.set_title(title)
    ax.set_xlabel("step")
  fig.tight_layout()
  save_figure_atomic(fig, out, dpi=110)
  plt.close(fig)


def plot_before_after(results: dict, out: pathlib.Path) -> None:
  metrics = list(results["after"]["quantized"])
  bars = [("flat before", results["before"]["flat"]),
          ("quantized before", results["before"]["quantized"]),
          ("flat after", results["after"]["flat"]),
          ("quantized after", results["after"]["quantized"])]
  width = 0.8 / len(bars)
  fig, ax = plt.subplots(figsize=(1.6 * len(metrics) + 2, 3.6))
  for i, (name, values) in enumerate(bars):
    xs = [m + (i - len(bars) / 2 + 0.5) * width for m in range(len(metrics))]
    ax.bar(xs, [values.get(m, 0.0) for m in metrics], width, label=name)
  ax.set_xticks(range(len(metrics)), metrics)
  ax.set_ylim(0, 1)
  ax.set_title(f"{results.get('dataset', '')}: {results.get('index', {}).get('factory', '')}")
  ax.legend(fontsize=8, ncols=2)
  fig.tight_layout()
  save_figure_atomic(fig, out, dpi=110)
  plt.close(fig)


def main(argv: list[str]) -> None:
  if len(argv) != 2:
    raise app.UsageError(f"usage: {argv[0]} RUN_DIR")
  run = pathlib.Path(argv[1])
  if not run.is_dir():
    raise NotADirectoryError(f"{run}: not a run directory")
  wrote = []
  if (run / "metrics.jsonl").exists():
    records = read_metrics(run / "metrics.jsonl")
    if any("loss" in r for r in records):
      plot_curves(records, run / "curves.png")
      wrote.append(run / "curves.png")
  if (run / "results.json").exists():
    try:
      results = json.loads((run / "results.json").read_text())
      if "after" not in results or "before" not in results:
        raise KeyError("before/after")
    except (ValueError, KeyError) as e:
      raise DataFormatError(str(run / "results.json"), "not the results of a training run "
                            f"(experiments/train.py) ({e})") from None
    plot_before_after(results, run / "before_after.png")
    wrote.append(run / "before_after.png")
  if not wrote:
    raise FileNotFoundError(f"{run}: no training metrics (metrics.jsonl with losses) nor "
                            "results.json of a training run; nothing to plot")
  print("wrote " + ", ".join(map(str, wrote)))


if __name__ == "__main__":
  run_main(main)
