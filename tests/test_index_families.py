"""Every FAISS family in every mode: JAX codes equal FAISS's stored codes (after build,
incremental refresh and codebook write-back), config-time checks, search for any factory."""

from __future__ import annotations

import faiss
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdr_jax import quant
from qdr_jax.index import (build_index, check_index_for_mode, emptied_copy,
                           incremental_refresh, search, set_search_params,
                           supports_incremental_refresh)

N, D = 2000, 32
# One FAISS thread: small builds are faster without OpenMP on a shared 2-core machine.
THREADS = 1
_encode_with_lists = jax.jit(quant.encode_with_lists)

# Families whose codes JAX reproduces (straight-through modes), with an ordinary build.
PQ_FAMILIES = [
    "PQ8", "PQ8x4", "PQ16x4fs", "PQ7x4fs", "OPQ8,PQ8x4fs", "IVF16,PQ8", "IVF16,PQ8x6",
    "IVF16,PQ8x4fs", "IVF16,PQ8x4fsr", "OPQ8,IVF16,PQ8x4fsr", "IVF16_HNSW8,PQ16x4fs",
    "HNSW8,PQ8", "HNSW8,PQ8x4",
]
SEARCH_ONLY = ["Flat", "SQ8", "HNSW8", "HNSW8,SQ8", "IVF16,SQ8", "IVF16,Flat"]
D_FOR = {"PQ7x4fs": 28}


