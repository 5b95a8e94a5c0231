r"""Natural Questions with DPR: the reference recipe (cgmta/dback ``conf/train_nq.yaml``).

Data: DPR's ``psgs_w100.tsv`` (21M Wikipedia passages), ``biencoder-nq-train.json`` and
``nq-test.csv`` under ``data/`` (override with ``--config.data.corpus=...`` etc.). The
initial table can come from DPR's released flat index
(``--config.table.init=faiss --config.table.path=...``) instead of re-encoding 21M passages.
Steps: the reference's 20 epochs of its 58,880 training questions in batches of 32 (last
partial batch dropped). Each value and where it comes from: ``docs/paper-recipe.md``.
"""

from qdr_jax.config import dpr_qa_config


def get_config():
  return dpr_qa_config("nq", train_file="data/nq/biencoder-nq-train.json",
                       dev_file="data/nq/biencoder-nq-dev.json",
                       test_file="data/nq/nq-test.csv",
                       query_encoder="facebook/dpr-question_encoder-single-nq-base",
                       passage_encoder="facebook/dpr-ctx_encoder-single-nq-base",
                       temperature=8.0, rebuild_every=800, steps=20 * (58_880 // 32))
