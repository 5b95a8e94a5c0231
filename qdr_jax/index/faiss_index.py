"""Build, tune, search, save and describe FAISS indexes over a target-embedding table.

Every index is made with `faiss.index_factory`, so any factory string works; the helpers here
know about the shapes this project uses: `Flat`, `PQ{m}[x{b}]`, `IVF{n},PQ{m}[x{b}]`,
`OPQ{m}[_{d}],IVF{n},PQ{m}`, `IVF{n}_HNSW{M},PQ{m}` (the paper's `IVF4096_HNSW32,PQ128`) and
`HNSW{M},PQ{m}`.

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

Metric: FAISS's factory silently builds `HNSW{M},PQ{m}` with L2 whatever metric it is given;
`build_index` then constructs `IndexHNSWPQ` itself with the requested metric, and raises for
any other factory string whose metric FAISS drops. (HNSW graphs navigate inner-product spaces
well only for normalised vectors.)

Scores: `search` always returns "higher is better" scores: inner products for
`metric='ip'`, negated squared distances for `metric='l2'`.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
from absl import logging
from faiss.contrib.factory_tools import reverse_index_factory

from qdr_jax.index.refresh import supports_incremental_refresh
from qdr_jax.io_utils import atomic_path
from qdr_jax.quant.faiss_bridge import supports_straight_through

_METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
_METRIC_NAMES = {v: k for k, v in _METRICS.items()}
# FAISS's factory builds "HNSW{M},PQ{m}" with the L2 metric whatever metric it is given.
_HNSW_PQ = re.compile(r"HNSW(\d+)[,_]PQ(\d+)(?:x(\d+))?(?:np)?")
# FAISS's k-means wants this many training points per centroid (its default
# ClusteringParameters.min_points_per_centroid) and prints a warning line for every
# k-means below it: one per PQ sub-quantizer, hundreds per small build. We lower FAISS's
# threshold so that it stays quiet and log one warning per build ourselves.
MIN_POINTS_PER_CENTROID = 39


# ----------------------------------------------------------------------------- threads


def set_num_threads(n: int) -> None:
  """Sets FAISS's OpenMP thread count for every later call (process-wide)."""
  if n < 1:
    raise ValueError(f"threads must be >= 1, got {n}.")
  faiss.omp_set_num_threads(int(n))


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[None]:
  """Runs a block with `n` FAISS threads, then restores the previous count (None: no change)."""
  if n is None:
    yield
    return
  previous = faiss.omp_get_max_threads()
  set_num_threads(n)
  try:
    yield
  finally:
    faiss.omp_set_num_threads(previous)


# ----------------------------------------------------------------------------- walking


def _sub_indexes(index: faiss.Index) -> Iterator[object]:
  """Yields the downcast index and every index nested in it (pre-transforms, id maps,
  HNSW storage, IVF quantizers, refine stages), depth first.

  The yielded objects borrow memory from `index`: keep `index` alive while using them.
  """
  obj = faiss.downcast_index(index)
  yield obj
  for attr in ("index", "storage", "quantizer", "base_index", "refine_index"):
    child = getattr(obj, attr, None)
    if isinstance(child, faiss.Index):
      yield from _sub_indexes(child)


def _transforms(index: faiss.Index) -> list[object]:
  """Downcast vector transforms of every IndexPreTransform inside `index`."""
  out = []
  for obj in _sub_indexes(index):
    if isinstance(obj, faiss.IndexPreTransform):
      out.extend(faiss.downcast_VectorTransform(obj.chain.at(i)) for i in range(obj.chain.size()))
  return out


def _find(index: faiss.Index, cls: type) -> object | None:
  for obj in _sub_indexes(index):
    if isinstance(obj, cls):
      return obj
  return None


def _ivf(index: faiss.Index) -> faiss.IndexIVF | None:
  return _find(index, faiss.IndexIVF)


def _has_opq(index: faiss.Index) -> bool:
  index = faiss.downcast_index(index)
  return isinstance(index, faiss.IndexPreTransform) and any(
      isinstance(faiss.downcast_VectorTransform(index.chain.at(i)), faiss.OPQMatrix)
      for i in range(index.chain.size()))


