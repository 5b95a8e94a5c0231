r"""SQuAD v1.1 dev as open-domain QA: all-MiniLM-L6-v2, train and test split by article.

The bundled SQuAD dev set is converted in memory (paragraphs as passages, as
``experiments/convert_squad.py`` writes them); questions of the train articles train,
those of the test articles are scored by DPR-style answer accuracy (top-k) and by
ranking metrics with their own paragraph as the positive. Train and test share no
passage, so target-row updates cannot leak into the test split. Candidates that contain
a training question's answer but are not its paragraph are hidden from its softmax.
Arguments: steps, mode, pq (as in configs/demo.py).
"""

from qdr_jax.config import apply_minilm_setup, base_config, parse_arg


def get_config(arg: str | None = None):
  args = parse_arg(arg, steps=200, mode="dback", pq=48)
  c = base_config()
  c.data.name = "squad-dev-by-article"
  c.data.format = "squad"
  c.data.root = "demo:squad/dev-v1.1.json.gz"
  c.data.test_fraction = 0.25
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.dev_split = "dev"        # 500 training questions held out with their paragraphs
  c.data.dev_queries = 500
  c.index.factory = f"IVF32,PQ{args.pq}x8"
  c.index.nprobe = 8
  c.negatives.hide_answer_matches = True
  c.eval.measures = ("nDCG@10", "MRR@10", "R@10", "R@100")
  c.eval.answer_ks = (1, 5, 20, 100)
  c.eval.primary_metric = "top20"
  return apply_minilm_setup(c, steps=args.steps, mode=args.mode)
