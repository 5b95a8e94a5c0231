r"""Scale-out benchmark: sharded table memory, data-parallel step rate, incremental refresh.

  python benchmarks/bench_scale.py --out=runs/bench_scale.json            # 1M x 384
  python benchmarks/bench_scale.py --rows=200000 --out=/tmp/bench.json   # quick

Reports, for a synthetic table of ``--rows`` x ``--dim``:

* per-device memory of the table (float32 and bfloat16) and its per-row Adam state when
  the rows are sharded over 1, 2, 4, 8 devices (measured from the placed arrays), and a
  paper-scale plan (21M x 768 over 8 and 64 devices), computed;
* train steps per second of the real jitted step (``qdr_jax.train.step``, ``--mode``
  dback or dback_no_ste, a one-layer encoder so the table work dominates) on 1, 2, 4, 8
  simulated CPU devices. XLA fixes the CPU device count when JAX starts, so the script re-launches
  itself once per count (``--child_devices``). Simulated devices share the host's cores:
  this measures the cost of partitioning the step, not a speed-up;
* incremental vs full refresh of an IVFPQ index after ``--changed_fraction`` of the rows
  moved, with the Recall@100 of each against exact search on the moved table.

Results go to ``--out`` as JSON; a markdown summary is printed.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
import time

from absl import app, flags

from qdr_jax.cli import run_main

_ROWS = flags.DEFINE_integer("rows", 1_000_000, "Rows of the synthetic table.")
_DIM = flags.DEFINE_integer("dim", 384, "Embedding dimension.")
_BATCH = flags.DEFINE_integer("batch", 32, "Global batch of queries per step.")
_POOL = flags.DEFINE_integer("pool_size", 0, "Pool rows per step; 0 = batch * 100.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per device count.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps (compilation) first.")
_DEVICES = flags.DEFINE_list("devices", ["1", "2", "4", "8"], "Device counts to time.")
_PQ_M = flags.DEFINE_integer("pq_m", 48, "PQ sub-quantizers (bytes per code).")
_NLIST = flags.DEFINE_integer("nlist", 1024, "IVF lists of the refresh benchmark.")
_NPROBE = flags.DEFINE_integer("nprobe", 32, "IVF lists probed.")
_TRAIN_SIZE = flags.DEFINE_integer("train_size", 100_000, "Rows sampled to train the index.")
_CHANGED = flags.DEFINE_float("changed_fraction", 0.05,
                              "Share of rows that moved since the last refresh.")
_DRIFT = flags.DEFINE_float("drift", 0.1, "Norm of a moved row's change (rows have norm 1).")
_QUERIES = flags.DEFINE_integer("queries", 500, "Queries for Recall@100.")
_PAPER_ROWS = flags.DEFINE_integer("paper_rows", 21_000_000, "Rows of the memory plan.")
_PAPER_DIM = flags.DEFINE_integer("paper_dim", 768, "Dimension of the memory plan.")
_PAPER_DEVICES = flags.DEFINE_list("paper_devices", ["1", "8", "64"], "Devices of the plan.")
_SKIP_STEPS = flags.DEFINE_bool("skip_steps", False, "Skip the step-rate benchmark.")
_SKIP_REFRESH = flags.DEFINE_bool("skip_refresh", False, "Skip the refresh benchmark.")
_MODE = flags.DEFINE_string(
    "mode", "dback", "Train mode of the timed step: dback (pool rows PQ-quantized in the "
    "loss) or dback_no_ste (no quantization: gather, loss, Adam, scatter only).")
_FAISS_THREADS = flags.DEFINE_integer(
    "faiss_threads", 0, "FAISS OpenMP threads; 0 = FAISS's default. On a loaded machine 1 "
    "can be much faster (OpenMP threads spin while waiting for a core).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic data.")
_OUT = flags.DEFINE_string("out", None, "JSON results path.")
_CHILD_DEVICES = flags.DEFINE_integer("child_devices", 0, "Internal: time this device count.")
_CHILD_OUT = flags.DEFINE_string("child_out", "", "Internal: the child's JSON output.")

GIB = 1024 ** 3
# Per-row Adam state (scale_by_adam vmapped over rows): mu and nu in float32, one int32
# step count; kept float32 whatever the table's storage dtype.
ADAM_BYTES_PER_DIM, ADAM_BYTES_PER_ROW = 2 * 4, 4


# ----------------------------------------------------------------------------- memory


def memory_per_device(rows: int, dim: int, devices: int) -> dict:
  """Bytes on each device of a row-sharded table (padded to the device count) + Adam."""
  per_device_rows = math.ceil(rows / devices)
  adam = per_device_rows * (ADAM_BYTES_PER_DIM * dim + ADAM_BYTES_PER_ROW)
  return {"devices": devices, "rows_per_device": per_device_rows,
          "table_f32": per_device_rows * dim * 4, "table_bf16": per_device_rows * dim * 2,
          "adam": adam, "total_f32": per_device_rows * dim * 4 + adam,
          "total_bf16": per_device_rows * dim * 2 + adam}


def _gib(n: float) -> str:
  return f"{n / GIB:.2f}"


# ----------------------------------------------------------------------------- steps


def child_steps(devices: int, out: str) -> None:
  """Runs in a process started with ``devices`` CPU devices: times the train step."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from qdr_jax import sharding
  from qdr_jax.config import base_config
  from qdr_jax.models import BertEncoder, EncoderConfig, init_params
  from qdr_jax.negatives.pool import build_pool
  from qdr_jax.quant import Quantizer
  from qdr_jax.train import optim
  from qdr_jax.train.modes import get_mode
  from qdr_jax.train.state import init_state
  from qdr_jax.train.step import make_step_functions

  rows, dim, batch = _ROWS.value, _DIM.value, _BATCH.value
  pool_size = _POOL.value or batch * 100
  config = base_config()
  config.sharding.num_devices = devices
  config.train.batch_size = batch
  config.train.steps = _WARMUP.value + _STEPS.value
  config.optim.warmup_steps = 0
  mode = get_mode(_MODE.value)
  heads = next(h for h in (6, 4, 3, 2, 1) if dim % h == 0)
  module = BertEncoder(EncoderConfig.tiny(hidden_size=dim, num_heads=heads,
                                          intermediate_size=2 * dim, num_layers=1,
                                          pooling="mean", normalize=True))
  params = jax.device_get(init_params(module, jax.random.key(0)))
  rng = np.random.default_rng(_SEED.value)
  table = rng.standard_normal((rows, dim), dtype=np.float32)
  table /= np.linalg.norm(table, axis=1, keepdims=True)
  # A random PQ stands in for FAISS's: the step's cost does not depend on its quality.
  quantizer = Quantizer(codebooks=jnp.asarray(
      rng.standard_normal((_PQ_M.value, 256, dim // _PQ_M.value), dtype=np.float32) * 0.1))
  mesh = sharding.make_mesh(config.sharding)
  encoder_tx, _ = optim.make_encoder_optimizer(config.optim, config.train.steps)
  row_tx = optim.make_row_transform(config.optim)
  row_lr = optim.make_schedule(config.optim.row_lr, config.optim, config.train.steps)
  tick = time.perf_counter()
  state = init_state(config, mode, params, table, quantizer, mesh, encoder_tx, row_tx, None)
  jax.block_until_ready(state)
  init_seconds = time.perf_counter() - tick
  del table
  apply = lambda p, **tokens: module.apply({"params": p}, **tokens)
  fns = make_step_functions(apply, mode, config, encoder_tx, row_tx, row_lr, None, mesh)
  batch_sh, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  quantizer = jax.device_put(quantizer, rep)

  # Inputs are made before timing: the host's search and pool building are not measured.
  inputs = []
  for _ in range(config.train.steps):
    tokens = {"input_ids": rng.integers(1, 128, (batch, 16)).astype(np.int32),
              "attention_mask": np.ones((batch, 16), np.int32),
              "token_type_ids": np.zeros((batch, 16), np.int32)}
    pool = build_pool(rng.integers(0, rows, (batch, 100)),
                      [rng.integers(0, rows, 1) for _ in range(batch)],
                      pool_size=pool_size, num_rows=rows, max_positives=1, rng=rng)
    inputs.append((tokens, pool.arrays()))

  def step(state, tokens, pool):
    q, vjp = fns.encode(state.params, jax.device_put(tokens, batch_sh))
    state, metrics = fns.update(state, vjp, q, jax.device_put(pool, rep), quantizer)
    float(metrics["loss"])  # blocks until the step is done
    return state

  for tokens, pool in inputs[:_WARMUP.value]:
    state = step(state, tokens, pool)
  tick = time.perf_counter()
  for tokens, pool in inputs[_WARMUP.value:]:
    state = step(state, tokens, pool)
  seconds = time.perf_counter() - tick
  row_spec = sharding.row_sharding(mesh, True)
  result = {
      "devices": devices, "steps": _STEPS.value, "pool_size": pool_size,
      "steps_per_second": _STEPS.value / seconds, "init_seconds": init_seconds,
      "table_sharding_kept": state.table.sharding.is_equivalent_to(row_spec, 2),
      "table_bytes_per_device": max(s.data.nbytes for s in state.table.addressable_shards),
      "adam_bytes_per_device": sum(max(s.data.nbytes for s in leaf.addressable_shards)
                                   for leaf in jax.tree.leaves(state.row_opt_state)),
  }
  pathlib.Path(out).write_text(json.dumps(result))


def bench_steps() -> list[dict]:
  """One child process per device count."""
  results = []
  passthrough = [f"--rows={_ROWS.value}", f"--dim={_DIM.value}", f"--batch={_BATCH.value}",
                 f"--pool_size={_POOL.value}", f"--steps={_STEPS.value}",
                 f"--warmup={_WARMUP.value}", f"--pq_m={_PQ_M.value}", f"--seed={_SEED.value}",
                 f"--mode={_MODE.value}"]
  for devices in map(int, _DEVICES.value):
    out = pathlib.Path(_OUT.value).with_suffix(f".steps{devices}.json")
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(
        [f for f in env.get("XLA_FLAGS", "").split()
         if "xla_force_host_platform_device_count" not in f]
        + [f"--xla_force_host_platform_device_count={devices}"])
    tick = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, f"--child_devices={devices}",
                           f"--child_out={out}", *passthrough], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
      raise RuntimeError(f"the {devices}-device run failed:\n{proc.stderr[-4000:]}")
    result = json.loads(out.read_text())
    out.unlink()
    result["wall_seconds"] = time.perf_counter() - tick
    print(f"  {devices} devices: {result['steps_per_second']:.2f} steps/s", flush=True)
    results.append(result)
  return results


# ----------------------------------------------------------------------------- refresh


def _recall_at(ids, truth, k: int = 100) -> float:
  hits = [len(set(a[:k][a[:k] >= 0]) & set(b[:k])) for a, b in zip(ids, truth)]
  return float(sum(hits) / (k * len(truth)))


def bench_refresh() -> dict:
  """Incremental refresh vs full rebuild after a share of the rows moved."""
  import faiss
  import numpy as np

  from qdr_jax.index.build import build_index
  from qdr_jax.index.refresh import emptied_copy, incremental_refresh
  from qdr_jax.index.searching import search

  rows, dim = _ROWS.value, _DIM.value
  if _FAISS_THREADS.value:
    faiss.omp_set_num_threads(_FAISS_THREADS.value)
  rng = np.random.default_rng(_SEED.value)
  # Clustered rows (as real embeddings are), so that IVF lists mean something.
  centers = rng.standard_normal((2000, dim), dtype=np.float32)
  table = centers[rng.integers(0, len(centers), rows)]
  table += rng.standard_normal((rows, dim), dtype=np.float32) * 0.7
  table /= np.linalg.norm(table, axis=1, keepdims=True)
  changed = np.sort(rng.choice(rows, int(rows * _CHANGED.value), replace=False))
  new = table.copy()
  new[changed] += rng.standard_normal((changed.size, dim), dtype=np.float32) * (
      _DRIFT.value / math.sqrt(dim))
  new[changed] /= np.linalg.norm(new[changed], axis=1, keepdims=True)
  # Half the queries near moved rows, half near the rest.
  anchors = np.concatenate([rng.choice(changed, _QUERIES.value // 2),
                            rng.integers(0, rows, _QUERIES.value - _QUERIES.value // 2)])
  queries = new[anchors] + rng.standard_normal((anchors.size, dim), dtype=np.float32) * (
      0.5 / math.sqrt(dim))
  _, truth = faiss.knn(queries, new, 100, metric=faiss.METRIC_INNER_PRODUCT)

  factory = f"IVF{_NLIST.value},PQ{_PQ_M.value}x8"
  build = dict(train_size=_TRAIN_SIZE.value, seed=0, nprobe=_NPROBE.value)
  tick = time.perf_counter()
  index = build_index(table, factory, **build)
  first_build = time.perf_counter() - tick
  stale_recall = _recall_at(search(index, queries, 100)[1], truth)

  tick = time.perf_counter()
  full = build_index(new, factory, **build)
  full_seconds = time.perf_counter() - tick
  full_recall = _recall_at(search(full, queries, 100)[1], truth)
  del full

  readd = emptied_copy(index)
  tick = time.perf_counter()
  readd.add(new)
  readd_seconds = time.perf_counter() - tick
  readd_recall = _recall_at(search(readd, queries, 100)[1], truth)
  del readd

  tick = time.perf_counter()
  incremental_refresh(index, changed, new[changed])
  incremental_seconds = time.perf_counter() - tick
  incremental_recall = _recall_at(search(index, queries, 100)[1], truth)
  return {
      "factory": factory, "rows": rows, "dim": dim, "changed_rows": int(changed.size),
      "train_size": _TRAIN_SIZE.value, "nprobe": _NPROBE.value, "queries": len(queries),
      "first_build_seconds": first_build,
      "full_rebuild_seconds": full_seconds, "full_rebuild_recall_at_100": full_recall,
      "readd_all_seconds": readd_seconds, "readd_all_recall_at_100": readd_recall,
      "incremental_seconds": incremental_seconds,
      "incremental_recall_at_100": incremental_recall,
      "stale_recall_at_100": stale_recall,
      "speedup_vs_full_rebuild": full_seconds / incremental_seconds,
      "speedup_vs_readd_all": readd_seconds / incremental_seconds,
      "faiss_threads": faiss.omp_get_max_threads(),
  }


# ----------------------------------------------------------------------------- report


def markdown(results: dict) -> str:
  lines = []
  rows, dim = results["rows"], results["dim"]
  if results.get("steps"):
    lines += [f"Train steps, {rows:,} x {dim} table, batch {results['batch']}, pool "
              f"{results['steps'][0]['pool_size']} rows, mode {results['mode']}, 1-layer encoder "
              f"(simulated CPU devices sharing {os.cpu_count()} cores):", "",
              "| devices | steps/s | table / device (GiB, measured) | Adam / device (GiB, "
              "measured) | bf16 table / device (GiB) | row sharding kept |",
              "|---|---|---|---|---|---|"]
    for r in results["steps"]:
      plan = memory_per_device(rows, dim, r["devices"])
      lines.append(f"| {r['devices']} | {r['steps_per_second']:.2f} | "
                   f"{_gib(r['table_bytes_per_device'])} | {_gib(r['adam_bytes_per_device'])} "
                   f"| {_gib(plan['table_bf16'])} | {r['table_sharding_kept']} |")
    lines.append("")
  if results.get("refresh"):
    r = results["refresh"]
    lines += [f"Index refresh, {r['factory']} over {r['rows']:,} x {r['dim']}, "
              f"{r['changed_rows']:,} rows moved, Recall@100 vs exact over {r['queries']} "
              f"queries (nprobe {r['nprobe']}, {r['faiss_threads']} FAISS threads):", "",
              "| refresh | seconds | Recall@100 |", "|---|---|---|",
              f"| none (stale index) | 0 | {r['stale_recall_at_100']:.4f} |",
              f"| full rebuild (retrain + add all) | {r['full_rebuild_seconds']:.2f} | "
              f"{r['full_rebuild_recall_at_100']:.4f} |",
              f"| re-add all, quantizer kept | {r['readd_all_seconds']:.2f} | "
              f"{r['readd_all_recall_at_100']:.4f} |",
              f"| incremental (changed rows only) | {r['incremental_seconds']:.2f} | "
              f"{r['incremental_recall_at_100']:.4f} |", "",
              f"Incremental is {r['speedup_vs_full_rebuild']:.1f}x faster than a full rebuild "
              f"and {r['speedup_vs_readd_all']:.1f}x faster than re-adding every row.", ""]
  plan_rows, plan_dim = results["paper_plan"]["rows"], results["paper_plan"]["dim"]
  lines += [f"Memory plan, {plan_rows:,} x {plan_dim} (GiB per device; Adam = per-row "
            "mu + nu float32 + int32 count):", "",
            "| devices | table f32 | table bf16 | Adam | total f32 | total bf16 |",
            "|---|---|---|---|---|---|"]
  for p in results["paper_plan"]["per_device"]:
    lines.append(f"| {p['devices']} | {_gib(p['table_f32'])} | {_gib(p['table_bf16'])} | "
                 f"{_gib(p['adam'])} | {_gib(p['total_f32'])} | {_gib(p['total_bf16'])} |")
  return "\n".join(lines)


def main(argv):
  del argv
  if _CHILD_DEVICES.value:
    child_steps(_CHILD_DEVICES.value, _CHILD_OUT.value)
    return
  if not _OUT.value:
    raise app.UsageError("--out is required.")
  pathlib.Path(_OUT.value).parent.mkdir(parents=True, exist_ok=True)
  results = {"rows": _ROWS.value, "dim": _DIM.value, "batch": _BATCH.value,
             "mode": _MODE.value,
             "cpu_count": os.cpu_count(),
             "paper_plan": {"rows": _PAPER_ROWS.value, "dim": _PAPER_DIM.value,
                            "per_device": [memory_per_device(_PAPER_ROWS.value,
                                                             _PAPER_DIM.value, int(n))
                                           for n in _PAPER_DEVICES.value]}}
  tick = time.perf_counter()
  if not _SKIP_STEPS.value:
    print("step rate:", flush=True)
    results["steps"] = bench_steps()
  if not _SKIP_REFRESH.value:
    print("refresh:", flush=True)
    results["refresh"] = bench_refresh()
  results["total_seconds"] = time.perf_counter() - tick
  pathlib.Path(_OUT.value).write_text(json.dumps(results, indent=1))
  print(markdown(results))


if __name__ == "__main__":
  run_main(main)