def _hnsw_objects(index: faiss.Index) -> list[faiss.IndexHNSW]:
  """HNSW graphs anywhere in the index: the main index or an IVF coarse quantizer."""
  return [obj for obj in _sub_indexes(index) if isinstance(obj, faiss.IndexHNSW)]


# ----------------------------------------------------------------------------- building


def _as_matrix(x: np.ndarray, name: str, d: int | None = None) -> np.ndarray:
  x = np.ascontiguousarray(x, dtype=np.float32)
  if x.ndim != 2:
    raise ValueError(f"{name} must be 2-D (n, d), got shape {x.shape}.")
  if d is not None and x.shape[1] != d:
    raise ValueError(f"{name} have dimension {x.shape[1]}, the index has {d}.")
  return x


def _configure_training(
    index: faiss.Index, seed: int, opq_niter: int | None, polysemous: bool
) -> list[tuple[object, faiss.ProductQuantizer]]:
  """Seeds every clustering step in `index` and sets its training options.

  Returns (OPQMatrix, lent ProductQuantizer) pairs: the caller must keep them alive during
  training and detach them afterwards (the OPQMatrix stores only a raw pointer).
  """
  for obj in _sub_indexes(index):
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
  for vt in _transforms(index):
    if isinstance(vt, faiss.OPQMatrix):
      if opq_niter is not None:
        vt.niter = int(opq_niter)
      # OPQMatrix.train builds a default-seeded PQ unless it is handed one; lend a seeded
      # one (M sub-quantizers of 8 bits, as FAISS's default) over the output space.
      pq = faiss.ProductQuantizer(vt.d_out, vt.M, _OPQ_NBITS)
      pq.cp.seed = seed
      pq.cp.min_points_per_centroid = 1
      vt.pq = pq
      lent.append((vt, pq))
    elif isinstance(vt, faiss.RandomRotationMatrix) and not vt.is_trained:
      vt.init(seed)
  return lent


_OPQ_NBITS = 8  # the bits of the PQ OPQ trains through (FAISS's default)


def clustering_sizes(index: faiss.Index) -> list[tuple[str, int]]:
  """(stage, centroids) of every k-means that training `index` runs: the IVF coarse
  quantizer (nlist), the PQ sub-quantizers (2**nbits each) and OPQ's PQ."""
  sizes = []
  for obj in _sub_indexes(index):
    if isinstance(obj, faiss.IndexIVF):
      sizes.append(("IVF coarse quantizer", int(obj.nlist)))
    pq = getattr(obj, "pq", None)
    if isinstance(pq, faiss.ProductQuantizer):
      sizes.append((f"PQ{pq.M}x{pq.nbits} sub-quantizers", int(pq.ksub)))
  for vt in _transforms(index):
    if isinstance(vt, faiss.OPQMatrix):
      sizes.append((f"OPQ{vt.M} rotation's PQ", 2 ** _OPQ_NBITS))
  return sizes


def factory_layout(factory: str, dim: int, metric: str = "ip") -> dict:
  """What an untrained `factory` index over `dim` dimensions is made of, for config-time
  checks: ``{"nlist": IVF lists (0 without IVF), "clusterings": clustering_sizes,
  "rabitq_bits": bits a dimension of its RaBitQ codes (0: not RaBitQ)}``.

  Raises:
    ValueError: the factory string is invalid for `dim` (see `check_index_for_mode`).
  """
  index = _make_index(dim, factory, _METRICS[metric])
  ivf = _ivf(index)
  rabitq = _find(index, (faiss.IndexRaBitQ, faiss.IndexIVFRaBitQ))
  return {"nlist": int(ivf.nlist) if ivf is not None else 0,
          "clusterings": clustering_sizes(index),
          "rabitq_bits": int(rabitq.rabitq.nb_bits) if rabitq is not None else 0}


