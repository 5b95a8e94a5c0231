r"""Share of rows whose exact coarse list differs from an HNSW coarse quantizer's.

  python benchmarks/hnsw_coarse_share.py --rows=50000 --nlist=1024 --out=hnsw.json

The live codes (`qdr_jax.quant.pq.encode_with_lists`) assign each row to its exact
nearest coarse centroid; an ``IVF..._HNSW32`` index assigns it with an approximate HNSW
search over the centroids (efSearch of them visited), and a row whose two lists differ
gets other residual PQ codes too. On clustered unit vectors (as normalised sentence
embeddings are) with k-means centroids, this counts such rows for a few efSearch
values, in the inner-product metric the retrieval indexes use. Prints and writes JSON.
"""

import json
import time

import faiss
import numpy as np
from absl import flags

from qdr_jax.cli import run_main
from qdr_jax.io_utils import write_json_atomic

_ROWS = flags.DEFINE_integer("rows", 50_000, "Vectors assigned.")
_DIM = flags.DEFINE_integer("dim", 64, "Vector width.")
_NLIST = flags.DEFINE_integer("nlist", 1024, "Coarse centroids.")
_EF = flags.DEFINE_list("ef_search", ["16", "64", "128"],
                        "HNSW efSearch values (16: FAISS's default).")
_SEED = flags.DEFINE_integer("seed", 0, "Data and k-means seed.")
_OUT = flags.DEFINE_string("out", None, "JSON output path.")


def main(argv):
  del argv
  rng = np.random.default_rng(_SEED.value)
  d, n = _DIM.value, _ROWS.value
  centers = rng.normal(size=(256, d))
  x = centers[rng.integers(0, len(centers), n)] + 0.6 * rng.normal(size=(n, d))
  x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
  kmeans = faiss.Kmeans(d, _NLIST.value, niter=10, seed=_SEED.value, spherical=True)
  kmeans.train(x)
  centroids = kmeans.centroids
  exact = faiss.IndexFlatIP(d)
  exact.add(centroids)
  _, exact_ids = exact.search(x, 1)
  hnsw = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
  hnsw.add(centroids)
  result = {"rows": n, "dim": d, "nlist": _NLIST.value, "hnsw_m": 32, "metric": "ip",
            "seed": _SEED.value, "share_differing": {}, "seconds": {}}
  for ef in map(int, _EF.value):
    hnsw.hnsw.efSearch = ef
    start = time.perf_counter()
    _, ids = hnsw.search(x, 1)
    result["seconds"][ef] = round(time.perf_counter() - start, 3)
    result["share_differing"][ef] = float(np.mean(ids[:, 0] != exact_ids[:, 0]))
  text = json.dumps(result, indent=1)
  print(text)
  if _OUT.value:
    write_json_atomic(_OUT.value, result)


if __name__ == "__main__":
  run_main(main)
