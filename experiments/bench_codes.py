r"""Milliseconds per jitted update: stored codes ('index') vs the live forward ('recompute').

  python experiments/bench_codes.py --rows=5183 --repeats=20

The demo config's step shape (batch 32, k=100 so a 3200-row pool, IVF64,PQ48x8, d=384) on
a synthetic unit-norm table; the query encoder is replaced by one linear layer so that
the figure is the update's own cost (pool targets, loss, gradients, row optimizer), which
the encoder's forward+backward (about 1.2 s for MiniLM-L6 on a 2-core CPU) adds to.
Also times the distillation and balance terms on top of 'recompute'. Prints JSON.
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from qdr_jax import sharding
from qdr_jax.cli import run_main
from qdr_jax.config import base_config
from qdr_jax.index.lifecycle import IndexLifecycle
from qdr_jax.train import optim
from qdr_jax.train.modes import get_mode
from qdr_jax.train.state import init_state
from qdr_jax.train.step import make_step_functions

_ROWS = flags.DEFINE_integer("rows", 5183, "Table rows (SciFact's corpus size by default).")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed updates per variant (after 2 warm-ups).")
_DIM = 384


def _table(rows: int, seed: int = 0) -> np.ndarray:
  """Unit rows around 200 random topics, so that the IVF lists and codes are not uniform."""
  rng = np.random.default_rng(seed)
  topics = rng.normal(size=(200, _DIM))
  x = topics[rng.integers(0, 200, rows)] + 0.7 * rng.normal(size=(rows, _DIM))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def time_update(codes: str, distill: float = 0.0, balance: float = 0.0) -> float:
  """Median milliseconds of one update with these settings."""
  config = base_config()
  config.quant.codes = codes
  config.loss.distill_weight = distill
  config.loss.balance_weight = balance
  mode = get_mode("dback")
  table = _table(_ROWS.value)
  mesh = sharding.make_mesh(config.sharding)
  lifecycle = IndexLifecycle(config.index, mesh=mesh, num_rows=len(table),
                             padded_rows=sharding.padded_rows(len(table), mesh), quantize=True,
                             codes_from_index=codes == "index", learn_index=False)
  lifecycle.build(table)
  encoder_tx, _ = optim.make_encoder_optimizer(config.optim, config.train.steps)
  row_tx = optim.make_row_transform(config.optim)
  row_lr = optim.make_schedule(config.optim.row_lr, config.optim, config.train.steps)
  params = {"w": np.eye(_DIM, dtype=np.float32)}
  state = init_state(config, mode, params, table, None, mesh, encoder_tx, row_tx, None)
  fns = make_step_functions(lambda p, x: x @ p["w"], mode, config, encoder_tx, row_tx,
                            row_lr, None, mesh)
  rng = np.random.default_rng(1)
  batch, pool_rows = config.train.batch_size, config.train.batch_size * config.negatives.k
  times = []
  for i in range(_REPEATS.value + 2):
    q = table[rng.integers(0, len(table), batch)]
    query_emb, vjp = fns.encode(state.params, {"x": jnp.asarray(q)})
    row_ids = np.sort(rng.choice(len(table), pool_rows, replace=False)).astype(np.int32)
    positive = np.zeros((batch, pool_rows), bool)
    positive[np.arange(batch), rng.choice(pool_rows, batch, replace=False)] = True
    pool = {"row_ids": jnp.asarray(row_ids), "valid": jnp.ones(pool_rows, bool),
            "positive_mask": jnp.asarray(positive),
            "hidden_mask": jnp.zeros((batch, pool_rows), bool)}
    jax.block_until_ready((query_emb, pool))
    start = time.perf_counter()
    state, metrics = fns.update(state, vjp, query_emb, pool, lifecycle.loss_inputs.quantizer,
                                lifecycle.loss_inputs.codes)
    jax.block_until_ready(metrics)
    if i >= 2:
      times.append(time.perf_counter() - start)
  return 1000 * float(np.median(times))


def main(argv):
  del argv
  results = {"rows": _ROWS.value, "shape": "batch 32, k=100 (pool 3200), IVF64,PQ48x8, d=384",
             "ms_per_update": {
                 "index": time_update("index"),
                 "recompute": time_update("recompute"),
                 "recompute+distill": time_update("recompute", distill=1.0),
                 "recompute+distill+balance": time_update("recompute", distill=1.0,
                                                          balance=0.1)}}
  print(json.dumps(results, indent=1))


if __name__ == "__main__":
  run_main(main)
