r"""TriviaQA with DPR (the paper's setup). Needs the DPR data on disk.

Data: DPR's ``psgs_w100.tsv``, ``biencoder-trivia-train.json`` and ``trivia-test.csv``
under ``data/``.
"""

from qdr_jax.config import dpr_qa_config


def get_config():
  return dpr_qa_config("trivia", train_file="data/trivia/biencoder-trivia-train.json",
                       test_file="data/trivia/trivia-test.csv", model_suffix="multiset-base",
                       temperature=16.0, rebuild_every=1600)
