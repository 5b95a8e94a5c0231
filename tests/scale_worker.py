"""Subprocess body of the scale-out tests: runs train steps on a chosen device layout.

One job: run a few steps of the real jitted step functions (``qdr_jax.train.step``) on a
tiny, seeded problem under a given mesh, and save the resulting state for the parent test
to compare. It runs as a script, not under pytest, because the CPU device count
(``XLA_FLAGS``) and JAX's distributed runtime must be set up before JAX starts:

  python tests/scale_worker.py sharding OUT.npz
  python tests/scale_worker.py pair OUTDIR --beir=DIR --encoder=DIR --cache=DIR \
      --workdir=DIR --process-id=I --num-processes=2 --port=P
  python tests/scale_worker.py solo OUTDIR --beir=DIR --encoder=DIR --cache=DIR --workdir=DIR
  python tests/scale_worker.py fail OUT --beir=DIR --encoder=DIR --cache=DIR \
      --workdir=DIR --process-id=I --num-processes=2 --port=P

``pair`` runs every multi-process scenario in one pair of processes (the data-parallel
steps, the training loop, the resume twins, then process 0's failing search, which ends
both), so that start-up, the distributed runtime and the table's embedding are paid once;
``solo`` runs their single-process references in one process of 4 devices.

Every run draws its tokens and pools from the same seeds, so any two layouts must agree up
to the float error of a different reduction order.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys


def _set_device_count(n: int) -> None:
  flags = os.environ.get("XLA_FLAGS", "")
  flags = " ".join(f for f in flags.split() if "xla_force_host_platform_device_count" not in f)
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


DIM, BATCH, SEQ, POOL, STEPS = 32, 8, 8, 24, 3


_SHARED = []


def _shared():
  """Encoder, its initial params, the 512-row table and a PQ quantizer, made once.

  Every run of a process shares them: training the PQ and compiling the parameter init
  would otherwise dominate the test's time.
  """
  if not _SHARED:
    import faiss
    import jax
    import numpy as np

    from qdr_jax.models import BertEncoder, EncoderConfig, init_params
    from qdr_jax.quant import quantizer_from_faiss

    module = BertEncoder(EncoderConfig.tiny(num_layers=1, pooling="mean", normalize=True))
    params = jax.device_get(init_params(module, jax.random.key(0)))
    table = np.random.default_rng(0).normal(size=(512, DIM)).astype(np.float32)
    # "np": no polysemous training (seconds per build, and useless here).
    index = faiss.index_factory(DIM, "PQ4x8np", faiss.METRIC_INNER_PRODUCT)
    index.pq.cp.niter = 4  # a rough quantizer is enough: it only shapes the loss
    index.train(table)
    _SHARED.extend([module, params, table, quantizer_from_faiss(index)])
  return _SHARED


def _setup(*, rows: int, table_dtype: str, num_devices: int, batch: int = BATCH,
           mode_name: str = "dback", shard_params: bool = False,
           bf16_update: str = "stochastic"):
  """The config, mesh, initial state and step functions of the tiny problem."""
  import jax

  from qdr_jax import sharding
  from qdr_jax.config import base_config
  from qdr_jax.train import optim
  from qdr_jax.train.modes import get_mode
  from qdr_jax.train.state import init_state
  from qdr_jax.train.step import make_step_functions

  config = base_config()
  config.train.steps = 10
  config.train.batch_size = batch
  config.loss.temperature = 0.1
  config.optim.warmup_steps = 0
  config.optim.encoder_lr = 1e-3
  config.optim.row_lr = 1e-2
  config.sharding.num_devices = num_devices
  config.table.dtype = table_dtype
  config.table.bf16_update = bf16_update
  config.sharding.shard_params = shard_params
  mode = get_mode(mode_name)
  module, params, full_table, quantizer = _shared()
  # The same first 509 rows whatever the table size, so padded and unpadded runs compare.
  table = full_table[:rows]
  mesh = sharding.make_mesh(config.sharding)
  encoder_tx, _ = optim.make_encoder_optimizer(config.optim, config.train.steps)
  row_tx = optim.make_row_transform(config.optim)
  row_lr = optim.make_schedule(config.optim.row_lr, config.optim, config.train.steps)
  state = init_state(config, mode, params, table, quantizer, mesh, encoder_tx, row_tx, None)
  apply = lambda p, **t: module.apply({"params": p}, t["input_ids"], t["attention_mask"],
                                      t["token_type_ids"])
  fns = make_step_functions(apply, mode, config, encoder_tx, row_tx, row_lr, None, mesh)
  quantizer_dev = jax.device_put(quantizer, sharding.replicated(mesh))
  return config, mesh, state, fns, quantizer_dev


def _step_inputs(step: int, rows: int, batch: int = BATCH, seed: int = 1):
  """Host tokens and pool arrays of ``step`` (a pure function of the step and seed)."""
  import numpy as np

  from qdr_jax.negatives.pool import build_pool

  rng = np.random.default_rng((seed, step))
  tokens = {"input_ids": rng.integers(1, 100, (batch, SEQ)).astype(np.int32),
            "attention_mask": np.ones((batch, SEQ), np.int32),
            "token_type_ids": np.zeros((batch, SEQ), np.int32)}
  # Candidates from a narrow band of rows so that steps revisit rows (their Adam state),
  # and rows near the end of the table (the shard boundary of a padded table).
  candidates = rng.integers(rows - 64, rows, (batch, 6))
  positives = [np.array([(7 * step + 3 * b) % rows]) for b in range(batch)]
  pool = build_pool(candidates, positives, pool_size=POOL, num_rows=rows, max_positives=1,
                    rng=rng, fill_valid=False)
  return tokens, pool.arrays()


def _flat(tree) -> dict:
  import jax
  import numpy as np
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {jax.tree_util.keystr(path): np.asarray(leaf, np.float32) for path, leaf in leaves}


def _run_local(*, rows: int, table_dtype: str, num_devices: int,
               shard_params: bool = False, bf16_update: str = "stochastic"
               ) -> tuple[dict, list[str]]:
  """STEPS steps on one process; returns arrays to save and sharding violations."""
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  from qdr_jax import sharding

  _, mesh, state, fns, quantizer = _setup(rows=rows, table_dtype=table_dtype,
                                          num_devices=num_devices, shard_params=shard_params,
                                          bf16_update=bf16_update)
  row_sh = NamedSharding(mesh, P(sharding.DATA_AXIS))
  batch_sh = sharding.batch_sharding(mesh)
  rep = sharding.replicated(mesh)
  padded = sharding.padded_rows(rows, mesh)
  problems = []

  def check(name, array, expected):
    if not array.sharding.is_equivalent_to(expected, array.ndim):
      problems.append(f"{num_devices} devices: {name} has {array.sharding}, expected "
                      f"{expected.spec}")

  for step in range(STEPS):
    tokens, pool = _step_inputs(step, rows)
    tokens = jax.device_put(tokens, batch_sh)
    pool = jax.device_put(pool, rep)
    query_emb, vjp = fns.encode(state.params, tokens)
    for name, array in tokens.items():
      check(f"step {step} tokens[{name}]", array, batch_sh)
    check(f"step {step} query embeddings", query_emb, batch_sh)
    state, metrics = fns.update(state, vjp, query_emb, pool, quantizer)
    check(f"step {step} table", state.table, row_sh)
    for name, leaf in _flat_leaves(state.row_opt_state):
      check(f"step {step} row_opt_state{name}", leaf, row_sh)
    for tree_name in ("params", "encoder_opt_state"):
      for name, leaf in _flat_leaves(getattr(state, tree_name)):
        check(f"step {step} {tree_name}{name}", leaf,
              sharding.param_sharding(leaf.shape, mesh, shard_params))
    if state.table.shape[0] != padded:
      problems.append(f"table has {state.table.shape[0]} rows, expected {padded}")
  shard_rows = {s.data.shape[0] for s in state.table.addressable_shards}
  if shard_rows != {padded // num_devices}:
    problems.append(f"table shards have {shard_rows} rows, expected {padded // num_devices}")
  out = {f"params{k}": v for k, v in _flat(state.params).items()}
  out.update({f"rowstate{k}": v[:rows] for k, v in _flat(state.row_opt_state).items()})
  out["table"] = np.asarray(state.table[:rows].astype(np.float32))
  out["table_bytes_per_device"] = np.asarray(
      max(s.data.nbytes for s in state.table.addressable_shards))
  out["row_state_bytes_per_device"] = np.asarray(sum(
      max(s.data.nbytes for s in leaf.addressable_shards)
      for leaf in jax.tree.leaves(state.row_opt_state)))
  out["loss"] = np.asarray(float(metrics["loss"]))
  out["encoder_bytes_per_device"] = np.asarray(sum(
      max(s.data.nbytes for s in leaf.addressable_shards)
      for leaf in jax.tree.leaves(state.params)))
  return out, problems


def _flat_leaves(tree):
  import jax
  return [(jax.tree_util.keystr(p), leaf)
          for p, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def sharding_main(out_path: str) -> None:
  """1-device vs 8-device runs of the float32, padded (509 rows) and bfloat16 tables
  (stochastically rounded), 8 devices with a bfloat16 table from float32 master rows, and
  8 devices with FSDP-split encoder weights."""
  _set_device_count(8)
  import numpy as np

  scenarios = {"f32_512": (512, "float32", False, ""), "f32_509": (509, "float32", False, ""),
               "bf16_512": (512, "bfloat16", False, "stochastic"),
               "bf16master_512": (512, "bfloat16", False, "master"),
               "fsdp_512": (512, "float32", True, "")}
  arrays, problems = {}, []
  for name, (rows, dtype, fsdp, bf16_update) in scenarios.items():
    for devices in ((1, 8) if name in ("f32_512", "f32_509", "bf16_512") else (8,)):
      out, found = _run_local(rows=rows, table_dtype=dtype, num_devices=devices,
                              shard_params=fsdp, bf16_update=bf16_update or "stochastic")
      problems += [f"{name}: {p}" for p in found]
      arrays.update({f"{name}/{devices}/{k}": v for k, v in out.items()})
  arrays["problems"] = np.asarray(json.dumps(problems))
  np.savez(out_path, **arrays)


def _distribute(config, args: argparse.Namespace) -> None:
  """Points ``config`` at the localhost job of ``args`` (nothing for one process)."""
  if args.num_processes > 1:
    config.distributed.coordinator_address = f"localhost:{args.port}"
    config.distributed.num_processes = args.num_processes
    config.distributed.process_id = args.process_id
    config.distributed.cpu_collectives = "gloo"


def _tiny_config(args: argparse.Namespace):
  """The tests' tiny config (conftest) on this job's data, encoder and table cache."""
  from conftest import make_tiny_config  # the script's directory heads sys.path
  config = make_tiny_config(args.beir, args.encoder, args.cache)
  config.sharding.num_devices = 0  # every device of every process
  _distribute(config, args)
  return config


def _reference_steps(out_path: str) -> None:
  """The data-parallel steps' problem on one process and one device."""
  import numpy as np
  out, problems = _run_local(rows=512, table_dtype="float32", num_devices=1)
  np.savez(out_path, problems=np.asarray(json.dumps(problems)), **out)


