r"""MS MARCO passage ranking with ANCE: the reference recipe (cgmta/dback
``conf/train_ms.yaml``, ``train_ms.py``). Needs the data on disk.

Data: MS MARCO passage in BEIR layout (``corpus.jsonl``, ``queries.jsonl``,
``qrels/train.tsv``, ``qrels/dev.tsv``) under ``data/msmarco``; scored by MRR@10 on dev.
Steps: the reference's 20 epochs of 502,939 training queries in batches of 32. Each value
and where it comes from: ``docs/paper-recipe.md``.
"""

from qdr_jax.config import apply_paper_setup, base_config


def get_config():
  c = base_config()
  c.data.name = "msmarco"
  c.data.format = "beir"
  c.data.root = "data/msmarco"
  c.data.eval_split = "dev"
  # MS MARCO's dev queries are the evaluated split: selection reads 2,000 training queries
  # held out with their positives.
  c.data.dev_split = "heldout"
  c.data.dev_queries = 2000
  c.model.query_encoder = "castorini/ance-msmarco-passage"
  c.model.passage_style = "concat"
  c.eval.measures = ("MRR@10", "R@10", "R@100", "R@1000", "nDCG@10")
  c.eval.primary_metric = "MRR@10"
  c = apply_paper_setup(c, encoder_lr=1e-7, temperature=8.0, rebuild_every=500,
                        steps=20 * (502_939 // 32))
  # train_ms.py encodes the training queries without a gradient and without autocast:
  # only the rows learn (the encoder's 1e-7 never applies), in float32.
  c.train.mode = "rows_only"
  c.model.dtype = "float32"
  return c
