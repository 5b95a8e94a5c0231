"""Building FAISS indexes over a target-embedding table: train (seeded), fill, rebuild, and
build the config's quantized index once per k-means seed.

What `build_index(..., seed=s)` seeds (FAISS otherwise uses fixed defaults, 1234 for k-means):
  * the training sample, when `train_size` > 0 (numpy `default_rng(s)`);
  * the k-means of every IVF coarse quantizer (`IndexIVF.cp.seed`);
  * the k-means of every product quantizer (`ProductQuantizer.cp.seed`), for IVFPQ, PQ,
    HNSW-PQ and fast-scan variants;
  * the k-means inside OPQ training: FAISS exposes no seed on `OPQMatrix`, but it trains
    through the `OPQMatrix.pq` it is given, so we lend it a seeded `ProductQuantizer` for the
    duration of training. OPQ's initial random rotation and its subsampling keep FAISS's
    fixed internal seeds;
  * random rotations (`RR{d}`) via `RandomRotationMatrix.init(s)`.
Not seeded: the HNSW level generator (a fixed FAISS seed). Builds were bit-identical in our
tests, but FAISS inserts into HNSW graphs in parallel, so with several threads an HNSW graph
is not guaranteed identical across runs; pass `threads=1` where that matters.

Polysemous training: the factory turns it on for any 8-bit PQ without the `np` suffix and it
is slow (about 90 s for PQ48 on 50k vectors) and useless for plain PQ search, so `build_index`
switches it off (`do_polysemous_training = False`) unless `polysemous=True`; writing `np` in
the factory string is therefore optional.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
from absl import logging

from qdr_jax.index.layout import (METRIC_NAMES, METRICS, OPQ_NBITS, clustering_sizes,
                                  describe_index, factory_string, has_opq, hnsw_graphs,
                                  ivf_stage, make_index, sub_indexes, transforms)
from qdr_jax.index.searching import as_matrix, num_threads, set_search_params

# FAISS's k-means wants this many training points per centroid (its default
# ClusteringParameters.min_points_per_centroid) and prints a warning line for every
# k-means below it: one per PQ sub-quantizer, hundreds per small build. We lower FAISS's
# threshold so that it stays quiet and log one warning per build ourselves.
MIN_POINTS_PER_CENTROID = 39


# ----------------------------------------------------------------------------- training


def _configure_training(
    index: faiss.Index, seed: int, opq_niter: int | None, polysemous: bool
) -> list[tuple[object, faiss.ProductQuantizer]]:
  """Seeds every clustering step in `index` and sets its training options.

  Returns (OPQMatrix, lent ProductQuantizer) pairs: the caller must keep them alive during
  training and detach them afterwards (the OPQMatrix stores only a raw pointer).
  """
  for obj in sub_indexes(index):
    cp = getattr(obj, "cp", None)
    if isinstance(cp, faiss.ClusteringParameters):
      cp.seed = seed
      cp.min_points_per_centroid = 1  # train_index warns once instead
    pq = getattr(obj, "pq", None)
    if isinstance(pq, faiss.ProductQuantizer):
      pq.cp.seed = seed
      pq.cp.min_points_per_centroid = 1
    if hasattr(obj, "do_polysemous_training"):
      obj.do_polysemous_training = bool(polysemous)
  lent = []
  for vt in transforms(index):
    if isinstance(vt, faiss.OPQMatrix):
      if opq_niter is not None:
        vt.niter = int(opq_niter)
      # OPQMatrix.train builds a default-seeded PQ unless it is handed one; lend a seeded
      # one (M sub-quantizers of 8 bits, as FAISS's default) over the output space.
      pq = faiss.ProductQuantizer(vt.d_out, vt.M, OPQ_NBITS)
      pq.cp.seed = seed
      pq.cp.min_points_per_centroid = 1
      vt.pq = pq
      lent.append((vt, pq))
    elif isinstance(vt, faiss.RandomRotationMatrix) and not vt.is_trained:
      vt.init(seed)
  return lent


def _warn_few_points(index: faiss.Index, factory: str, num_points: int) -> None:
  """One log line per build where FAISS would print one per k-means."""
  few = [f"{name} ({k} centroids)" for name, k in clustering_sizes(index)
         if num_points < MIN_POINTS_PER_CENTROID * k]
  if few:
    logging.warning("Index %r trains on %d points, fewer than the %d per centroid FAISS "
                    "recommends for: %s; its clustering may be poor.", factory, num_points,
                    MIN_POINTS_PER_CENTROID, ", ".join(few))


# ----------------------------------------------------------------------------- building


def build_index(
    vectors: np.ndarray,
    factory: str,
    *,
    train_size: int = 0,
    seed: int = 0,
    threads: int | None = None,
    **options,
) -> faiss.Index:
  """Trains an index described by a FAISS factory string and adds all `vectors` to it.

  Row i of `vectors` gets search id i.

  Args:
    vectors: (N, d) table; converted to contiguous float32.
    factory: FAISS index_factory string, e.g. "IVF256,PQ48x8" or "OPQ48,IVF256,PQ48".
    train_size: rows used to train the quantizers; 0 means all rows, otherwise a seeded
      random sample of min(train_size, N) rows (`training_rows`).
    seed: seeds the training sample and every k-means (see the module docstring).
    threads: FAISS threads for building (restored afterwards); None keeps the current count.
    **options: `train_index`'s options (nprobe, ef_search, opq_niter, metric, polysemous).

  Returns:
    The trained, filled index.
  """
  x = as_matrix(vectors, "vectors")
  n = x.shape[0]
  if n == 0:
    raise ValueError("Cannot build an index from an empty table.")
  if train_size < 0:
    raise ValueError(f"train_size must be >= 0, got {train_size}.")
  rows = training_rows(n, train_size, seed)
  index = train_index(x if rows is None else x[rows], factory, seed=seed, threads=threads,
                      **options)
  add_vectors(index, x, threads=threads)
  return index


def training_rows(num_rows: int, train_size: int, seed: int) -> np.ndarray | None:
  """The sorted rows a quantizer of `train_size` rows trains on; None means all rows.

  A pure function of its arguments, so a caller that streams the table from elsewhere
  (the devices of a training run) trains on exactly the rows `build_index` would.
  """
  if 0 < train_size < num_rows:
    return np.sort(np.random.default_rng(seed).choice(num_rows, size=train_size,
                                                      replace=False))
  return None


def train_index(
    sample: np.ndarray,
    factory: str,
    *,
    seed: int = 0,
    nprobe: int | None = None,
    ef_search: int | None = None,
    opq_niter: int | None = None,
    threads: int | None = None,
    metric: str = "ip",
    polysemous: bool = False,
    rabitq_qb: int | None = None,
) -> faiss.Index:
  """An empty index of `factory` whose quantizers are trained on `sample`.

  The first half of `build_index`: fill it with `add_vectors`, in chunks if the table
  does not fit in one host's memory.

  Args:
    sample: (n, d) training vectors.
    factory: FAISS index_factory string, e.g. "IVF256,PQ48x8" or "OPQ48,IVF256,PQ48".
    seed: seeds every k-means (see the module docstring).
    nprobe: IVF lists probed at search time (None: FAISS default, 1).
    ef_search: HNSW search breadth, for an HNSW index or an IVF's HNSW coarse quantizer.
    opq_niter: OPQ iterations (FAISS default 50; 10 is about 4x faster to train).
      nprobe, ef_search and opq_niter are ignored where the layout has no IVF / HNSW / OPQ
      stage, so that one config can serve every factory string; `describe_index` shows what
      applied. `set_search_params` is strict instead.
    threads: FAISS threads for training (restored afterwards); None keeps the current count.
    metric: "ip" (inner product) or "l2".
    polysemous: keep FAISS's polysemous PQ training (slow; off by default).
    rabitq_qb: bits a RaBitQ index quantizes a query to (0: the float query; None:
      FAISS's default, 4); ignored for other layouts.
  """
  if metric not in METRICS:
    raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}.")
  train = as_matrix(sample, "training vectors")
  if train.shape[0] == 0:
    raise ValueError("Cannot train an index on no vectors.")
  if not np.isfinite(train).all():
    raise ValueError("vectors contain NaN or infinite values.")
  index = make_index(train.shape[1], factory, METRICS[metric])
  # Search parameters survive training and adding; set them first so bad values fail fast.
  set_search_params(index, nprobe=nprobe, ef_search=ef_search, rabitq_qb=rabitq_qb,
                    strict=False)
  ivf = ivf_stage(index)
  if ivf is not None and not index.is_trained and train.shape[0] < ivf.nlist:
    raise ValueError(
        f"{factory!r} needs at least nlist={ivf.nlist} training vectors, got {train.shape[0]}.")
  with num_threads(threads):
    lent = _configure_training(index, seed, opq_niter, polysemous)
    if not index.is_trained:
      _warn_few_points(index, factory, train.shape[0])
      try:
        index.train(train)
      finally:
        # The lent PQs die with this frame; leave no dangling pointer behind.
        for vt, _ in lent:
          vt.pq = None
  return index


def add_vectors(index: faiss.Index, vectors: np.ndarray, *, threads: int | None = None
                ) -> None:
  """Appends `vectors` to a trained index; they get the next ids (ntotal, ntotal+1, ...)."""
  x = as_matrix(vectors, "vectors", d=index.d)
  if not np.isfinite(x).all():
    raise ValueError("vectors contain NaN or infinite values.")
  if not len(x):  # FAISS's fast-scan indexes crash on an empty add
    return
  with num_threads(threads):
    index.add(x)


def rebuild_index(
    old_index_or_factory: faiss.Index | str, vectors: np.ndarray, **kwargs
) -> faiss.Index:
  """Builds a fresh index with the same layout as an existing one over a new table.

  From an index, the factory string (see `factory_string`), metric, nprobe and
  efSearch are carried over; training options (seed, train_size, opq_niter, threads) are not
  stored in an index and come from `kwargs` (same names as `build_index`), which also override
  anything carried over.
  """
  if isinstance(old_index_or_factory, str):
    return build_index(vectors, old_index_or_factory, **kwargs)
  old = old_index_or_factory
  factory = factory_string(old)
  if factory is None:
    raise ValueError(
        f"Cannot recover a factory string from {type(faiss.downcast_index(old)).__name__}; "
        "pass the factory string instead.")
  x = as_matrix(vectors, "vectors", d=old.d)
  params = describe_index(old)
  carried = {"metric": METRIC_NAMES.get(old.metric_type, "ip")}
  if params["nprobe"] is not None:
    carried["nprobe"] = params["nprobe"]
  if params["ef_search"] is not None:
    carried["ef_search"] = params["ef_search"]
  carried.update(kwargs)
  return build_index(x, factory, **carried)


# ----------------------------------------------------------------------------- configs


# Bits a RaBitQ index rounds each query to (FAISS's default is 4): 0 scores the float
# query, which is what the straight-through loss scores, so training and search agree.
RABITQ_QB = 0
# FAISS threads for the config's builds; 0 keeps FAISS's default, which users set with
# OMP_NUM_THREADS.
FAISS_THREADS = 0


def index_options(index_cfg) -> dict:
  """`train_index` / `build_index` keyword arguments from a config's `index` section
  (everything but the factory string, the seed and the training sample)."""
  return dict(nprobe=index_cfg.nprobe, ef_search=index_cfg.ef_search or None,
              opq_niter=index_cfg.opq_niter, threads=FAISS_THREADS or None,
              rabitq_qb=RABITQ_QB)


def build_quantized(table: np.ndarray, index_cfg, seed: int, factory: str | None = None,
                    *, threads: int | None = None) -> faiss.Index:
  """The config's quantized index over `table` with k-means seed `seed` (`threads`
  overrides `FAISS_THREADS`)."""
  options = index_options(index_cfg)
  if threads is not None:
    options["threads"] = threads
  return build_index(table, factory or index_cfg.factory, train_size=index_cfg.train_size,
                     seed=seed, **options)


def seed_build_workers(factory: str, dim: int, builds: int, concurrent: int
                       ) -> tuple[int, int | None]:
  """(builds at once, FAISS threads each) for ``builds`` indexes of ``factory`` with
  different seeds, up to ``concurrent`` at a time (see `build_quantized_seeds`): 1 for a
  layout whose training depends on the thread count (OPQ, HNSW), then with the thread
  count left alone (None)."""
  workers = max(1, min(int(concurrent), builds))
  if workers > 1:
    probe = make_index(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if has_opq(probe) or hnsw_graphs(probe):
      workers = 1
  if workers == 1:
    return 1, None
  return workers, max(1, (FAISS_THREADS or faiss.omp_get_max_threads()) // workers)


def build_quantized_seeds(table: np.ndarray, index_cfg, seeds: Sequence[int],
                          concurrent: int = 1) -> Iterator[faiss.Index]:
  """`build_quantized` once per k-means seed, in seed order, up to `concurrent` at a time.

  One at a time, each index is built when the iterator reaches it, so a caller that
  drops each after use holds one index at a time; concurrent builds are held together.

  A FAISS k-means leaves cores idle between its many small calls: on 2 cores three
  single-threaded builds of the demo's IVF64,PQ48x8 at once took 17.6 s, three 2-thread
  builds in a row 26.0 s. Concurrent builds run in threads (FAISS releases the GIL) that
  split the FAISS thread budget (`FAISS_THREADS`, or every core) between them. IVF and PQ
  k-means do not depend on the thread count, so each index is the one `build_quantized`
  builds, bit for bit (tested). OPQ training and HNSW graphs do depend on it, so layouts
  with either are built one after another.
  """
  seeds = [int(s) for s in seeds]
  workers, threads = seed_build_workers(index_cfg.factory, np.shape(table)[1], len(seeds),
                                        concurrent)
  if workers == 1:
    return (build_quantized(table, index_cfg, seed) for seed in seeds)
  # OpenMP thread counts are per calling thread: each worker sets its own in build_index.
  with ThreadPoolExecutor(workers, thread_name_prefix="faiss-build") as pool:
    return iter(list(pool.map(lambda seed: build_quantized(table, index_cfg, seed,
                                                           threads=threads), seeds)))