def _multihost_steps(out_path: str, info) -> None:
  """STEPS steps data-parallel over every process's CPU devices.

  Each process loads only its block of every batch, process 0 makes the pool and
  broadcasts it (the other processes pass nothing), and the table is sharded by rows over
  all processes' devices.
  """
  import jax
  import numpy as np

  from qdr_jax import distributed

  rows = 512
  _, mesh, state, fns, quantizer = _setup(rows=rows, table_dtype="float32", num_devices=0)
  problems = []
  if mesh.devices.size != len(jax.local_devices()) * info.process_count:
    problems.append(f"mesh has {mesh.devices.size} devices")
  queries = []
  for step in range(STEPS):
    tokens, pool = _step_inputs(step, rows)
    # Per-host loading: only this process's block of the global batch.
    local = jax.tree.map(
        lambda a: distributed.process_batch_slice(a, info.process_index, info.process_count),
        tokens)
    tokens_dev = distributed.host_local_to_global(local, mesh)
    query_emb, vjp = fns.encode(state.params, tokens_dev)
    # What the host's FAISS search would see: the whole batch's embeddings.
    queries.append(distributed.global_to_host(query_emb))
    # Only process 0 has a pool, as only it searches FAISS in the training loop.
    pool = distributed.broadcast_arrays(pool if info.process_index == 0 else None)
    pool_dev = distributed.replicate_to_global(pool, mesh)
    state, metrics = fns.update(state, vjp, query_emb, pool_dev, quantizer)
  table = distributed.global_to_host(state.table)[:rows]
  params = distributed.global_to_host(state.params)
  row_state = distributed.global_to_host(state.row_opt_state)
  out = {f"params{k}": v for k, v in _flat(params).items()}
  out.update({f"rowstate{k}": v[:rows] for k, v in _flat(row_state).items()})
  out["table"] = np.asarray(table, np.float32)
  out["queries"] = np.stack(queries)
  out["loss"] = np.asarray(float(distributed.global_to_host(metrics["loss"])))
  out["process_count"] = np.asarray(info.process_count)
  out["local_devices"] = np.asarray(len(jax.local_devices()))
  out["table_local_rows"] = np.asarray(sum(s.data.shape[0]
                                           for s in state.table.addressable_shards))
  np.savez(out_path, problems=np.asarray(json.dumps(problems)), **out)


