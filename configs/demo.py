r"""Demo: all-MiniLM-L6-v2 on the bundled SciFact (BEIR), IVF64,PQ48x8 (32x compression).

Finishes in under 10 minutes on 2 CPU cores once the corpus table is cached (the first
run embeds the 5,183 abstracts, about 6 minutes more). Arguments
(``--config=configs/demo.py:steps=50,mode=jpq``):
  steps: training steps; mode: dback | dback_no_ste | jpq | query_only | posthoc, with the
    index parameters it learns as well appended (``mode=dback+codebooks+centroids``);
  pq: sub-quantizers of the PQ (48 -> 32x, 16 -> 96x compression at d=384).
"""

from qdr_jax.config import apply_minilm_setup, base_config, parse_arg


def get_config(arg: str | None = None):
  args = parse_arg(arg, steps=200, mode="dback", pq=48)
  c = base_config()
  c.data.name = "scifact"
  c.data.format = "beir"
  c.data.root = "demo:scifact"
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.index.factory = f"IVF64,PQ{args.pq}x8"
  c.index.nprobe = 16
  c.eval.primary_metric = "nDCG@10"
  return apply_minilm_setup(c, steps=args.steps, mode=args.mode)
