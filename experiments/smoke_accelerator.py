r"""A few training steps on whatever backend JAX finds, with the live codes checked
against FAISS's and the encoder and step timed; writes one JSON.

  python experiments/smoke_accelerator.py --out=smoke.json
  python experiments/smoke_accelerator.py --config=configs/demo.py:steps=5,mode=dback \
      --rows=2000 --steps=3 --out=smoke.json

The demo config's encoder, mode, index and step shape (batch, k) on a synthetic table of
unit rows (the corpus embedding would take minutes on CPU and says nothing about the
device): builds the index, compares `pq.encode_with_lists` on the device with the codes
FAISS stored (every row must match, except rows an HNSW coarse quantizer put in another
list), then times the query encoder's forward and the whole step (forward, backward,
update) over ``--steps`` steps after one compiling step. Exit status 1 when a code
differs or a loss is not finite. The JSON names the backend, the device kind and count,
the CPU model and what `qdr_jax.platform.tune_process` set.
"""

import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from qdr_jax import platform, quant, sharding
from qdr_jax.cli import run_main
from qdr_jax.index.lifecycle import IndexLifecycle
from qdr_jax.io_utils import write_json_atomic
from qdr_jax.negatives.pool import build_pool
from qdr_jax.quant import pq
from qdr_jax.targets.embed import make_apply
from qdr_jax.targets.encoders import load_encoders
from qdr_jax.train import optim
from qdr_jax.train.modes import mode_from_config
from qdr_jax.train.state import init_state
from qdr_jax.train.step import make_step_functions

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Experiment config.",
                                          lock_config=True)
_ROWS = flags.DEFINE_integer("rows", 5183, "Synthetic table rows (SciFact's corpus size).")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps, after one compiling step.")
_OUT = flags.DEFINE_string("out", None, "JSON output path.")
flags.mark_flag_as_required("out")


def _table(rows: int, dim: int, seed: int = 0) -> np.ndarray:
  """Unit rows around random topics, so that IVF lists and codes are not uniform."""
  rng = np.random.default_rng(seed)
  topics = rng.normal(size=(max(8, rows // 25), dim))
  x = topics[rng.integers(0, len(topics), rows)] + 0.7 * rng.normal(size=(rows, dim))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _timed(fn, repeats: int) -> list[float]:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def _check_codes(lifecycle: IndexLifecycle, table: np.ndarray) -> dict:
  """Live codes on the device against the ones FAISS stored for the same rows."""
  q = quant.quantizer_from_faiss(lifecycle.index)
  codes, lists = quant.stored_codes(lifecycle.index)
  live_codes, live_lists = jax.jit(pq.encode_with_lists)(q, jnp.asarray(table))
  same_list = np.asarray(live_lists) == lists
  same_codes = np.all(np.asarray(live_codes) == codes, axis=1)
  hnsw = "HNSW" in lifecycle.cfg.factory
  return {"rows": len(table), "lists_equal": float(same_list.mean()),
          "codes_equal": float(same_codes.mean()),
          "codes_equal_where_lists_equal": float(same_codes[same_list].mean()),
          "hnsw_coarse": hnsw,
          "ok": bool(np.all(same_codes[same_list]) and (hnsw or np.all(same_list)))}


def main(argv):
  del argv
  config = _CONFIG.value
  mode = mode_from_config(config)
  encoders = load_encoders(config.model)
  module, params = encoders.query_module, encoders.query_params
  table = _table(_ROWS.value, module.config.hidden_size)
  mesh = sharding.make_mesh(config.sharding)
  lifecycle = IndexLifecycle(config.index, mesh=mesh, num_rows=len(table),
                             padded_rows=sharding.padded_rows(len(table), mesh), quantize=True,
                             codes_from_index=config.quant.codes == "index",
                             learn_index=mode.learns_index)
  start = time.perf_counter()
  lifecycle.build(table)
  build_s = time.perf_counter() - start
  codes = _check_codes(lifecycle, table)

  steps = _STEPS.value + 1
  encoder_tx, _ = optim.make_encoder_optimizer(config.optim, steps)
  row_tx = optim.make_row_transform(config.optim)
  row_lr = optim.make_schedule(config.optim.row_lr, config.optim, steps)
  index_tx = (optim.make_index_optimizer(config.optim, steps, mode.learn)[0]
              if mode.learns_index else None)
  quantizer = lifecycle.loss_inputs.quantizer
  state = init_state(config, mode, params, table, quantizer, mesh, encoder_tx, row_tx,
                     index_tx)
  apply = make_apply(module)
  fns = make_step_functions(lambda p, **t: apply(p, **t), mode, config, encoder_tx, row_tx,
                            row_lr, index_tx, mesh)
  rng = np.random.default_rng(1)
  batch, length = config.train.batch_size, config.model.max_query_length
  tokens = {"input_ids": jnp.asarray(rng.integers(1000, 2000, (batch, length)), jnp.int32),
            "attention_mask": jnp.ones((batch, length), jnp.int32),
            "token_type_ids": jnp.zeros((batch, length), jnp.int32)}
  forward = jax.jit(apply)
  forward_s = _timed(lambda: forward(params, **tokens), steps)[1:]

  pool_rows = min(batch * config.negatives.k, len(table))
  step_s, losses = [], []
  for _ in range(steps):
    # Random candidates stand in for the index's search: its host time is not the device's.
    positives = rng.choice(len(table), batch, replace=False)
    pool = build_pool(rng.integers(0, len(table), (batch, config.negatives.k)),
                      [np.array([p]) for p in positives], pool_size=pool_rows,
                      num_rows=len(table), max_positives=1, rng=rng)
    pool = jax.block_until_ready({k: jnp.asarray(v) for k, v in pool.arrays().items()})
    begin = time.perf_counter()
    query_emb, vjp = fns.encode(state.params, tokens)
    state, metrics = fns.update(state, vjp, query_emb, pool, lifecycle.loss_inputs.quantizer,
                                lifecycle.loss_inputs.codes)
    losses.append(float(jax.device_get(metrics["loss"])))
    step_s.append(time.perf_counter() - begin)

  finite = bool(np.all(np.isfinite(losses)))
  result = {
      "backend": platform.backend(), "device_kind": platform.device_kind(),
      "devices": jax.device_count(), "cpu_model": platform.cpu_model(),
      "jax": jax.__version__, "tuned": dict(platform.tuned),
      "config": config.data.name, "mode": config.train.mode, "index": config.index.factory,
      "rows": len(table), "batch": batch, "query_length": length, "pool_rows": pool_rows,
      "dtype": config.model.dtype, "index_build_s": round(build_s, 3), "codes": codes,
      "encoder_forward_s": {"median": statistics.median(forward_s), "all": forward_s},
      "step_s": {"compile_step": step_s[0], "median": statistics.median(step_s[1:]),
                 "all": step_s[1:]},
      "losses": losses, "ok": codes["ok"] and finite}
  print(json.dumps(result, indent=1))
  write_json_atomic(_OUT.value, result)
  if not result["ok"]:
    raise SystemExit(1)


if __name__ == "__main__":
  run_main(main)
