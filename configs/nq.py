r"""Natural Questions with DPR (the paper's setup). Needs the DPR data on disk.

Data: DPR's ``psgs_w100.tsv`` (21M Wikipedia passages), ``biencoder-nq-train.json`` and
``nq-test.csv`` under ``data/`` (override with ``--config.data.corpus=...`` etc.). The
initial table can come from DPR's released flat index
(``--config.table.init=faiss --config.table.path=...``) instead of re-encoding 21M passages.
"""

from qdr_jax.config import apply_paper_setup, base_config


def get_config():
  c = base_config()
  c.data.name = "nq"
  c.data.format = "dpr"
  c.data.corpus = "data/psgs_w100.tsv"
  c.data.splits = {"train": "data/nq/biencoder-nq-train.json", "test": "data/nq/nq-test.csv"}
  c.data.allow_missing_positives = True
  c.model.query_encoder = "facebook/dpr-question_encoder-single-nq-base"
  c.model.passage_encoder = "facebook/dpr-ctx_encoder-single-nq-base"
  c.model.passage_style = "pair"
  c.train.steps = 8000
  c.eval.primary_metric = "top20"
  c.eval.answer_ks = (1, 5, 20, 100)
  return apply_paper_setup(c, encoder_lr=2e-6, temperature=8.0, rebuild_every=800)