def _train_loop(out_path: str, args: argparse.Namespace, workdir: str, info) -> None:
  """The real training loop (``qdr_jax.train.loop.train``) on the tiny BEIR data: every
  refresh kind and a checkpoint happen within the 12 steps."""
  import pathlib

  import jax
  import numpy as np

  from qdr_jax.data.loader import load_dataset
  from qdr_jax.targets.encoders import embed_passages, load_encoders
  from qdr_jax.targets.table import build_or_load_table
  from qdr_jax.train.loop import train
  from qdr_jax.train.modes import get_mode

  config = _tiny_config(args)
  config.train.steps = 12
  config.index.rebuild_every = 4
  config.index.full_rebuild_every = 8  # step 4 incremental, step 8 full
  config.checkpoint.every = 6
  dataset = load_dataset(config.data)
  encoders = load_encoders(config.model)
  table0 = build_or_load_table(config, dataset.corpus, pathlib.Path(args.cache),
                               embed_passages(encoders, config))
  trained = train(config, get_mode(config.train.mode), dataset, encoders, table0,
                  pathlib.Path(workdir))
  out = {f"params{k}": v for k, v in _flat(trained.params).items()}
  # Only process 0 (the index's owner) receives the whole trained table.
  table = trained.lifecycle.table_to_lead(trained.state.table)
  out["holds_table"] = np.asarray(table is not None)
  if table is not None:
    out["table"] = table
  out["table0"] = table0
  out["process_count"] = np.asarray(info.process_count)
  out["devices"] = np.asarray(jax.device_count())
  np.savez(out_path, problems=np.asarray("[]"), **out)


