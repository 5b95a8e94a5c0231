r"""Natural Questions with DPR (the paper's setup). Needs the DPR data on disk.

Data: DPR's ``psgs_w100.tsv`` (21M Wikipedia passages), ``biencoder-nq-train.json`` and
``nq-test.csv`` under ``data/`` (override with ``--config.data.corpus=...`` etc.). The
initial table can come from DPR's released flat index
(``--config.table.init=faiss --config.table.path=...``) instead of re-encoding 21M passages.
"""

from qdr_jax.config import dpr_qa_config


def get_config():
  return dpr_qa_config("nq", train_file="data/nq/biencoder-nq-train.json",
                       test_file="data/nq/nq-test.csv", model_suffix="single-nq-base",
                       temperature=8.0, rebuild_every=800)
