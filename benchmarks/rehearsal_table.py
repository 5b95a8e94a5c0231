r"""Tabulates rehearsals at several corpus sizes and projects the per-host memory.

  python benchmarks/rehearsal_table.py runs/rehearsal/1000000 runs/rehearsal/2000000

Reads each ``{dir}/rehearsal.json`` (``experiments/rehearse_scale.py``) and prints
Markdown: seconds and peak RSS of process 0 / process 1 per phase and corpus size; the
difference p0 - p1 per phase beside the size of process 0's FAISS index (the exported
one); and, from the two largest runs, each phase's per-row bytes (the slope of process
1's peak RSS over its rows) and constant, projected to ``--rows`` x the runs' dim on 1, 4
and 8 hosts for the recipe's float32 table with per-row Adam: each copy of the training
state a phase holds (`STATE_COPIES`) adds a float32 row's, two float32 moments' and a
count's bytes over the runs' row; and
``--index_bytes_per_row`` of FAISS on host 0 (``--indexes_held`` of them at once).
"""

from __future__ import annotations

import json
import pathlib
import sys

from absl import flags

from qdr_jax.cli import run_main

_ROWS = flags.DEFINE_integer("rows", 21_015_324, "Rows of the projected corpus (DPR's "
                             "psgs_w100.tsv).")
_INDEX_BYTES = flags.DEFINE_integer("index_bytes_per_row", 136, "FAISS bytes a row of the "
                                    "projected index (PQ128x8 codes and an 8-byte id).")
_HELD = flags.DEFINE_integer("indexes_held", 2, "FAISS indexes process 0 holds at once "
                             "(the served one and an evaluation build).")
MIB, GIB = 2 ** 20, 2 ** 30
# Copies of the training state (table rows and their optimizer state) a phase holds: the
# live state, and in phases with an asynchronous checkpoint save its host copy. The
# evaluation before training places a float32 table whatever table.dtype says.
STATE_COPIES = {"train_until_kill": 2, "resume": 2, "eval_after": 1}
ORDER = ("make_data", "load", "eval_before", "train_until_kill", "load_resume",
         "eval_before_resume", "resume", "eval_after", "export")


def load(dirs: list[str]) -> list[dict]:
  runs = [json.loads((pathlib.Path(d) / "rehearsal.json").read_text()) for d in dirs]
  return sorted(runs, key=lambda r: r["passages"])


def index_bytes(run: dict) -> int:
  return sum(run["faiss_index_bytes"].values())


def _phases(runs: list[dict]) -> list[str]:
  return [p for p in ORDER if any(p in r["phases"] for r in runs)]


def _header(title: str, runs: list[dict]) -> list[str]:
  return ["| " + title + " | " + " | ".join(f"{r['passages']:,}" for r in runs) + " |",
          "|---|" + "---|" * len(runs)]


def table(runs: list[dict]) -> str:
  lines = _header("phase", runs)
  for phase in _phases(runs):
    cells = []
    for run in runs:
      entry = run["phases"].get(phase)
      rss = "/".join(f"{b / MIB:,.0f}" for b in entry["peak_rss_bytes"]) if entry else ""
      cells.append(f"{entry['seconds']:,.0f} s" + (f", {rss} MiB" if rss else "")
                   if entry else "")
    lines.append(f"| {phase} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def differences(runs: list[dict]) -> str:
  lines = _header("p0 - p1 (MiB)", runs)
  for phase in _phases(runs):
    cells = []
    for run in runs:
      peaks = run["phases"].get(phase, {}).get("peak_rss_bytes", [])
      cells.append(f"{(peaks[0] - peaks[1]) / MIB:+,.0f}" if len(peaks) == 2 else "")
    if any(cells):
      lines.append(f"| {phase} | " + " | ".join(cells) + " |")
  lines.append("| process 0's FAISS index (MiB) | " + " | ".join(
      f"{index_bytes(r) / MIB:,.0f}" for r in runs) + " |")
  return "\n".join(lines)


def projection(runs: list[dict]) -> str:
  """Per-row bytes and constants from the two largest runs (process 1: no FAISS)."""
  small, large = runs[-2], runs[-1]
  dim, processes = large["dim"], large["processes"]
  rows = [r["passages"] / processes for r in (small, large)]
  # The runs' table row (bfloat16 or float32; SGD keeps no per-row state) against the
  # recipe's: a float32 row, its two float32 Adam moments and a count.
  run_row = dim * (2 if "--config.table.dtype=bfloat16" in large["argv"] else 4)
  recipe_row = 3 * 4 * dim + 4
  lines = ["| phase | bytes a row (measured) | constant (MiB) | + Adam (bytes a row) | "
           "1 host (GiB) | 4 hosts (GiB a host, host 0) | 8 hosts (GiB a host, host 0) |",
           "|---|---|---|---|---|---|---|"]
  for phase in _phases(runs):
    peaks = [r["phases"].get(phase, {}).get("peak_rss_bytes", []) for r in (small, large)]
    if not all(len(p) == processes for p in peaks):
      continue
    per_row = (peaks[1][1] - peaks[0][1]) / (rows[1] - rows[0])
    constant = peaks[1][1] - per_row * rows[1]
    per_row_adam = per_row + STATE_COPIES.get(phase, 0) * (recipe_row - run_row)
    cells = []
    for hosts in (1, 4, 8):
      host = constant + per_row_adam * _ROWS.value / hosts
      lead = host + _HELD.value * _INDEX_BYTES.value * _ROWS.value
      cells.append(f"{lead / GIB:,.1f}" if hosts == 1
                   else f"{host / GIB:,.1f}, {lead / GIB:,.1f}")
    lines.append(f"| {phase} | {per_row:,.0f} | {constant / MIB:,.0f} | {per_row_adam:,.0f} | "
                 + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv):
  runs = load(argv[1:])
  if not runs:
    sys.exit("give one or more rehearsal directories")
  print(table(runs), differences(runs), sep="\n\n")
  if len(runs) >= 2:
    print()
    print(projection(runs))


if __name__ == "__main__":
  run_main(main)