# Index-learning modes of the resume twins: (train.mode, quant.learn, index.factory).
RESUME_MODES = {"jpq": ("jpq", (), "IVF4,PQ4x8"),
                "dback_codebooks_opq": ("dback", ("codebooks",), "OPQ4,IVF4,PQ4x8")}
RESUME_STEPS, RESUME_STOP = 6, 3  # refreshes after steps 2 and 4, checkpoints at 3 and 6


def _resume_twins(out_path: str, args: argparse.Namespace, root: str, info) -> None:
  """Twin runs of each `RESUME_MODES` entry with ``experiment.train_and_evaluate``: one
  uninterrupted, one stopped by SIGTERM (on every process) after step ``RESUME_STOP``
  and rerun to resume. Each run's served index (its training quantizer over the final
  table) is written by process 0 as ``{workdir}/served.faiss`` for the test to compare
  with the exported bundle; the workdirs are ``{root}/{mode}_{straight|resumed}``."""
  import pathlib
  import signal

  import faiss
  import numpy as np

  from qdr_jax import experiment
  from qdr_jax.negatives import source as negatives

  real_evaluate, real_batch_indices = experiment.evaluate_splits, negatives.batch_indices
  served_path = []

  def keep_served(*a, served_index=None, **kw):
    if served_index is not None and served_path:
      faiss.write_index(served_index, str(served_path[0]))
    return real_evaluate(*a, served_index=served_index, **kw)

  def stop_at(step, *a, **kw):
    # Prepared after step RESUME_STOP - 1: the processes agree to stop at the next
    # checkpoint step, whose save holds RESUME_STOP.
    if step == RESUME_STOP - 1:
      os.kill(os.getpid(), signal.SIGTERM)
    return real_batch_indices(step, *a, **kw)

  out = {}
  experiment.evaluate_splits = keep_served
  try:
    for name, (mode, learn, factory) in RESUME_MODES.items():
      config = _tiny_config(args)
      config.train.mode, config.quant.learn, config.index.factory = mode, learn, factory
      config.train.steps = RESUME_STEPS
      config.index.rebuild_every = 2
      # Large enough that two steps move the learned codebooks' codes away from what a
      # k-means retrain gives (the default's barely move them).
      config.optim.codebook_lr = 5e-2
      config.checkpoint.every = RESUME_STOP
      for twin in ("straight", "resumed"):
        workdir = pathlib.Path(root) / f"{name}_{twin}"
        served_path[:] = [workdir / "served.faiss"]
        if twin == "resumed":
          negatives.batch_indices = stop_at
          stopped = experiment.train_and_evaluate(config, workdir)
          negatives.batch_indices = real_batch_indices
          out[f"{name}/stopped_at"] = np.asarray(stopped.get("step", -1))
        experiment.train_and_evaluate(config, workdir)
  finally:
    experiment.evaluate_splits, negatives.batch_indices = real_evaluate, real_batch_indices
  out["process_count"] = np.asarray(info.process_count)
  np.savez(out_path, problems=np.asarray("[]"), **out)


