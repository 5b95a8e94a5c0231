"""Data-parallel train steps on 8 simulated CPU devices equal the 1-device steps.

The device count (``XLA_FLAGS``) must be fixed before JAX starts, so the steps run in one
subprocess (``tests/scale_worker.py sharding``) that saves every run's final state; the
tests here compare those arrays. The worker itself checks, after every step, that the
table and its per-row optimizer state keep their ``P('data')`` row sharding, the params
and their optimizer state stay replicated (or split FSDP-style when asked) and the batch
(tokens and query embeddings) is split over ``data``.
"""

import json
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

WORKER = pathlib.Path(__file__).with_name("scale_worker.py")
STEPS, ENCODER_LR = 3, 1e-3


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out = tmp_path_factory.mktemp("sharding") / "runs.npz"
  proc = subprocess.run([sys.executable, str(WORKER), "sharding", str(out)],
                        capture_output=True, text=True, timeout=600,
                        cwd=WORKER.parent.parent)
  assert proc.returncode == 0, proc.stderr[-4000:]
  data = np.load(out)
  return {k: data[k] for k in data.files}


def _state(runs, scenario, devices):
  prefix = f"{scenario}/{devices}/"
  return {k[len(prefix):]: v for k, v in runs.items() if k.startswith(prefix)}


def _assert_same_state(a, b, *, table_atol=1e-5):
  assert a.keys() == b.keys()
  for name in a:
    if name.endswith("bytes_per_device"):
      continue
    if "['key']['bias']" in name:
      # Softmax is invariant to the key bias, so its true gradient is 0 and Adam turns
      # the float noise of either layout into steps of up to the learning rate.
      np.testing.assert_allclose(a[name], b[name], atol=2 * STEPS * ENCODER_LR, err_msg=name)
    elif name == "table":
      np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=table_atol, err_msg=name)
    elif name.startswith("rowstate"):
      # Adam's moments are the row gradients themselves (mu = 0.1 g after one step), and
      # those carry the encoder's reduction-order noise of either layout (~1e-4 relative).
      np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=table_atol, err_msg=name)
    elif name.startswith("params"):
      # Adam divides by the gradient's own scale, so where an entry's gradient is near 0
      # the reduction-order noise of the two layouts can move it by a fraction of the
      # learning rate: bound the worst entry by that, and the mean tightly.
      np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=0.1 * ENCODER_LR,
                                 err_msg=name)
      assert np.abs(a[name] - b[name]).mean() < 1e-6, name
    else:
      np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_shardings_preserved_after_every_step(runs):
  assert json.loads(str(runs["problems"])) == []


def test_eight_devices_match_one_device(runs):
  one, eight = _state(runs, "f32_512", 1), _state(runs, "f32_512", 8)
  _assert_same_state(one, eight)
  # The steps moved the state at all (the comparison is not vacuous).
  assert one["rowstate.count"].max() == STEPS
  # Each device holds an eighth of the table (512 rows x 32 x 4 bytes).
  assert int(eight["table_bytes_per_device"]) * 8 == int(one["table_bytes_per_device"])


def test_padded_table_matches_unpadded(runs):
  # 509 rows: 1 device keeps 509, 8 devices pad to 512 (64 a device); pooled rows reach
  # the last shard, next to the padding.
  one, eight = _state(runs, "f32_509", 1), _state(runs, "f32_509", 8)
  assert one["table"].shape == (509, 32)
  _assert_same_state(one, eight)
  assert one["rowstate.count"][-64:].max() > 0
  assert int(eight["table_bytes_per_device"]) == 64 * 32 * 4


def test_bfloat16_table_halves_memory_and_tracks_float32(runs):
  f32, bf16 = _state(runs, "f32_512", 8), _state(runs, "bf16_512", 8)
  assert int(bf16["table_bytes_per_device"]) * 2 == int(f32["table_bytes_per_device"])
  # The per-row Adam moments stay float32 whatever the table's storage.
  assert int(bf16["row_state_bytes_per_device"]) == int(f32["row_state_bytes_per_device"])
  assert np.isfinite(bf16["loss"])
  # bfloat16 keeps 8 bits of mantissa: rows within a few 1e-3 relative of float32.
  np.testing.assert_allclose(bf16["table"], f32["table"], rtol=2e-2, atol=2e-2)
  moved = np.abs(f32["table"] - np.random.default_rng(0).normal(size=(512, 32))).max()
  assert moved > 1e-2  # the rows did move by more than the tolerance
  np.testing.assert_allclose(bf16["loss"], f32["loss"], rtol=1e-2)
  for name in f32:
    if name.startswith("params") and "['key']['bias']" not in name:
      np.testing.assert_allclose(bf16[name], f32[name], atol=3e-3, err_msg=name)


def test_bfloat16_stochastic_rounding_is_layout_independent(runs):
  # The rounding bits depend on the key and step, not on the sharding: 8 devices round as
  # 1 does, except where the two layouts' float32 results (reduction-order noise) straddle
  # a rounding threshold, a step of one bfloat16 spacing (2^-7 relative) there.
  one, eight = _state(runs, "bf16_512", 1), _state(runs, "bf16_512", 8)
  same = one["table"] == eight["table"]
  assert same.mean() > 0.99, same.mean()
  np.testing.assert_allclose(one["table"], eight["table"], rtol=2 ** -7, atol=1e-6)
  assert one["rowstate.count"].max() == STEPS
  _assert_same_state({k: v for k, v in one.items() if k != "table"},
                     {k: v for k, v in eight.items() if k != "table"})


def test_bfloat16_master_rows_are_row_sharded_and_track_float32(runs):
  f32, master = _state(runs, "f32_512", 8), _state(runs, "bf16master_512", 8)
  # bfloat16 table (half the bytes) plus float32 master rows (the table's bytes again):
  # every row-state leaf kept its P('data') row sharding (test_shardings_preserved...).
  assert int(master["table_bytes_per_device"]) * 2 == int(f32["table_bytes_per_device"])
  assert (int(master["row_state_bytes_per_device"])
          == int(f32["row_state_bytes_per_device"]) + int(f32["table_bytes_per_device"]))
  # The table is the master rows rounded to nearest; the master rows follow the float32
  # run up to the loss seeing rounded rows (a few 1e-3 relative, as above).
  masters = master["rowstate.master"]
  np.testing.assert_array_equal(
      master["table"], masters.astype(jnp.bfloat16).astype(np.float32))
  np.testing.assert_allclose(masters, f32["table"], rtol=2e-2, atol=2e-2)
  assert master["rowstate.opt.count"].max() == STEPS


def test_fsdp_split_encoder_matches_replicated(runs):
  one, fsdp = _state(runs, "f32_512", 1), _state(runs, "fsdp_512", 8)
  _assert_same_state(one, fsdp)
  replicated = int(_state(runs, "f32_512", 8)["encoder_bytes_per_device"])
  # Most of the encoder's bytes are split 8 ways (odd-sized leaves stay whole).
  assert int(fsdp["encoder_bytes_per_device"]) < 0.3 * replicated
