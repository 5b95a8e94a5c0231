"""The layout of a FAISS index: make one from a factory string, walk its stages, name it,
size it, read back the vectors of a flat one.

Every index is made with `faiss.index_factory` (`make_index`), so any factory string works;
the helpers here know about the shapes this project uses: `Flat`, `PQ{m}[x{b}]`,
`IVF{n},PQ{m}[x{b}]`, `OPQ{m}[_{d}],IVF{n},PQ{m}`, `IVF{n}_HNSW{M},PQ{m}` (the paper's
`IVF4096_HNSW32,PQ128`) and `HNSW{M},PQ{m}`.

Metric: FAISS's factory silently builds `HNSW{M},PQ{m}` with L2 whatever metric it is given;
`make_index` then constructs `IndexHNSWPQ` itself with the requested metric, and raises for
any other factory string whose metric FAISS drops. (HNSW graphs navigate inner-product spaces
well only for normalised vectors.)
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import faiss
import numpy as np
from faiss.contrib.factory_tools import reverse_index_factory

# The metric names configs use, and FAISS's metric for each.
METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
METRIC_NAMES = {v: k for k, v in METRICS.items()}
# FAISS's factory builds "HNSW{M},PQ{m}" with the L2 metric whatever metric it is given.
_HNSW_PQ = re.compile(r"HNSW(\d+)[,_]PQ(\d+)(?:x(\d+))?(?:np)?")
OPQ_NBITS = 8  # the bits of the PQ OPQ trains through (FAISS's default)


# ----------------------------------------------------------------------------- making


def make_index(d: int, factory: str, metric: int) -> faiss.Index:
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
          f"FAISS's index_factory ignored the {METRIC_NAMES[metric]!r} metric for {factory!r}.")
    hnsw_m, pq_m, nbits = int(match[1]), int(match[2]), int(match[3] or 8)
    index = faiss.IndexHNSWPQ(d, pq_m, hnsw_m, nbits, metric)
  return index


# ----------------------------------------------------------------------------- walking


def sub_indexes(index: faiss.Index) -> Iterator[object]:
  """Yields the downcast index and every index nested in it (pre-transforms, id maps,
  HNSW storage, IVF quantizers, refine stages), depth first.

  The yielded objects borrow memory from `index`: keep `index` alive while using them.
  """
  obj = faiss.downcast_index(index)
  yield obj
  for attr in ("index", "storage", "quantizer", "base_index", "refine_index"):
    child = getattr(obj, attr, None)
    if isinstance(child, faiss.Index):
      yield from sub_indexes(child)


def transforms(index: faiss.Index) -> list[object]:
  """Downcast vector transforms of every IndexPreTransform inside `index`."""
  out = []
  for obj in sub_indexes(index):
    if isinstance(obj, faiss.IndexPreTransform):
      out.extend(faiss.downcast_VectorTransform(obj.chain.at(i)) for i in range(obj.chain.size()))
  return out


def find_stage(index: faiss.Index, cls: type | tuple[type, ...]) -> object | None:
  """The first (downcast) index of class `cls` in `index` (see `sub_indexes`), or None."""
  for obj in sub_indexes(index):
    if isinstance(obj, cls):
      return obj
  return None


def ivf_stage(index: faiss.Index) -> faiss.IndexIVF | None:
  """The IVF stage of `index` (behind any OPQ, id map or refine wrapper), or None."""
  return find_stage(index, faiss.IndexIVF)


def has_opq(index: faiss.Index) -> bool:
  """Whether an OPQMatrix sits in front of `index` (an `OPQ{m},...` layout as built).

  False for an OPQ index read back from a file: FAISS saves its OPQMatrix as a plain
  LinearTransform (see `factory_string`).
  """
  index = faiss.downcast_index(index)
  return isinstance(index, faiss.IndexPreTransform) and any(
      isinstance(faiss.downcast_VectorTransform(index.chain.at(i)), faiss.OPQMatrix)
      for i in range(index.chain.size()))


def hnsw_graphs(index: faiss.Index) -> list[faiss.IndexHNSW]:
  """HNSW graphs anywhere in the index: the main index or an IVF coarse quantizer."""
  return [obj for obj in sub_indexes(index) if isinstance(obj, faiss.IndexHNSW)]


# ----------------------------------------------------------------------------- stages


def clustering_sizes(index: faiss.Index) -> list[tuple[str, int]]:
  """(stage, centroids) of every k-means that training `index` runs: the IVF coarse
  quantizer (nlist), the PQ sub-quantizers (2**nbits each) and OPQ's PQ."""
  sizes = []
  for obj in sub_indexes(index):
    if isinstance(obj, faiss.IndexIVF):
      sizes.append(("IVF coarse quantizer", int(obj.nlist)))
    pq = getattr(obj, "pq", None)
    if isinstance(pq, faiss.ProductQuantizer):
      sizes.append((f"PQ{pq.M}x{pq.nbits} sub-quantizers", int(pq.ksub)))
  for vt in transforms(index):
    if isinstance(vt, faiss.OPQMatrix):
      sizes.append((f"OPQ{vt.M} rotation's PQ", 2 ** OPQ_NBITS))
  return sizes


def factory_layout(factory: str, dim: int, metric: str = "ip") -> dict:
  """What an untrained `factory` index over `dim` dimensions is made of, for config-time
  checks: ``{"nlist": IVF lists (0 without IVF), "clusterings": clustering_sizes,
  "rabitq_bits": bits a dimension of its RaBitQ codes (0: not RaBitQ)}``.

  Raises:
    ValueError: the factory string is invalid for `dim` (see `check_index_for_mode`).
  """
  index = make_index(dim, factory, METRICS[metric])
  ivf = ivf_stage(index)
  rabitq = find_stage(index, (faiss.IndexRaBitQ, faiss.IndexIVFRaBitQ))
  return {"nlist": int(ivf.nlist) if ivf is not None else 0,
          "clusterings": clustering_sizes(index),
          "rabitq_bits": int(rabitq.rabitq.nb_bits) if rabitq is not None else 0}


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
  owners = (o for o in sub_indexes(index)
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
  ivf = ivf_stage(index)
  graphs = hnsw_graphs(index)
  pq_owner = _pq_owner(index)
  return {
      "factory": factory,
      "type": type(faiss.downcast_index(index)).__name__,
      "metric": METRIC_NAMES.get(index.metric_type, str(index.metric_type)),
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
      "opq": any(_is_saved_opq(vt) for vt in transforms(index)),
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
