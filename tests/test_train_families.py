"""Every training mode trains end to end on the FAISS families beyond IVFPQ: HNSW-PQ, OPQ
in front of IVFPQ, and 4-bit fast-scan IVFPQ, through incremental and full refreshes."""

import pathlib

import numpy as np
import pytest

from qdr_jax.data.loader import load_dataset
from qdr_jax.index.layout import describe_index
from qdr_jax.quant import stored_codes
from qdr_jax.targets.encoders import embed_passages, load_encoders
from qdr_jax.targets.table import build_or_load_table
from qdr_jax.train.loop import train
from qdr_jax.train.modes import get_mode

FACTORIES = ["HNSW16,PQ4x8", "OPQ4,IVF8,PQ4x8", "IVF8,PQ4x4fs"]
MODES = ["dback", "dback_no_ste", "query_only"]


@pytest.fixture(scope="module")
def inputs(tiny_beir, tiny_encoder_dir, tmp_path_factory):
  from conftest import make_tiny_config
  config = make_tiny_config(tiny_beir, tiny_encoder_dir, tmp_path_factory.mktemp("cache"))
  dataset = load_dataset(config.data)
  encoders = load_encoders(config.model)
  table0 = build_or_load_table(config, dataset.corpus, pathlib.Path(config.table.cache_dir),
                               embed_passages(encoders, config))
  return config, dataset, encoders, np.asarray(table0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("factory", FACTORIES)
def test_mode_trains_on_index_family(inputs, tmp_path, factory, mode):
  base, dataset, encoders, table0 = inputs
  config = base.copy_and_resolve_references()
  config.train.mode = mode
  config.train.steps = 8
  config.index.factory = factory
  config.index.rebuild_every = 2
  config.index.full_rebuild_every = 4  # steps 2 and 6 incremental, step 4 full
  config.quant.codes = "index"  # the live forward ('recompute') has its own test below
  config.lock()
  result = train(config, get_mode(mode), dataset, encoders, table0, tmp_path)
  assert result.step == 8 and not result.preempted
  kinds = [r.kind for r in result.lifecycle.history]
  index = result.lifecycle.index
  assert describe_index(index)["ntotal"] == len(dataset.corpus)
  if mode == "query_only":
    # The table never moves: the scheduled refreshes would rebuild the same index.
    assert kinds == ["full", "skipped", "skipped", "skipped"]
    return
  assert kinds == ["full", "incremental", "full", "incremental"]
  table = result.lifecycle.table_to_lead(result.state.table)
  moved = np.abs(table - table0).max(axis=1) > 0
  assert moved.sum() > 50
  if mode == "dback":
    # The loss decoded what the index stores: the devices' codes are FAISS's codes.
    codes, lists = stored_codes(index)
    device = result.lifecycle.loss_inputs.codes
    np.testing.assert_array_equal(np.asarray(device["codes"])[:len(table)], codes)
    np.testing.assert_array_equal(np.asarray(device["lists"])[:len(table)], lists)


@pytest.mark.parametrize("factory", FACTORIES)
def test_live_forward_trains_on_index_family(inputs, tmp_path, factory):
  """quant.codes='recompute' (the default): the pool's codes are encoded on the device
  every step from the current rows, with no stored codes on the devices."""
  base, dataset, encoders, table0 = inputs
  config = base.copy_and_resolve_references()
  config.train.steps = 4
  config.index.factory = factory
  config.index.rebuild_every = 2
  config.lock()
  assert config.quant.codes == "recompute"
  result = train(config, get_mode("dback"), dataset, encoders, table0, tmp_path)
  assert result.step == 4 and result.lifecycle.loss_inputs.codes is None
  table = result.lifecycle.table_to_lead(result.state.table)
  assert (np.abs(table - table0).max(axis=1) > 0).sum() > 50