def _warn_few_points(index: faiss.Index, factory: str, num_points: int) -> None:
  """One log line per build where FAISS would print one per k-means."""
  few = [f"{name} ({k} centroids)" for name, k in clustering_sizes(index)
         if num_points < MIN_POINTS_PER_CENTROID * k]
  if few:
    logging.warning("Index %r trains on %d points, fewer than the %d per centroid FAISS "
                    "recommends for: %s; its clustering may be poor.", factory, num_points,
                    MIN_POINTS_PER_CENTROID, ", ".join(few))


def _make_index(d: int, factory: str, metric: int) -> faiss.Index:
  """index_factory, checking that the requested metric survived."""
  try:
    index = faiss.index_factory(d, factory, metric)
  except RuntimeError as e:
    # FAISS's message ends with the reason, after the C++ location.
    reason = str(e).strip().splitlines()[-1].split(": ")[-1] if str(e).strip() else ""
    raise ValueError(f"Invalid FAISS factory string {factory!r} for d={d}: {reason}") from e
  if index.metric_type != metric:
    match = _HNSW_PQ.fullmatch(factory.replace(" ", ""))
    if match is None:
      raise ValueError(
          f"FAISS's index_factory ignored the {_METRIC_NAMES[metric]!r} metric for {factory!r}.")
    hnsw_m, pq_m, nbits = int(match[1]), int(match[2]), int(match[3] or 8)
    index = faiss.IndexHNSWPQ(d, pq_m, hnsw_m, nbits, metric)
  return index


def check_index_for_mode(
    factory: str,
    dim: int,
    *,
    needs_quantizer: bool,
    incremental: bool,
    learn: Sequence[str] = (),
    metric: str = "ip",
) -> None:
  """Checks at config time, before any embedding, that a run can use `factory`.

  Builds the untrained index for `dim`-dimensional vectors (no data, no training) and
  looks at its layout.

  Args:
    factory: the FAISS index_factory string (`config.index.factory`).
    dim: the embedding dimension.
    needs_quantizer: the loss quantizes targets with a JAX copy of the index's quantizer
      (straight-through modes).
    learn: the index parameters the run trains and writes back (`config.quant.learn`:
      "codebooks", "centroids", "rotation").
    incremental: the run refreshes the index in place between full rebuilds
      (`full_rebuild_every > 0`).
    metric: "ip" or "l2".

  Raises:
    ValueError: one sentence naming the factory string and what is wrong with it.
  """
  if metric not in _METRICS:
    raise ValueError(f"metric must be one of {sorted(_METRICS)}, got {metric!r}.")
  try:
    index = _make_index(dim, factory, _METRICS[metric])
  except ValueError as e:
    if "number of subquantizers" in str(e):
      counts = ", ".join(re.findall(r"(?<![A-Za-z])PQ(\d+)", factory)) or "?"
      raise ValueError(f"Index factory {factory!r}: the PQ sub-quantizer count ({counts}) "
                       f"does not divide the dimension {dim}.") from None
    raise
  kind = type(faiss.downcast_index(index)).__name__
  learn = tuple(learn)
  if learn and not supports_straight_through(index):
    raise ValueError(
        f"Index factory {factory!r} ({kind}) stores codes JAX cannot reproduce, so "
        f"config.quant.learn={learn} (codebook learning included) is impossible with it.")
  if _find(index, (faiss.IndexRaBitQ, faiss.IndexIVFRaBitQ)) is not None and (
      "codebooks" in learn):
    raise ValueError(f"config.quant.learn has 'codebooks' but index factory {factory!r} is "
                     "RaBitQ, which has no codebooks (it may learn 'centroids' with IVF).")
  if "centroids" in learn and _ivf(index) is None:
    raise ValueError(f"config.quant.learn has 'centroids' but index factory {factory!r} "
                     "has no IVF coarse quantizer.")
  if "rotation" in learn and not _has_opq(index):
    raise ValueError(f"config.quant.learn has 'rotation' but index factory {factory!r} "
                     "has no OPQ rotation (write OPQ{m},... in front).")
  if needs_quantizer and not supports_straight_through(index):
    raise ValueError(
        f"Index factory {factory!r} ({kind}) stores codes JAX cannot reproduce, so it cannot "
        "serve a straight-through mode: use (OPQ,)(IVF,)PQ with up to 8 bits, HNSW-PQ, "
        "fast-scan PQ (PQ{m}x4fs), (RR{d},)(IVF,)RaBitQ, or a mode that only searches.")
  if incremental and not supports_incremental_refresh(index):
    raise ValueError(
        f"Index factory {factory!r} ({kind}) cannot be refreshed in place, so set "
        "full_rebuild_every=0 (every refresh a full rebuild).")


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
  x = _as_matrix(vectors, "vectors")
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
  if metric not in _METRICS:
    raise ValueError(f"metric must be one of {sorted(_METRICS)}, got {metric!r}.")
  train = _as_matrix(sample, "training vectors")
  if train.shape[0] == 0:
    raise ValueError("Cannot train an index on no vectors.")
  if not np.isfinite(train).all():
    raise ValueError("vectors contain NaN or infinite values.")
  index = _make_index(train.shape[1], factory, _METRICS[metric])
  # Search parameters survive training and adding; set them first so bad values fail fast.
  set_search_params(index, nprobe=nprobe, ef_search=ef_search, rabitq_qb=rabitq_qb,
                    strict=False)
  ivf = _ivf(index)
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
  x = _as_matrix(vectors, "vectors", d=index.d)
  if not np.isfinite(x).all():
    raise ValueError("vectors contain NaN or infinite values.")
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
  x = _as_matrix(vectors, "vectors", d=old.d)
  params = describe_index(old)
  carried = {"metric": _METRIC_NAMES.get(old.metric_type, "ip")}
  if params["nprobe"] is not None:
    carried["nprobe"] = params["nprobe"]
  if params["ef_search"] is not None:
    carried["ef_search"] = params["ef_search"]
  carried.update(kwargs)
  return build_index(x, factory, **carried)