def _table(seed: int, d: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(24, d))
  x = centers[rng.integers(0, 24, N)] + 0.4 * rng.normal(size=(N, d))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _drift(table: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """10% of the rows moved, a fifth of them far (into another IVF list)."""
  rng = np.random.default_rng(seed + 100)
  rows = np.sort(rng.choice(N, N // 10, replace=False))
  new = table.copy()
  new[rows] += 0.05 * rng.normal(size=(rows.size, table.shape[1])).astype(np.float32)
  new[rows[::5]] = table[rng.integers(0, N, rows[::5].size)]
  return rows, new


def _build(table: np.ndarray, factory: str, seed: int = 0) -> faiss.Index:
  return build_index(table, factory, seed=seed, opq_niter=3, threads=THREADS, nprobe=4)


def _assert_jax_matches(index: faiss.Index, table: np.ndarray, hnsw_coarse: bool) -> None:
  q = quant.quantizer_from_faiss(index)
  codes, lists = quant.stored_codes(index)
  assert codes.shape == (N, q.num_subquantizers) and codes.max() < q.ksub
  jax_codes, jax_lists = (np.asarray(a) for a in _encode_with_lists(q, jnp.asarray(table)))
  same = jax_lists == lists
  # An HNSW coarse quantizer searches approximately: a rare row lands in another list.
  assert same.mean() >= (0.99 if hnsw_coarse else 1.0)
  np.testing.assert_array_equal(jax_codes[same], codes[same])


def _sa_codes(index: faiss.Index, x: np.ndarray) -> np.ndarray:
  """FAISS's own encoder, unpacked (independent of stored_codes' block unpacking)."""
  raw = index.sa_encode(x)
  ivf = _ivf_or_none(index)
  if ivf is not None:
    raw = raw[:, ivf.coarse_code_size():]
  owner = quant.quantizer_from_faiss(index)
  return quant.faiss_bridge.unpack_codes(raw, owner.num_subquantizers,
                                         int(np.log2(owner.ksub)))


def _ivf_or_none(index):
  try:
    return faiss.extract_index_ivf(index)
  except RuntimeError:
    return None


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("factory", PQ_FAMILIES)
def test_jax_codes_equal_stored_codes_after_build(factory, seed):
  table = _table(seed, D_FOR.get(factory, D))
  index = _build(table, factory, seed)
  _assert_jax_matches(index, table, "_HNSW" in factory)
  if "HNSW8," not in factory:  # IndexHNSW has no sa_encode
    codes, _ = quant.stored_codes(index)
    np.testing.assert_array_equal(_sa_codes(index, table), codes)


@pytest.mark.parametrize("factory", PQ_FAMILIES + SEARCH_ONLY)
def test_incremental_refresh_equals_fresh_add(factory):
  table = _table(3, D_FOR.get(factory, D))
  rows, new = _drift(table, 3)
  index = _build(table, factory)
  assert supports_incremental_refresh(index)
  before = faiss.clone_index(index)
  touched = incremental_refresh(index, rows, new[rows])
  assert touched == rows.size and index.ntotal == N
  if not quant.supports_straight_through(index):
    # Non-PQ families: the refreshed index searches like one built over the new table.
    reference = emptied_copy(before) if "HNSW" not in factory else None
    if reference is not None:
      reference.add(new)
      queries = new[:30]
      np.testing.assert_allclose(search(index, queries, 10)[0],
                                 search(reference, queries, 10)[0], rtol=1e-5, atol=1e-5)
    return
  codes_before, lists_before = quant.stored_codes(before)
  codes, lists = quant.stored_codes(index)
  kept = np.setdiff1d(np.arange(N), rows)
  np.testing.assert_array_equal(codes[kept], codes_before[kept])
  np.testing.assert_array_equal(lists[kept], lists_before[kept])
  # Exactly the rows given changed (a count of touched rows, from the codes themselves).
  assert 0 < ((codes != codes_before).any(1) | (lists != lists_before)).sum() <= rows.size
  _assert_jax_matches(index, new, "_HNSW" in factory)


@pytest.mark.parametrize("factory", PQ_FAMILIES)
def test_codebook_write_back(factory):
  table = _table(5, D_FOR.get(factory, D))
  index = _build(table, factory)
  q = quant.quantizer_from_faiss(index)
  noise = jax.random.normal(jax.random.key(1), q.codebooks.shape)
  q_new = q.replace(codebooks=q.codebooks + 0.3 * jnp.std(q.codebooks) * noise)
  old, _ = quant.stored_codes(index)
  assert quant.write_codebooks_to_faiss(index, q_new, table) is index
  np.testing.assert_array_equal(quant.quantizer_from_faiss(index).codebooks, q_new.codebooks)
  assert (quant.stored_codes(index)[0] != old).any()
  _assert_jax_matches(index, table, "_HNSW" in factory)
  # Search uses the new codebooks: top scores agree with JAX's ADC (fast-scan: 8-bit LUTs).
  set_search_params(index, nprobe=16, strict=False)
  queries = table[:20]
  scores, ids = search(index, queries, 5)
  codes, lists = quant.stored_codes(index)
  adc = np.asarray(quant.adc_scores(q_new, jnp.asarray(queries), jnp.asarray(codes),
                                    jnp.asarray(lists)))
  got = np.take_along_axis(adc, np.maximum(ids, 0), axis=1)
  tol = 0.05 if "fs" in factory else 1e-4
  np.testing.assert_allclose(got[ids >= 0], scores[ids >= 0], atol=tol)


def test_write_back_refuses_ids_without_ivf():
  table = _table(0, D)
  index = _build(table, "HNSW8,PQ8x4")
  with pytest.raises(ValueError, match="by position"):
    quant.write_codebooks_to_faiss(index, quant.quantizer_from_faiss(index), table,
                                   ids=np.arange(N))


@pytest.mark.parametrize("factory", [
    "Flat", "SQ8", "HNSW32", "HNSW32,PQ48x8", "PQ48x4fs", "IVF64,PQ48x4fs",
    "OPQ16,IVF64,PQ16x4fs", "IVF64,SQ8", "IVF64_HNSW16,PQ48x4fsr", "RQ4x6"])
def test_search_works_for_every_family(factory):
  d = 96
  table = _table(7, d)
  index = _build(table, factory)
  set_search_params(index, nprobe=64, ef_search=128, strict=False)
  scores, ids = search(index, table[:25], 10)
  assert ids.shape == (25, 10) and (ids >= 0).all()
  assert (np.diff(scores, axis=1) <= 1e-6).all()
  # Most results lie among the exact top 100 (OPQ16 x 4 bits is only 8 bytes a vector).
  exact = np.argsort(-(table[:25] @ table.T), axis=1)[:, :100]
  assert np.mean([np.isin(i, e).mean() for i, e in zip(ids, exact)]) >= 0.5


MODES = dict(needs_quantizer=False, learn=(), incremental=False)


@pytest.mark.parametrize("factory,mode,message", [
    ("Bogus12", {}, r"Invalid FAISS factory string 'Bogus12' for d=32"),
    ("IVF64,PQ48x4fs", {}, r"sub-quantizer count \(48\) does not divide the dimension 32"),
    ("Flat", {"needs_quantizer": True}, r"'Flat' \(IndexFlat\) stores codes JAX cannot"),
    ("SQ8", {"needs_quantizer": True}, r"\(IndexScalarQuantizer\) stores codes JAX cannot"),
    ("RQ4x8", {"needs_quantizer": True}, r"stores codes JAX cannot"),
    ("PQ8x10", {"needs_quantizer": True}, r"stores codes JAX cannot"),
    ("IVF16,SQ8", {"learn": ("codebooks",)}, r"codebook learning included\) is impossible"),
    ("IDMap,Flat", {"incremental": True}, r"cannot be refreshed in place"),
    ("IVF16,PQ8,Refine(Flat)", {"incremental": True}, r"cannot be refreshed in place"),
])
def test_check_index_for_mode_refuses(factory, mode, message):
  with pytest.raises(ValueError, match=message):
    check_index_for_mode(factory, D, **{**MODES, **mode})


@pytest.mark.parametrize("factory", PQ_FAMILIES + ["OPQ16,IVF64,PQ16x4fs", "OPQ8_64,IVF16,PQ8"])
def test_check_index_for_mode_accepts_pq_families(factory):
  check_index_for_mode(factory, D_FOR.get(factory, D), needs_quantizer=True,
                       learn=("codebooks",), incremental=True)


@pytest.mark.parametrize("factory", SEARCH_ONLY + ["HNSW32,PQ48x8", "IVF64,PQ16,Refine(Flat)"])
def test_check_index_for_mode_search_only(factory):
  check_index_for_mode(factory, 96, **MODES)
