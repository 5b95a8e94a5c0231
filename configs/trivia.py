r"""TriviaQA with DPR (the paper's setup). Needs the DPR data on disk.

Data: DPR's ``psgs_w100.tsv``, ``biencoder-trivia-train.json`` and ``trivia-test.csv``
under ``data/``.
"""

from qdr_jax.config import apply_paper_setup, base_config


def get_config():
  c = base_config()
  c.data.name = "trivia"
  c.data.format = "dpr"
  c.data.corpus = "data/psgs_w100.tsv"
  c.data.splits = {"train": "data/trivia/biencoder-trivia-train.json",
                   "test": "data/trivia/trivia-test.csv"}
  c.data.allow_missing_positives = True
  c.model.query_encoder = "facebook/dpr-question_encoder-multiset-base"
  c.model.passage_encoder = "facebook/dpr-ctx_encoder-multiset-base"
  c.model.passage_style = "pair"
  c.train.steps = 8000
  c.eval.primary_metric = "top20"
  c.eval.answer_ks = (1, 5, 20, 100)
  return apply_paper_setup(c, encoder_lr=2e-6, temperature=16.0, rebuild_every=1600)