# ----------------------------------------------------------------------------- searching


def set_search_params(
    index: faiss.Index,
    nprobe: int | None = None,
    ef_search: int | None = None,
    *,
    rabitq_qb: int | None = None,
    strict: bool = True,
) -> None:
  """Sets IVF nprobe and/or HNSW efSearch wherever they live in `index`.

  Looks through IndexPreTransform (OPQ), IndexIDMap and refine wrappers. efSearch is set on
  every HNSW graph found: the index itself (`HNSW32,PQ16`) or an IVF's coarse quantizer
  (`IVF4096_HNSW32,PQ128`). None leaves a parameter unchanged.

  Args:
    index: any FAISS index.
    nprobe: IVF lists to probe.
    ef_search: HNSW search breadth.
    rabitq_qb: bits a RaBitQ index quantizes queries to (0..8; 0: float queries). FAISS
      writes it into the index file, so a saved index serves with it.
    strict: raise when a given parameter has nothing to apply to; False ignores it.

  Raises:
    ValueError: a value < 1, or (strict) a parameter the index has nothing to apply to.
  """
  if nprobe is not None:
    if nprobe < 1:
      raise ValueError(f"nprobe must be >= 1, got {nprobe}.")
    ivf = _ivf(index)
    if ivf is not None:
      ivf.nprobe = int(nprobe)
    elif strict:
      raise ValueError(f"nprobe={nprobe} given but the index has no IVF stage.")
  if ef_search is not None:
    if ef_search < 1:
      raise ValueError(f"ef_search must be >= 1, got {ef_search}.")
    graphs = _hnsw_objects(index)
    for g in graphs:
      g.hnsw.efSearch = int(ef_search)
    if not graphs and strict:
      raise ValueError(f"ef_search={ef_search} given but the index has no HNSW graph.")
  if rabitq_qb is not None:
    if not 0 <= rabitq_qb <= 8:
      raise ValueError(f"rabitq_qb must be in 0..8, got {rabitq_qb}.")
    rabitq = _find(index, (faiss.IndexRaBitQ, faiss.IndexIVFRaBitQ))
    if rabitq is not None:
      rabitq.qb = int(rabitq_qb)
    elif strict:
      raise ValueError(f"rabitq_qb={rabitq_qb} given but the index has no RaBitQ stage.")


