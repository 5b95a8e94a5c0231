"""Checkpointing keeps no copy of the table or its row state on the devices."""

import gc
import pathlib

import jax

from qdr_jax.data.loader import load_dataset
from qdr_jax.sharding import device_buffer_bytes
from qdr_jax.targets.encoders import embed_passages, load_encoders
from qdr_jax.targets.table import build_or_load_table
from qdr_jax.train.loop import train
from qdr_jax.train.modes import get_mode


def _row_arrays(arrays, rows: int):
  return [a for a in arrays if isinstance(a, jax.Array) and a.ndim and a.shape[0] == rows]


def test_saved_run_holds_one_copy_of_the_row_state(tiny_config, tmp_path):
  config = tiny_config.copy_and_resolve_references()
  config.unlock()
  config.train.steps = 3
  config.checkpoint.every = 2  # saves at step 2 and at the last, 3
  config.lock()
  dataset = load_dataset(config.data)
  encoders = load_encoders(config.model)
  table0 = build_or_load_table(config, dataset.corpus, pathlib.Path(config.table.cache_dir),
                               embed_passages(encoders, config))
  result = train(config, get_mode("dback"), dataset, encoders, table0, tmp_path / "run")
  assert result.step == 3
  gc.collect()
  rows = result.state.table.shape[0]
  owned = _row_arrays(jax.tree.leaves((result.state.table, result.state.row_opt_state,
                                       result.lifecycle.loss_inputs.codes)), rows)
  live = _row_arrays(jax.live_arrays(), rows)
  # Orbax leaves extra array objects behind that alias the state's buffers: counting
  # objects would report ~2x; counting buffers must find exactly the run's own.
  assert sum(device_buffer_bytes(live).values()) == sum(device_buffer_bytes(owned).values())
  assert len(owned) >= 3  # table, Adam's two moments (and the codes)
