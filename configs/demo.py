r"""Demo: all-MiniLM-L6-v2 on the bundled SciFact (BEIR), IVF64,PQ48x8 (32x compression).

Finishes in under 10 minutes on 2 CPU cores once the corpus table is cached (the first
run embeds the 5,183 abstracts, a few minutes more). Arguments (``configs/demo.py:steps=50``):
  steps: training steps; mode: dback | dback_no_ste | jpq | query_only | posthoc;
  pq: sub-quantizers of the PQ (48 -> 32x, 16 -> 96x compression at d=384).
"""

from qdr_jax.config import base_config, parse_arg


def get_config(arg: str | None = None):
  args = parse_arg(arg, steps=200, mode="dback", pq=48)
  c = base_config()
  c.data.name = "scifact"
  c.data.format = "beir"
  c.data.root = "demo:scifact"
  c.data.train_split = "train"
  c.data.eval_split = "test"

  c.model.query_encoder = "all-MiniLM-L6-v2"
  c.model.max_query_length = 64
  c.model.max_passage_length = 256
  c.model.passage_style = "concat"

  c.index.factory = f"IVF64,PQ{args.pq}x8"
  c.index.nprobe = 16
  c.index.rebuild_every = 50

  c.negatives.k = 100
  c.loss.temperature = 0.05
  c.optim.encoder_lr = 2e-5
  c.optim.row_lr = 1e-4
  c.optim.warmup_steps = 20
  c.table.normalize_rows = False
  c.train.mode = args.mode
  c.train.batch_size = 32
  c.train.steps = args.steps
  c.eval.index_seeds = (0, 1, 2)
  c.eval.primary_metric = "nDCG@10"
  return c
