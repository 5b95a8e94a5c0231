"""Subprocess side of the checkpoint tests: restore on N devices, save, die mid-save.

  python tests/checkpoint_worker.py DIR

With ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` set by the caller it runs on
4 CPU devices: it restores the latest checkpoint of DIR (saved by the 1-device test
process) onto a row-sharded state, checks it against `make_state`, saves the next step,
then starts one more save whose final rename never happens and prints ``BLOCKED`` so
that the caller can SIGKILL it there.
"""

from __future__ import annotations

import sys
import threading

import jax
import numpy as np

from qdr_jax import sharding
from qdr_jax.config import base_config
from qdr_jax.train import optim
from qdr_jax.train.checkpoint import Checkpointer
from qdr_jax.train.modes import get_mode
from qdr_jax.train.state import init_state

NUM_ROWS, DIM = 10, 4


def make_state(num_devices: int, seed: int = 0):
  """A small dback `TrainState` on ``num_devices`` devices, values fixed by ``seed``."""
  config = base_config()
  config.sharding.num_devices = num_devices
  mesh = sharding.make_mesh(config.sharding)
  rng = np.random.default_rng(seed)
  params = {"dense": {"kernel": rng.normal(size=(DIM, DIM)).astype(np.float32),
                      "bias": rng.normal(size=(DIM,)).astype(np.float32)}}
  table = rng.normal(size=(NUM_ROWS, DIM)).astype(np.float32)
  encoder_tx, _ = optim.make_encoder_optimizer(config.optim, 10)
  row_tx = optim.make_row_transform(config.optim)
  state = init_state(config, get_mode("dback"), params, table, None, mesh, encoder_tx,
                     row_tx, None)
  return config, state


def metadata(config, state, step: int) -> dict:
  from qdr_jax.train.resume import make_metadata  # pylint: disable=g-import-not-at-top
  return make_metadata(config, step=step, corpus_size=NUM_ROWS,
                       table_rows=state.table.shape[0], dim=DIM, table_dtype="float32",
                       has_codebooks=False)


def main(directory: str) -> None:
  config, state = make_state(len(jax.devices()))
  ckpt = Checkpointer(directory, keep=5)
  restored = ckpt.restore(state)
  _, expected = make_state(1, seed=restored.step)
  np.testing.assert_array_equal(np.asarray(restored.state.table)[:NUM_ROWS],
                                np.asarray(expected.table)[:NUM_ROWS])
  assert restored.state.table.sharding.spec == state.table.sharding.spec
  print("RESTORED", restored.step, len(restored.state.table.sharding.device_set), flush=True)
  step = restored.step + 1
  _, mine = make_state(len(jax.devices()), seed=step)
  ckpt.save(mine, metadata(config, mine, step))
  ckpt.wait_until_finished()
  print("SAVED", step, flush=True)

  # Everything of the next save is written, but the rename that commits it blocks.
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
  blocked = threading.Event()

  async def never_rename(*args, **kwargs):
    del args, kwargs
    blocked.set()
    threading.Event().wait()

  atomicity.async_path.rename = never_rename
  ckpt.save(mine, metadata(config, mine, step + 1))
  blocked.wait()
  print("BLOCKED", flush=True)
  threading.Event().wait()


if __name__ == "__main__":
  main(sys.argv[1])
