r"""Does a trained index serve training positives to queries that never named them?

  python experiments/train.py --config=configs/demo.py --workdir=runs/best \
      --config.checkpoint.every=200
  python experiments/export.py --workdir=runs/best --out=runs/best/bundle
  python experiments/trained_share.py --workdir=runs/best --bundle=runs/best/bundle

For the run's test queries, split into seen and unseen (`split_seen`), prints and writes
(``{workdir}/trained_share.json``) the share of training positives in each query's top
``--k``: on the flat index over the trained table and on the bundle's quantized index (the
served one: learned centroids and codebooks when the run learned them). A served share above
the flat one means the quantizer favours the passages training named. Also the mean norm
of the rows and of their quantized reconstructions, for training positives and the rest
(IVF layouts).
"""

import json
import pathlib

import faiss
import numpy as np
from absl import flags

from qdr_jax.cli import run_main
from qdr_jax.eval.evaluator import score_index
from qdr_jax.eval.metrics import share_in_top, split_seen, subset_means
from qdr_jax.index.faiss_index import build_index, search, set_search_params
from qdr_jax.io_utils import write_text_atomic
from qdr_jax.serving import load_bundle
from qdr_jax.train.restore import restore_trained

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir with checkpoints.")
_BUNDLE = flags.DEFINE_string("bundle", None, "Its bundle (experiments/export.py).")
_K = flags.DEFINE_integer("k", 10, "Top-k whose share is measured.")
flags.mark_flags_as_required(["workdir", "bundle"])


def ndcg_by_subset(index, vectors: np.ndarray, split, corpus,
                   subsets: dict[str, list[str]]) -> dict[str, float | None]:
  """nDCG@10 of ``index`` (as its search settings stand) on each subset of the queries."""
  scored = score_index(index, vectors, split, corpus, measures=("nDCG@10",))
  return {name: entry["nDCG@10"]
          for name, entry in subset_means(scored.query_ids, scored.per_query, subsets).items()}


def main(argv):
  del argv
  run = restore_trained(_WORKDIR.value)
  bundle = load_bundle(_BUNDLE.value)
  config, dataset = run["config"], run["dataset"]
  table = np.asarray(run["table"], np.float32)
  if list(bundle.ids) != list(dataset.corpus.ids):
    raise SystemExit(f"--bundle={_BUNDLE.value}: its passage ids are not the run's corpus.")
  train = dataset.splits[config.data.train_split]
  test = dataset.splits[config.data.eval_split]
  row_of = {pid: row for row, pid in enumerate(bundle.ids)}
  trained = np.zeros(len(table), bool)
  trained[[row_of[str(d)] for docs in train.qrels.values() for d, rel in docs.items()
           if rel > 0 and str(d) in row_of]] = True
  queries = list(test.queries.ids)
  vectors = bundle.embed(list(test.queries.texts))
  flat_index = build_index(table, "Flat")
  _, served = search(bundle.index, vectors, _K.value)
  _, flat = search(flat_index, vectors, _K.value)
  result = {"workdir": _WORKDIR.value, "k": _K.value, "rows": len(table),
            "trained_rows": int(trained.sum())}
  subsets = dict(zip(("seen", "unseen"), split_seen(test.qrels, train.qrels, queries)))
  position = {q: i for i, q in enumerate(queries)}
  for name, ids in subsets.items():
    rows = [position[q] for q in ids]
    result[name] = {"queries": len(rows), "flat": share_in_top(flat[rows], trained),
                    "served": share_in_top(served[rows], trained)}
  subsets["all"] = queries
  ndcg = lambda index: ndcg_by_subset(index, vectors, test, dataset.corpus, subsets)
  result["nDCG@10"] = {"flat": ndcg(flat_index), "served": ndcg(bundle.index)}
  ivf = faiss.try_extract_index_ivf(bundle.index)
  if ivf is not None:
    served_nprobe = ivf.nprobe
    set_search_params(bundle.index, nprobe=ivf.nlist)
    result["nDCG@10"]["served_every_list"] = ndcg(bundle.index)
    set_search_params(bundle.index, nprobe=served_nprobe)
    result["nDCG@10"]["nprobe"] = served_nprobe
    # An OPQ pre-transform is a rotation: norms are the same before it.
    ivf.make_direct_map()
    recon = np.linalg.norm(ivf.reconstruct_n(0, ivf.ntotal), axis=1)
    norms = np.linalg.norm(table, axis=1)
    result["norms"] = {
        "row_trained": float(norms[trained].mean()), "row_other": float(norms[~trained].mean()),
        "reconstruction_trained": float(recon[trained].mean()),
        "reconstruction_other": float(recon[~trained].mean())}
  text = json.dumps(result, indent=1)
  write_text_atomic(pathlib.Path(_WORKDIR.value) / "trained_share.json", text)
  print(text)


if __name__ == "__main__":
  run_main(main)
