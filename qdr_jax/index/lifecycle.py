"""The quantized index of a training run, from its first build to its last refresh.

``IndexLifecycle`` owns the FAISS index a run searches for negatives and everything the
loss reads from it: the JAX copy of its quantizer and, for ``quant.codes='index'``, the
codes it stores for every row, placed on the devices like the table. Process 0 alone
holds the FAISS index; every method is called by every process (the table's rows reach
process 0 through collectives), so the same code runs on one host or many. Process 0's
FAISS work runs through ``distributed.lead_work``: if it fails, process 0 still joins the
collectives and the next broadcast raises its error on every process.

What each refresh costs:
  * full: the quantizer is retrained on ``index.train_size`` rows and the table is
    streamed to process 0 in chunks of ``STREAM_ROWS`` rows; no host ever holds
    the whole float table, only the index's codes.
  * incremental: only the rows moved since the last refresh are gathered, re-encoded in
    FAISS (``incremental_refresh``) and rewritten in the devices' code array.
  * skipped: nothing moved (e.g. ``query_only``, whose table never changes).
Learned index parameters (``quant.learn``: PQ codebooks, IVF centroids, OPQ rotation)
change every code, so a run that learns any of them refreshes by writing them into FAISS
and re-encoding the whole table (streamed), never incrementally: the rows that did not
move have new codes too.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import faiss
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from qdr_jax import distributed, sharding
from qdr_jax.index.build import (FAISS_THREADS, RABITQ_QB, add_vectors, index_options,
                                 seed_build_workers, train_index, training_rows)
from qdr_jax.index.refresh import ChangedRows, incremental_refresh, refresh_kind
from qdr_jax.index.searching import set_search_params
from qdr_jax.quant import (Quantizer, quantizer_from_faiss, stored_codes, with_index_params,
                           write_quantizer_to_faiss)
from qdr_jax.quant.faiss_bridge import is_rabitq, unpack_codes
from qdr_jax.quant.rabitq import RaBitQ

RefreshOutcome = Literal["full", "incremental", "learned", "skipped"]

# Rows per chunk when the table streams from the devices to the index's owner (process 0)
# for a build: bounds that host's extra memory to chunk x d floats.
STREAM_ROWS = 65536


@dataclasses.dataclass(frozen=True)
class LossInputs:
  """What the straight-through loss reads from the index, on the devices.

  quantizer: the index's quantizer (replicated): a PQ `Quantizer` or a `RaBitQ`; None for
    modes that do not quantize.
  codes: ``{"codes": (rows, M) uint8, "lists": (rows,) int32}`` row-sharded like the
    table: the codes the index stores (``quant.codes='index'``; for RaBitQ, FAISS's code
    bytes), else None.
  """
  quantizer: Quantizer | RaBitQ | None
  codes: dict[str, jax.Array] | None


@dataclasses.dataclass(frozen=True)
class RefreshRecord:
  """What the last refresh did: its kind, the rows it re-encoded and its seconds."""
  step: int
  kind: RefreshOutcome
  rows: int
  seconds: float


class IndexLifecycle:
  """Builds, refreshes and describes the FAISS index of one training run.

  Args:
    index_cfg: the config's ``index`` section.
    mesh: the training mesh (the table is row-sharded over it).
    num_rows: passages in the corpus (the table may be padded beyond).
    padded_rows: rows of the device table.
    quantize: the loss decodes through the index's quantizer.
    codes_from_index: the loss decodes the codes the index stores (else it re-encodes).
    learn_index: the run trains index parameters (``quant.learn``); every refresh writes
      them into FAISS and re-encodes the whole table.
    shard_rows: the table is split by rows (else replicated), for the code array.
  """

  def __init__(self, index_cfg: ml_collections.ConfigDict, *, mesh: Mesh, num_rows: int,
               padded_rows: int, quantize: bool, codes_from_index: bool,
               learn_index: bool, shard_rows: bool = True):
    self.cfg = index_cfg
    self.mesh = mesh
    self.num_rows = num_rows
    self.padded_rows = padded_rows
    self.quantize = quantize
    self.codes_from_index = quantize and codes_from_index
    self.learn_index = learn_index
    self.shard_rows = shard_rows
    self.lead = distributed.is_lead_process()
    self.index: faiss.Index | None = None  # process 0 only
    self.loss_inputs = LossInputs(None, None)
    self.changed = ChangedRows(num_rows)  # rows written since the last refresh
    self.history: list[RefreshRecord] = []

  # ------------------------------------------------------------------ building

  def build(self, table, step: int = 0) -> None:
    """A fresh index over ``table``: quantizer trained, every row added.

    ``table`` is the device table (row-sharded) or, before training, the host table every
    process holds (e.g. a memory-mapped ``.npy``, read by process 0 in chunks).
    """
    start = time.perf_counter()
    self.index = self.built_index(table, int(self.cfg.seed))
    self.changed.clear()
    self._sync_loss_inputs()
    self._record(step, "full", self.num_rows, start)

  def built_index(self, table, seed: int) -> faiss.Index | None:
    """A fresh index of the config's layout over ``table`` with k-means seed ``seed`` on
    process 0 (None elsewhere), leaving the run's own index alone: what `build` installs,
    and an evaluation's build for each of its index seeds.

    The quantizer trains on seed ``seed``'s sample (`training_rows`, as `build_index`
    draws it), gathered to process 0; every row is then streamed in in chunks, so the
    host holds the sample and the index, never the whole float table. Same table, seed
    and options give the index `build.build_quantized` builds on a host copy.
    """
    train_x = self._training_sample(table, seed)
    index = distributed.lead_work(train_index, train_x, self.cfg.factory, seed=seed,
                                  **index_options(self.cfg))
    del train_x
    return self._add_table(index, table)

  def built_indexes(self, table, seeds: Sequence[int], concurrent: int = 1
                    ) -> Iterator[faiss.Index | None]:
    """`built_index` for each of ``seeds`` in order, up to ``concurrent`` at a time.

    As `build.build_quantized_seeds` does on a host table, builds at once train and
    add in threads that split the FAISS threads (each index the same, byte for byte), and
    are held together; the table is streamed once for them. Every process must draw
    every index, in order: for a device table each build is a collective.
    """
    seeds = [int(s) for s in seeds]
    workers, threads = seed_build_workers(self.cfg.factory, int(table.shape[1]), len(seeds),
                                          concurrent)
    for start in range(0, len(seeds), workers):
      group = seeds[start:start + workers]
      if len(group) == 1:
        yield self.built_index(table, group[0])
      else:
        yield from self._built_together(table, group, threads)

  def _built_together(self, table, seeds: list[int], threads: int) -> list[faiss.Index | None]:
    """`built_index` of each of ``seeds``, at once in threads of ``threads`` FAISS threads
    (OpenMP thread counts are per calling thread: each worker sets its own)."""
    samples = [self._training_sample(table, seed) for seed in seeds]
    options = {**index_options(self.cfg), "threads": threads}
    indexes = [None] * len(seeds)
    with ThreadPoolExecutor(len(seeds), thread_name_prefix="faiss-build") as pool:
      indexes = distributed.lead_work(lambda: list(pool.map(
          lambda seed, x: train_index(x, self.cfg.factory, seed=seed, **options),
          seeds, samples))) or indexes
      del samples
      for start in range(0, self.num_rows, STREAM_ROWS):
        part = self._rows(table, np.arange(start, min(start + STREAM_ROWS, self.num_rows)))
        distributed.lead_work(lambda: list(pool.map(
            lambda index: add_vectors(index, part, threads=threads), indexes)))
    return indexes

  def _training_sample(self, table, seed: int) -> np.ndarray | None:
    """Seed ``seed``'s training rows (`training_rows`, as `build_index` draws them) on
    process 0, gathered in chunks (None elsewhere)."""
    sample = training_rows(self.num_rows, self.cfg.train_size, seed)
    return self._gather_chunks(table, np.arange(self.num_rows) if sample is None else sample)

  def adopt(self, index: faiss.Index | None, *, moved_since: bool | np.ndarray) -> None:
    """Takes over an index built elsewhere: restored from a checkpoint, or the first one
    handed to ``train`` (process 0; others pass None).

    ``moved_since``: the rows moved after the index was last refreshed, as the (num_rows,)
    bool mask a checkpoint saved with it, or True when they are not known (all count as
    moved: the next incremental refresh re-encodes them all, which in an IVF index also
    reorders its lists, so that search ties may break otherwise than without the resume).
    """
    if self.lead:
      if index is None:
        raise ValueError("IndexLifecycle.adopt needs the restored index on process 0.")
      if index.ntotal != self.num_rows:
        raise ValueError(f"IndexLifecycle.adopt: the index holds {index.ntotal} rows, the "
                         f"table {self.num_rows}.")
      set_search_params(index, nprobe=self.cfg.nprobe, ef_search=self.cfg.ef_search or None,
                        rabitq_qb=RABITQ_QB, strict=False)
    self.index = index
    self.changed.clear()
    if isinstance(moved_since, np.ndarray):
      self.changed.add(np.flatnonzero(moved_since))
    elif moved_since:
      self.changed.add(np.arange(self.num_rows))
    self._sync_loss_inputs()

  # ------------------------------------------------------------------ refreshing

  def note_updated(self, rows: np.ndarray) -> None:
    """Rows a step wrote (its valid pooled rows); they are re-encoded at the next refresh."""
    self.changed.add(rows)

  def refresh_due(self, step: int) -> bool:
    return refresh_kind(step, self.cfg.rebuild_every, self.cfg.full_rebuild_every) is not None

  def maybe_refresh(self, step: int, table: jax.Array,
                    index_params: dict[str, jax.Array] | None = None
                    ) -> RefreshOutcome | None:
    """The refresh ``index.rebuild_every`` / ``full_rebuild_every`` schedule after
    ``step`` completed steps, or None when none is due.

    Returns what was done: a scheduled refresh is skipped when no row moved (and no
    index parameter is learned), since it would rebuild the very same index; with
    learned ``index_params`` (`TrainState.index_params`) it is always 'learned'.
    """
    kind = refresh_kind(step, self.cfg.rebuild_every, self.cfg.full_rebuild_every)
    if kind is None:
      return None
    start = time.perf_counter()
    if self.learn_index:
      self.write_index_params(table, index_params)
      self._record(step, "learned", self.num_rows, start)
      return "learned"
    if not len(self.changed):
      self._record(step, "skipped", 0, start)
      return "skipped"
    if kind == "full":
      self.build(table, step)
      return "full"
    rows = self.changed.take()
    vectors = sharding.rows_to_host(table, rows, self.mesh)

    def refresh() -> tuple[int, dict[str, np.ndarray] | None]:
      touched = incremental_refresh(self.index, rows, vectors)
      if not self.codes_from_index:
        return touched, None
      codes, lists = encoded_like_index(self.index, vectors)
      return touched, {"codes": codes, "lists": lists}

    touched, new_codes = distributed.lead_work(refresh) or (rows.size, None)
    if self.codes_from_index:
      new_codes = distributed.broadcast_arrays(new_codes)
      self.loss_inputs = dataclasses.replace(self.loss_inputs, codes={
          name: sharding.set_rows(self.loss_inputs.codes[name], rows, new_codes[name],
                                  self.mesh)
          for name in ("codes", "lists")})
    self._record(step, "incremental", touched, start)
    return "incremental"

  def write_index_params(self, table, index_params: dict | None, *,
                         sync: bool = True) -> None:
    """Writes the learned ``index_params`` (`TrainState.index_params`; None keeps the
    index's own) into the index (rotation into the OPQ matrix, centroids into the coarse
    quantizer, whose HNSW graph is rebuilt, codebooks into the PQ) and re-encodes every
    row of ``table`` with them: what serving the trained table with the training's
    quantizer gives, without retraining k-means. ``sync=False`` leaves the loss's copy
    of the quantizer and codes as they were (after the last step)."""
    if index_params is not None:  # a collective for device arrays: every process joins
      index_params = {name: np.asarray(distributed.global_to_host(value), np.float32)
                      if isinstance(value, jax.Array) else np.asarray(value, np.float32)
                      for name, value in index_params.items()}

    def write() -> None:
      quantizer = with_index_params(
          quantizer_from_faiss(self.index),
          {k: jnp.asarray(v) for k, v in (index_params or {}).items()})
      write_quantizer_to_faiss(self.index, quantizer, np.zeros((0, self.index.d), np.float32))

    distributed.lead_work(write)
    self.index = self._add_table(self.index, table)
    self.changed.clear()
    if sync:
      self._sync_loss_inputs()

  # ------------------------------------------------------------------ internals

  def table_to_lead(self, table) -> np.ndarray | None:
    """The whole (unpadded) table as float32 on process 0, None elsewhere."""
    return self._gather_chunks(table, np.arange(self.num_rows))

  def _rows(self, table, rows: np.ndarray) -> np.ndarray | None:
    """``table[rows]`` as float32 on process 0; a collective for a device table."""
    if isinstance(table, jax.Array):
      part = sharding.rows_to_host(table, rows, self.mesh)
      return part if self.lead else None
    if not self.lead:
      return None
    part = np.asarray(table[rows], np.float32)
    # A memory-mapped table's pages stay resident after the read: over a whole build they
    # would add the file's size to process 0's RSS, so they go back chunk by chunk.
    sharding.release_pages(table)
    return part

  def _gather_chunks(self, table, rows: np.ndarray) -> np.ndarray | None:
    """``table[rows]`` as float32 on process 0 (None elsewhere), gathered in chunks."""
    chunk = STREAM_ROWS
    parts = [self._rows(table, rows[start:start + chunk])
             for start in range(0, rows.size, chunk)]
    return np.concatenate(parts) if self.lead else None

  def _add_table(self, index: faiss.Index | None, table) -> faiss.Index | None:
    """Streams every row of ``table`` into ``index`` (process 0) in chunks."""
    chunk = STREAM_ROWS
    for start in range(0, self.num_rows, chunk):
      part = self._rows(table, np.arange(start, min(start + chunk, self.num_rows)))
      distributed.lead_work(add_vectors, index, part, threads=FAISS_THREADS or None)
    return index

  def _sync_loss_inputs(self) -> None:
    """Process 0's quantizer (and stored codes) on every process's devices."""
    if not self.quantize:
      self.loss_inputs = LossInputs(None, None)
      return

    def quantizer_arrays() -> dict[str, np.ndarray]:
      q = quantizer_from_faiss(self.index)
      if isinstance(q, RaBitQ):
        arrays = {"rabitq": np.asarray([q.metric == "ip", q.coarse_metric == "ip", q.qb,
                                        q.nb_bits], np.int32)}
      else:
        arrays = {"codebooks": np.asarray(q.codebooks),
                  "static": np.asarray([q.by_residual, q.coarse_metric == "ip"], np.int32)}
      for name in ("rotation", "coarse_centroids", "center"):
        if getattr(q, name, None) is not None:
          arrays[name] = np.asarray(getattr(q, name))
      if self.codes_from_index:
        codes, lists = stored_codes(self.index)
        arrays["codes"], arrays["lists"] = codes.astype(np.uint8), lists.astype(np.int32)
      return arrays

    arrays = distributed.broadcast_arrays(distributed.lead_work(quantizer_arrays))
    optional = lambda name: jnp.asarray(arrays[name]) if name in arrays else None
    if "rabitq" in arrays:
      ip, coarse_ip, qb, nb_bits = (int(v) for v in arrays["rabitq"])
      quantizer = RaBitQ(center=optional("center"), coarse_centroids=optional("coarse_centroids"),
                         rotation=optional("rotation"), metric="ip" if ip else "l2",
                         coarse_metric="ip" if coarse_ip else "l2", qb=qb, nb_bits=nb_bits)
    else:
      by_residual, ip = (bool(v) for v in arrays["static"])
      quantizer = Quantizer(codebooks=jnp.asarray(arrays["codebooks"]),
                            rotation=optional("rotation"),
                            coarse_centroids=optional("coarse_centroids"),
                            by_residual=by_residual, coarse_metric="ip" if ip else "l2")
    quantizer = distributed.replicate_to_global(quantizer, self.mesh)
    codes = None
    if self.codes_from_index:
      codes = {name: sharding.put_rows(arrays[name], self.mesh, self.shard_rows,
                                       self.padded_rows) for name in ("codes", "lists")}
    self.loss_inputs = LossInputs(quantizer, codes)

  def _record(self, step: int, kind: RefreshOutcome, rows: int, start: float) -> None:
    record = RefreshRecord(step, kind, int(rows), time.perf_counter() - start)
    self.history.append(record)
    if kind != "skipped":
      logging.info("index %s refresh at step %d: %d rows in %.2fs", kind, step, rows,
                   record.seconds)


def encoded_like_index(index: faiss.Index, vectors: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
  """The PQ codes and IVF lists ``index`` stores for ``vectors`` when it adds them.

  FAISS's standalone encoding (``sa_encode``) runs the same coarse assignment (HNSW
  search included) and residual PQ encoding as ``add``; its bytes are the list number
  (IVF) followed by the packed PQ code, which are unpacked here to one code per
  sub-quantizer. A RaBitQ index's code bytes are returned as they are.

  Returns:
    codes (n, M) uint8 and lists (n,) int32 (zeros without IVF).
  """
  x = np.ascontiguousarray(vectors, np.float32)
  top = faiss.downcast_index(index)
  if isinstance(top, faiss.IndexPreTransform):
    for i in range(top.chain.size()):
      x = faiss.downcast_VectorTransform(top.chain.at(i)).apply(x)
    top = faiss.downcast_index(top.index)
  if isinstance(top, faiss.IndexHNSW):  # the graph has no codes; its storage does
    top = faiss.downcast_index(top.storage)
  raw = top.sa_encode(x)
  lists = np.zeros(x.shape[0], np.int32)
  if isinstance(top, faiss.IndexIVF):
    width = top.coarse_code_size()
    lists = (raw[:, :width].astype(np.int64) << (8 * np.arange(width))).sum(1).astype(np.int32)
    raw = raw[:, width:]
  if is_rabitq(top):
    return np.ascontiguousarray(raw, np.uint8), lists
  codes = unpack_codes(raw, top.pq.M, top.pq.nbits)
  return np.ascontiguousarray(codes, np.uint8), lists


def pq_codebook_shape(factory: str, dim: int) -> tuple[int, int, int]:
  """(M, ksub, dsub) of the product quantizer a factory string describes, without
  training anything (e.g. to lay out a state before restoring learned codebooks)."""
  made = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)  # owns the views below
  index = faiss.downcast_index(made)
  if isinstance(index, faiss.IndexPreTransform):
    index = faiss.downcast_index(index.index)
  if isinstance(index, faiss.IndexHNSW):
    index = faiss.downcast_index(index.storage)
  pq = getattr(index, "pq", None)
  if pq is None:
    raise ValueError(f"{factory!r} has no product quantizer.")
  return int(pq.M), int(pq.ksub), int(pq.dsub)


def placeholder_quantizer(factory: str, dim: int) -> Quantizer:
  """A `Quantizer` of zeros with the shapes of the index a factory string describes
  (codebooks, OPQ rotation, IVF centroids), without training anything: the layout of
  learned index parameters before a checkpoint restores them."""
  # ``made`` owns the index and its parts: it must outlive every downcast view of them.
  made = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
  top = faiss.downcast_index(made)
  index, rotation, centroids = top, None, None
  if isinstance(top, faiss.IndexPreTransform):
    transform = faiss.downcast_VectorTransform(top.chain.at(0))
    rotation = jnp.zeros((transform.d_out, transform.d_in), jnp.float32)
    index = faiss.downcast_index(top.index)
  if isinstance(index, faiss.IndexIVF):
    centroids = jnp.zeros((index.nlist, index.d), jnp.float32)
  if is_rabitq(index):
    center = None if centroids is not None else jnp.zeros((index.d,), jnp.float32)
    return RaBitQ(center=center, coarse_centroids=centroids, rotation=rotation)
  return Quantizer(codebooks=jnp.zeros(pq_codebook_shape(factory, dim), jnp.float32),
                   rotation=rotation, coarse_centroids=centroids)
