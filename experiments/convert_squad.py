"""Converts SQuAD v1.1 into the DPR layout (passages TSV, train/test JSON, test QA CSV).

Usage (from the repo root, with qdr_jax installed or PYTHONPATH=.):
  python experiments/convert_squad.py --output_dir=/tmp/squad_dpr

Writes `psgs.tsv`, `train.json`, `test.json` and `test.csv` to --output_dir, with
the articles split into train and test sides. Load the result with a config like
  {name: squad, format: dpr, corpus: OUT/psgs.tsv,
   splits: {train: OUT/train.json, test: OUT/test.json}}.
"""

from __future__ import annotations

import os

from absl import flags

from qdr_jax.cli import run_main
from qdr_jax.data.dpr import write_dpr_json, write_dpr_passages, write_qa_csv
from qdr_jax.data.loader import read_squad_file

_INPUT = flags.DEFINE_string("input", "../shared/data/squad/dev-v1.1.json.gz",
                             "SQuAD v1.1 JSON file (may be gzipped).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Directory to write the DPR files to.",
                                  required=True)
_TEST_FRACTION = flags.DEFINE_float("test_fraction", 0.25, "Share of articles for the test side.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the article split.")


def main(argv: list[str]) -> None:
  del argv
  out = read_squad_file(_INPUT.value, test_fraction=_TEST_FRACTION.value, seed=_SEED.value)
  os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
  join = lambda name: os.path.join(_OUTPUT_DIR.value, name)
  write_dpr_passages(join("psgs.tsv"), out.corpus)
  write_dpr_json(join("train.json"), out.train_records)
  write_dpr_json(join("test.json"), out.test_records)
  write_qa_csv(join("test.csv"), [r["question"] for r in out.test_records],
               [r["answers"] for r in out.test_records])
  print(f"passages: {len(out.corpus)}")
  print(f"train: {len(out.train_titles)} articles, {len(out.train_records)} questions")
  print(f"test:  {len(out.test_titles)} articles, {len(out.test_records)} questions")
  print(f"wrote {_OUTPUT_DIR.value}/{{psgs.tsv,train.json,test.json,test.csv}}")


if __name__ == "__main__":
  run_main(main)