def _failing_run(time_path: str, args: argparse.Namespace, workdir: str, fail: str,
                 info) -> None:
  """The training loop with process 0 failing in its FAISS work, under ``cli.guarded`` as
  the experiment scripts run: ``fail='search'`` raises in the third search, ``'kill'``
  SIGKILLs process 0 inside the first index refresh. Writes the time of the failure
  (``time.time()``) to ``time_path``; ends the process (guarded exits)."""
  import pathlib
  import signal
  import time

  from qdr_jax import cli
  from qdr_jax.data.loader import load_dataset
  from qdr_jax.index import lifecycle
  from qdr_jax.negatives import source
  from qdr_jax.targets.encoders import embed_passages, load_encoders
  from qdr_jax.targets.table import build_or_load_table
  from qdr_jax.train.loop import train
  from qdr_jax.train.modes import get_mode

  config = _tiny_config(args)
  config.train.steps = 8
  config.index.rebuild_every = 2
  config.index.full_rebuild_every = 4  # step 2: an incremental refresh

  def failing(real, after_calls: int, how):
    calls = []

    def wrapped(*a, **k):
      calls.append(1)
      if len(calls) > after_calls:
        pathlib.Path(time_path).write_text(str(time.time()))
        how()
      return real(*a, **k)
    return wrapped

  def search_error():
    raise RuntimeError("injected FAISS search failure")

  if info.process_index == 0 and fail == "search":
    source.search = failing(source.search, 2, search_error)
  elif info.process_index == 0:
    lifecycle.incremental_refresh = failing(
        lifecycle.incremental_refresh, 0, lambda: os.kill(os.getpid(), signal.SIGKILL))

  def run(argv):
    del argv
    dataset = load_dataset(config.data)
    encoders = load_encoders(config.model)
    table0 = build_or_load_table(config, dataset.corpus, pathlib.Path(args.cache),
                                 embed_passages(encoders, config))
    train(config, get_mode(config.train.mode), dataset, encoders, table0,
          pathlib.Path(workdir))

  cli.guarded(run)([])


