r"""MS MARCO passage ranking with ANCE (the paper's setup). Needs the data on disk.

Data: MS MARCO passage in BEIR layout (``corpus.jsonl``, ``queries.jsonl``,
``qrels/train.tsv``, ``qrels/dev.tsv``) under ``data/msmarco``; scored by MRR@10 on dev.
"""

from qdr_jax.config import apply_paper_setup, base_config


def get_config():
  c = base_config()
  c.data.name = "msmarco"
  c.data.format = "beir"
  c.data.root = "data/msmarco"
  c.data.eval_split = "dev"
  c.model.query_encoder = "castorini/ance-msmarco-passage"
  c.model.passage_style = "concat"
  c.train.steps = 10000
  c.eval.measures = ("MRR@10", "R@100", "R@1000", "nDCG@10")
  c.eval.primary_metric = "MRR@10"
  c = apply_paper_setup(c, encoder_lr=1e-7, temperature=8.0, rebuild_every=500)
  c.model.max_query_length = 32
  return c