def search(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    *,
    batch_size: int = 4096,
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Top-k search in query batches.

  Returns:
    scores (Q, k) float32, higher is better (L2 distances are negated), and ids (Q, k) int64
    row ids; slots with fewer than k results hold id -1 (and score -inf).
  """
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}.")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  q = _as_matrix(queries, "queries", d=index.d)
  scores = np.empty((q.shape[0], k), dtype=np.float32)
  ids = np.empty((q.shape[0], k), dtype=np.int64)
  with num_threads(threads):
    for start in range(0, q.shape[0], batch_size):
      stop = start + batch_size
      scores[start:stop], ids[start:stop] = index.search(q[start:stop], k)
  if index.metric_type == faiss.METRIC_L2:
    np.negative(scores, out=scores)
  # FAISS pads missing results with -1 ids and +-max-float scores; make the pad unambiguous.
  scores[ids < 0] = -np.inf
  return scores, ids


# ----------------------------------------------------------------------------- files


def save_index(index: faiss.Index, path: str | os.PathLike) -> None:
  """Writes `index` to `path` atomically: a temp file in the same directory, then os.replace.

  A failed write leaves neither a partial file nor a changed `path`.
  """
  with atomic_path(path) as tmp:
    faiss.write_index(index, tmp)


def load_index(path: str | os.PathLike, *, mmap: bool = False) -> faiss.Index:
  """Reads an index written by `save_index` (or any FAISS index file).

  Args:
    path: the index file.
    mmap: memory-map the file instead of reading it (large flat indexes).

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file is not a readable FAISS index (truncated, corrupt, other format).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"FAISS index file not found: {path}")
  flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
  try:
    return faiss.read_index(path, flags)
  except RuntimeError as e:
    detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    raise ValueError(f"{path}: not a readable FAISS index ({detail})") from e


# ----------------------------------------------------------------------------- sizes


def bytes_per_vector(index: faiss.Index) -> float:
  """Bytes of stored code per vector: what the quantizer keeps for each database vector.

  Counted: the flat vector (4*d for Flat), the PQ / SQ code (for IVF, `IndexIVF.code_size`:
  the list number is implicit in list membership and not counted). Not counted: the 8-byte
  ids that IVF lists and IndexIDMap store, HNSW graph links, and per-index overheads such as
  centroids, codebooks and OPQ matrices. With a refine stage both codes count.
  """
  obj = faiss.downcast_index(index)
  if isinstance(obj, (faiss.IndexPreTransform, faiss.IndexIDMap, faiss.IndexIDMap2)):
    return bytes_per_vector(obj.index)
  if isinstance(obj, faiss.IndexHNSW):
    return bytes_per_vector(obj.storage)
  if isinstance(obj, faiss.IndexRefine):
    return bytes_per_vector(obj.base_index) + bytes_per_vector(obj.refine_index)
  if isinstance(obj, (faiss.IndexIVF, faiss.IndexFlatCodes, faiss.IndexFastScan)):
    return float(obj.code_size)
  return float(obj.sa_code_size())


def compression_ratio(index: faiss.Index, d: int | None = None) -> float:
  """float32 bytes (4*d) over `bytes_per_vector`: 1.0 for Flat, 32.0 for PQ48x8 at d=384."""
  d = index.d if d is None else d
  return 4.0 * d / bytes_per_vector(index)


def _pq_owner(index: faiss.Index) -> object | None:
  """The first (sub-)index holding a ProductQuantizer, or None."""
  owners = (o for o in _sub_indexes(index)
            if isinstance(getattr(o, "pq", None), faiss.ProductQuantizer))
  return next(owners, None)


def _is_saved_opq(vt: object) -> bool:
  # FAISS writes an OPQMatrix as a plain LinearTransform, so that is what a loaded OPQ is.
  return isinstance(vt, faiss.OPQMatrix) or type(vt) is faiss.LinearTransform