# Printed by the pair before its last scenario: the test reads the log from there on.
SEARCH_MARKER = "scenario: process 0's search fails"


def pair_main(out_dir: str, args: argparse.Namespace) -> None:
  """Every multi-process scenario, in order, in this process of a 2-process job of 2 CPU
  devices each: `_multihost_steps`, `_train_loop` (workdir ``multi``), `_resume_twins`,
  and last `_failing_run` with a failing search (workdir ``search``), which exits."""
  _set_device_count(2)
  import pathlib

  from qdr_jax import distributed

  info = distributed.initialize_distributed(_tiny_config(args))
  out, root, pid = pathlib.Path(out_dir), pathlib.Path(args.workdir), args.process_id
  _multihost_steps(str(out / f"steps_p{pid}.npz"), info)
  _train_loop(str(out / f"train_p{pid}.npz"), args, str(root / "multi"), info)
  _resume_twins(str(out / f"resume_p{pid}.npz"), args, str(root), info)
  print(SEARCH_MARKER, flush=True)
  _failing_run(str(out / "search.time"), args, str(root / "search"), "search", info)


def solo_main(out_dir: str, args: argparse.Namespace) -> None:
  """The pair's references in one process of 4 CPU devices: the data-parallel steps on
  one device, and the training loop on all four (workdir ``single``)."""
  _set_device_count(4)
  import pathlib

  from qdr_jax import distributed

  args.num_processes = 1
  info = distributed.initialize_distributed(_tiny_config(args))
  out = pathlib.Path(out_dir)
  _reference_steps(str(out / "steps_ref.npz"))
  _train_loop(str(out / "train_ref.npz"), args, str(pathlib.Path(args.workdir) / "single"),
              info)


def fail_main(out_path: str, args: argparse.Namespace) -> None:
  """`_failing_run` with process 0 SIGKILLed inside a refresh, in a 2-process job whose
  heartbeat timeout (30 s) lets process 1 notice within a minute."""
  _set_device_count(2)
  from qdr_jax import distributed

  config = _tiny_config(args)
  config.distributed.timeout_seconds = 30
  info = distributed.initialize_distributed(config)
  _failing_run(out_path, args, args.workdir, "kill", info)


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("kind", choices=("sharding", "pair", "solo", "fail"))
  parser.add_argument("out")
  parser.add_argument("--process-id", type=int, default=0)
  parser.add_argument("--num-processes", type=int, default=2)
  parser.add_argument("--port", type=int, default=0)
  parser.add_argument("--beir", help="tiny BEIR root")
  parser.add_argument("--encoder", help="tiny encoder directory")
  parser.add_argument("--cache", help="table cache directory")
  parser.add_argument("--workdir", help="root of the runs' workdirs")
  args = parser.parse_args(argv)
  jobs = {"sharding": lambda: sharding_main(args.out), "pair": lambda: pair_main(args.out, args),
          "solo": lambda: solo_main(args.out, args), "fail": lambda: fail_main(args.out, args)}
  jobs[args.kind]()


if __name__ == "__main__":
  # A job that hangs (e.g. processes waiting on different collectives) is sent SIGABRT by
  # the parent test: every thread's stack then goes to the log the test prints.
  faulthandler.enable(all_threads=True)
  main(sys.argv[1:])
