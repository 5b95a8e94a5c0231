r"""TriviaQA: the reference recipe (cgmta/dback ``conf/train_trivia.yaml``).

Data: DPR's ``psgs_w100.tsv``, ``biencoder-trivia-train.json`` and ``trivia-test.csv``
under ``data/``. The reference trains ANCE's multi-dataset DPR-architecture encoders
(its table is pyserini's ANCE-multi Wikipedia flat index: ``--config.table.init=faiss``).
Steps: the reference's 20 epochs of its 60,413 training questions in batches of 32.
Each value and where it comes from: ``docs/paper-recipe.md``.
"""

from qdr_jax.config import dpr_qa_config


def get_config():
  return dpr_qa_config("trivia", train_file="data/trivia/biencoder-trivia-train.json",
                       dev_file="data/trivia/biencoder-trivia-dev.json",
                       test_file="data/trivia/trivia-test.csv",
                       query_encoder="castorini/ance-dpr-question-multi",
                       passage_encoder="castorini/ance-dpr-context-multi",
                       temperature=16.0, rebuild_every=1600, steps=20 * (60_413 // 32))