def factory_string(index: faiss.Index) -> str | None:
  """A factory string that rebuilds `index`'s layout, or None when FAISS cannot name it.

  Uses FAISS's reverse_index_factory. An OPQ index read back from a file is the exception
  FAISS misses (its OPQMatrix was saved as a plain LinearTransform): it is named
  `OPQ{M}_{d_out},...` with M taken from the PQ, the usual choice.
  """
  try:
    return reverse_index_factory(index)
  except (NotImplementedError, AssertionError):
    pass
  obj = faiss.downcast_index(index)
  if isinstance(obj, faiss.IndexPreTransform) and obj.chain.size() == 1:
    vt = faiss.downcast_VectorTransform(obj.chain.at(0))
    owner = _pq_owner(obj.index)
    inner = factory_string(obj.index)
    if _is_saved_opq(vt) and owner is not None and inner is not None:
      return f"OPQ{owner.pq.M}_{vt.d_out},{inner}"
  return None


def describe_index(index: faiss.Index) -> dict:
  """Summary of an index for logs and result files (None where a field does not apply)."""
  factory = factory_string(index)
  ivf = _ivf(index)
  graphs = _hnsw_objects(index)
  pq_owner = _pq_owner(index)
  return {
      "factory": factory,
      "type": type(faiss.downcast_index(index)).__name__,
      "metric": _METRIC_NAMES.get(index.metric_type, str(index.metric_type)),
      "ntotal": int(index.ntotal),
      "d": int(index.d),
      "is_trained": bool(index.is_trained),
      "bytes_per_vector": bytes_per_vector(index),
      "compression_ratio": compression_ratio(index),
      "nlist": int(ivf.nlist) if ivf is not None else None,
      "nprobe": int(ivf.nprobe) if ivf is not None else None,
      "ef_search": int(graphs[0].hnsw.efSearch) if graphs else None,
      "pq_m": int(pq_owner.pq.M) if pq_owner is not None else None,
      "pq_nbits": int(pq_owner.pq.nbits) if pq_owner is not None else None,
      "opq": any(_is_saved_opq(vt) for vt in _transforms(index)),
  }


# ----------------------------------------------------------------------------- vectors


def reconstruct_all(index: faiss.Index, *, return_ids: bool = False):
  """Recovers the exact vectors stored in a flat index (e.g. a released IndexFlatIP file).

  Args:
    index: IndexFlat (IP or L2) or IndexIDMap / IndexIDMap2 around one.
    return_ids: return (vectors in storage order, search ids) instead of an id-ordered table.

  Returns:
    By default an (N, d) float32 table whose row i is the vector with search id i. For an id
    map, this needs its ids to be a permutation of 0..N-1. With `return_ids=True`,
    (vectors (N, d), ids (N,) int64) in storage order, for any ids.

  Raises:
    TypeError: not a flat index (quantized indexes keep only lossy codes).
    ValueError: id-ordered output requested but the id map is not a permutation of 0..N-1.
  """
  obj = faiss.downcast_index(index)
  ids = None
  if isinstance(obj, (faiss.IndexIDMap, faiss.IndexIDMap2)):
    ids = faiss.vector_to_array(obj.id_map).astype(np.int64)
    obj = faiss.downcast_index(obj.index)
  if not isinstance(obj, faiss.IndexFlat):
    raise TypeError(
        f"reconstruct_all needs a flat index (optionally in an IndexIDMap), got "
        f"{type(obj).__name__}: quantized indexes only hold lossy codes.")
  n, d = obj.ntotal, obj.d
  vectors = faiss.rev_swig_ptr(obj.get_xb(), n * d).reshape(n, d).copy() if n else (
      np.zeros((0, d), np.float32))
  if ids is None:
    ids = np.arange(n, dtype=np.int64)
  if return_ids:
    return vectors, ids
  order = np.argsort(ids, kind="stable")
  if not np.array_equal(ids[order], np.arange(n)):
    raise ValueError(
        "The index's ids are not a permutation of 0..N-1, so they do not name table rows; "
        "call reconstruct_all(index, return_ids=True).")
  return vectors[order]


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
    probe = _make_index(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if _has_opq(probe) or _hnsw_objects(probe):
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
