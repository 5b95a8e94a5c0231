"""Which index layouts a training run can use: checked at config time, before any embedding."""

from __future__ import annotations

import re
from collections.abc import Sequence

import faiss

from qdr_jax.index.layout import METRICS, find_stage, has_opq, ivf_stage, make_index
from qdr_jax.index.refresh import supports_incremental_refresh
from qdr_jax.quant.faiss_bridge import supports_straight_through


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
  if metric not in METRICS:
    raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}.")
  try:
    index = make_index(dim, factory, METRICS[metric])
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
  if find_stage(index, (faiss.IndexRaBitQ, faiss.IndexIVFRaBitQ)) is not None and (
      "codebooks" in learn):
    raise ValueError(f"config.quant.learn has 'codebooks' but index factory {factory!r} is "
                     "RaBitQ, which has no codebooks (it may learn 'centroids' with IVF).")
  if "centroids" in learn and ivf_stage(index) is None:
    raise ValueError(f"config.quant.learn has 'centroids' but index factory {factory!r} "
                     "has no IVF coarse quantizer.")
  if "rotation" in learn and not has_opq(index):
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
