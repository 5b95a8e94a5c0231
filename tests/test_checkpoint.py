"""Checkpoints: exact resume, crash and corruption safety, evaluation, export and search."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import faiss
import jax
import numpy as np
import pytest

from checkpoint_worker import NUM_ROWS, make_state, metadata
from conftest import make_tiny_config
from qdr_jax.experiment import evaluate_checkpoint
from qdr_jax.train.restore import restore_trained
from qdr_jax.models import load_encoder
from qdr_jax.serving import export_bundle, load_bundle
from qdr_jax import experiment
from qdr_jax.negatives import source as negatives
from qdr_jax.train.checkpoint import (Checkpointer, CheckpointError, CorruptCheckpointWarning,
                                      checkpoint_dir)
from qdr_jax.train.resume import MetadataMismatchError

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS, STOP_AT = 8, 6  # the stop falls between saves (every 4) and index rebuilds (every 4)


def _config(tiny_beir, tiny_encoder_dir, cache_dir):
  c = make_tiny_config(tiny_beir, tiny_encoder_dir, cache_dir)
  c.data.eval_split = "train"  # the random tiny encoder only learns what it trains on
  c.data.dev_split, c.data.dev_queries = "dev", 16  # what in-loop evaluation selects on
  c.train.steps = STEPS
  c.index.rebuild_every = 4
  c.checkpoint.every = 4
  c.eval.every = 4
  return c


@pytest.fixture(scope="module")
def runs(tiny_beir, tiny_encoder_dir, tmp_path_factory):
  """One uninterrupted run, one stopped by SIGTERM at STOP_AT and resumed, and one
  stopped by SIGINT (Ctrl-C) there and resumed."""
  root = tmp_path_factory.mktemp("runs")
  config = _config(tiny_beir, tiny_encoder_dir, root / "cache")
  straight = experiment.train_and_evaluate(config, root / "straight")
  stopped = _stopped_at(signal.SIGTERM, STOP_AT, config, root / "resumed")
  resumed = experiment.train_and_evaluate(config, root / "resumed")
  interrupted = _stopped_at(signal.SIGINT, STOP_AT, config, root / "interrupted")
  resumed_after_ctrl_c = experiment.train_and_evaluate(config, root / "interrupted")
  return {"config": config, "root": root, "straight": straight, "stopped": stopped,
          "resumed": resumed, "interrupted": interrupted,
          "resumed_after_ctrl_c": resumed_after_ctrl_c}


def _stopped_at(signum, stop_at: int, config, workdir):
  """``train_and_evaluate`` sent ``signum`` so that it stops after step ``stop_at``."""
  real_batch_indices = negatives.batch_indices

  def signal_during(step, *args, **kwargs):
    if step == stop_at:
      # The loop prepares a step's batch at the end of the step before it (with
      # negatives.overlap, before that step's update), so the signal arrives during step
      # stop_at - 1 (0-based) and the save after it holds stop_at.
      os.kill(os.getpid(), signum)
    return real_batch_indices(step, *args, **kwargs)

  previous = signal.getsignal(signum)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(negatives, "batch_indices", signal_during)
    stopped = experiment.train_and_evaluate(config, workdir)
  assert signal.getsignal(signum) is previous  # the loop's handler is gone
  return stopped


def _records(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_resume_is_exact(runs):
  root = runs["root"]
  assert runs["stopped"] == {"preempted": True, "step": STOP_AT}
  for when in ("before", "after"):
    assert runs["resumed"][when] == runs["straight"][when]
  saved = [json.loads((root / w / "results.json").read_text()) for w in ("straight", "resumed")]
  assert saved[0]["after"] == saved[1]["after"] and saved[0]["before"] == saved[1]["before"]
  straight, resumed = _records(root / "straight"), _records(root / "resumed")
  assert [r["step"] for r in resumed] == [r["step"] for r in straight]
  for a, b in zip(straight, resumed):
    for key in ("loss", "pool_accuracy", "encoder_grad_norm", "row_grad_norm", "eval_quantized"):
      assert a.get(key) == b.get(key), (a["step"], key)
  # Bitwise equal final states, restored from each run's last checkpoint.
  states = []
  for w in ("straight", "resumed"):
    ckpt = Checkpointer(checkpoint_dir(root / w), read_only=True)
    assert ckpt.latest_step() == STEPS
    states.append(restore_trained(root / w)["params"])
    states.append(restore_trained(root / w)["table"])
  jax.tree.map(np.testing.assert_array_equal, states[0], states[2])
  np.testing.assert_array_equal(states[1], states[3])
  ckpt = Checkpointer(checkpoint_dir(root / "straight"), read_only=True)
  assert ckpt.all_steps() == [4, 8]
  meta = ckpt.read_metadata()
  assert meta["step"] == STEPS and meta["corpus_size"] == 600 and meta["table_dim"] == 32
  assert meta["config"]["train"]["steps"] == STEPS and meta["dataset"] == "tiny"


def test_ctrl_c_saves_and_resumes_exactly(runs):
  root = runs["root"]
  assert runs["interrupted"] == {"preempted": True, "step": STOP_AT}
  for when in ("before", "after"):
    assert runs["resumed_after_ctrl_c"][when] == runs["straight"][when]
  straight, resumed = _records(root / "straight"), _records(root / "interrupted")
  assert [r["step"] for r in resumed] == [r["step"] for r in straight]
  for a, b in zip(straight, resumed):
    for key in ("loss", "pool_accuracy", "eval_quantized"):
      assert a.get(key) == b.get(key), (a["step"], key)
  for field in ("params", "table"):
    jax.tree.map(np.testing.assert_array_equal, restore_trained(root / "straight")[field],
                 restore_trained(root / "interrupted")[field])


def test_keeps_the_latest_and_the_best(tmp_path):
  config, state = make_state(1)
  ckpt = Checkpointer(tmp_path, keep=2, keep_best=1, best_metric="nDCG@10")
  scores = {1: 0.2, 2: 0.5, 3: 0.1, 4: None, 5: 0.3}
  for step, score in scores.items():
    ckpt.save(state, metadata(config, state, step),
              metrics=None if score is None else {"nDCG@10": score, "R@10": 1.0})
  ckpt.wait_until_finished()
  assert ckpt.all_steps() == [2, 4, 5] and ckpt.best_step() == 2
  assert not ckpt.save(state, metadata(config, state, 5))  # already saved
  ckpt.close()


# A read that fails on damaged files leaves tensorstore callbacks aimed at Orbax's
# finished event loop; they are dropped with "Event loop is closed".
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_sigkill_mid_save_and_corruption_fall_back(tmp_path):
  directory = tmp_path / "ckpt"
  config, state = make_state(1, seed=3)
  ckpt = Checkpointer(directory, keep=5)
  ckpt.save(state, metadata(config, state, 3))
  ckpt.close()
  # A 4-device process restores it (other padding), saves step 4, is killed saving 5.
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(
      [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=4"]))
  worker = subprocess.Popen([sys.executable, str(REPO / "tests" / "checkpoint_worker.py"),
                             str(directory)], env=env, stdout=subprocess.PIPE, text=True)
  lines = []
  for line in worker.stdout:
    lines.append(line.strip())
    if line.startswith("BLOCKED"):
      break
  worker.send_signal(signal.SIGKILL)
  worker.wait(timeout=30)
  assert lines == ["RESTORED 3 4", "SAVED 4", "BLOCKED"], lines
  assert any(".orbax-checkpoint-tmp" in p.name for p in directory.iterdir())

  reader = Checkpointer(directory, read_only=True)
  assert reader.all_steps() == [3, 4]
  restored = reader.restore(state)  # back on 1 device: 12 padded rows -> 10
  assert restored.step == 4 and restored.state.table.shape == state.table.shape
  _, expected = make_state(1, seed=4)
  np.testing.assert_array_equal(restored.state.table, expected.table)

  # A flipped byte in each of step 4's data files: a clear error for that step...
  data = [p for p in (directory / "4" / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
  for p in data:
    _flip_byte(p)
  with pytest.raises(CheckpointError, match=r"checkpoint .*/4: .*DATA_LOSS"):
    reader.restore(state, step=4)
  # ... and "the latest" falls back to step 3 with a warning.
  with pytest.warns(CorruptCheckpointWarning, match="falling back to step 3"):
    assert reader.restore(state).step == 3
  # Truncated files are reported too; a writable manager moves the step aside.
  for p in data:
    p.write_bytes(p.read_bytes()[:p.stat().st_size // 2])
  with pytest.raises(CheckpointError, match="checkpoint .*/4"):
    reader.restore(state, step=4)
  reader.close()
  writer = Checkpointer(directory, keep=5)
  with pytest.warns(CorruptCheckpointWarning, match="moved to .*corrupt"):
    assert writer.restore(state).step == 3
  assert writer.all_steps() == [3]
  writer.close()


def _flip_byte(path: pathlib.Path) -> None:
  raw = bytearray(path.read_bytes())
  raw[len(raw) // 2] ^= 0x01
  path.write_bytes(bytes(raw))


def test_flipped_array_byte_fails_the_fingerprint(runs, tmp_path):
  # Small arrays live in checksummed OCDBT nodes (DATA_LOSS above); large chunks do not.
  src = checkpoint_dir(runs["root"] / "straight") / str(STEPS)
  copy = checkpoint_dir(tmp_path) / str(STEPS)
  shutil.copytree(src, copy)
  # Arrays are stored uncompressed (the Checkpointer's default): flip a bit of the table's
  # row 3 where its bytes lie.
  row = np.asarray(restore_trained(runs["root"] / "straight", step=STEPS)["table"][3],
                   np.float32).tobytes()
  hits = [(p, p.read_bytes().find(row)) for p in (copy / "state").rglob("*") if p.is_file()]
  path, at = next((p, at) for p, at in hits if at >= 0)
  raw = bytearray(path.read_bytes())
  raw[at + 5] ^= 0x01
  path.write_bytes(bytes(raw))
  with pytest.raises(CheckpointError, match=r"array '\S+' does not match its fingerprint"):
    restore_trained(tmp_path, step=STEPS)


def test_export_round_trip_and_search(runs, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  workdir = runs["root"] / "straight"
  bundle_dir = export_bundle(workdir, tmp_path / "bundle", store_passages=True)
  manifest = json.loads((bundle_dir / "bundle.json").read_text())
  assert manifest["model"]["pooling"] == "mean" and manifest["model"]["normalize"]
  assert manifest["index"]["factory"] == "IVF4,PQ4x8" and manifest["index"]["ntotal"] == 600

  trained = restore_trained(workdir)
  texts = ["w1 w2 w3 w4", "w10 w200 w399", "w7"]
  # Our Flax loader: the same params, so the same vectors.
  module, params = load_encoder(str(bundle_dir / "query_encoder"))
  jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(trained["params"]))
  bundle = load_bundle(bundle_dir)
  ours = bundle.embed(texts)
  direct = np.asarray(trained["encoders"].query_module.apply(
      {"params": trained["params"]}, *_tokens(bundle.tokenizer, texts)))
  np.testing.assert_allclose(ours, direct, atol=1e-6)
  # transformers' PyTorch BertModel, mean pooled and normalized by hand.
  hf_dir = str(bundle_dir / "query_encoder")
  tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
  model = transformers.AutoModel.from_pretrained(hf_dir).eval()
  batch = tok(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
  with torch.no_grad():
    hidden = model(**batch).last_hidden_state
  mask = batch["attention_mask"].unsqueeze(-1).float()
  pooled = (hidden * mask).sum(1) / mask.sum(1)
  pooled = torch.nn.functional.normalize(pooled, dim=-1).numpy()
  np.testing.assert_allclose(pooled, ours, atol=1e-4)

  # Training queries find their positive passage.
  split = trained["dataset"].split("train")
  corpus = trained["dataset"].corpus
  queries = list(split.queries.texts)
  positives = [set(split.positives(q)) & set(corpus.ids) for q in split.queries.ids]
  hits = bundle.search(queries, k=10)
  found = [i for i, h in enumerate(hits) if positives[i] & {x["id"] for x in h}]
  # One positive per query: the hit rate is the evaluation's R@10 on the same index build.
  assert len(found) / len(queries) == pytest.approx(
      runs["straight"]["after"]["quantized"]["R@10"], abs=2 / len(queries))
  assert found, "no training query finds its positive"
  q = found[0]
  out = subprocess.run(
      [sys.executable, str(REPO / "experiments" / "search.py"), f"--bundle={bundle_dir}",
       "--k=10", queries[q]], capture_output=True, text=True, check=True,
      env=dict(os.environ, JAX_PLATFORMS="cpu")).stdout
  rows = [line.split("\t") for line in out.splitlines() if not line.startswith("#")]
  assert [r[2] for r in rows] == [h["id"] for h in hits[q]]
  assert positives[q] & {r[2] for r in rows}
  assert rows[0][5] == corpus.texts[corpus.row_of[rows[0][2]]][:120]  # passages.jsonl


def _tokens(tokenizer, texts):
  from qdr_jax.models import tokenize  # pylint: disable=g-import-not-at-top
  t = tokenize(tokenizer, texts, 16)
  return t["input_ids"], t["attention_mask"], t["token_type_ids"]


def test_evaluate_checkpoint_matches_training_and_refuses_other_configs(runs, tmp_path):
  workdir = runs["root"] / "straight"
  results, table = evaluate_checkpoint(workdir, out=tmp_path / "eval.json")
  assert results["step"] == STEPS and "flat" in table
  assert results["flat"] == runs["straight"]["after"]["flat"]
  assert results["quantized"] == runs["straight"]["after"]["quantized"]
  assert json.loads((tmp_path / "eval.json").read_text())["step"] == STEPS

  other = _config(pathlib.Path(runs["config"].data.root), runs["config"].model.query_encoder,
                  tmp_path / "cache")
  other.data.max_passages = 300
  with pytest.raises(MetadataMismatchError, match="corpus_size: checkpoint has 600, config "
                     "has 300"):
    evaluate_checkpoint(workdir, config=other)
  other.data.max_passages = 0
  other.model.query_encoder = "all-MiniLM-L6-v2"
  with pytest.raises(MetadataMismatchError, match=r"model: .*'all-MiniLM-L6-v2'.*dim: "
                     r"checkpoint has 32, config has 384"):
    evaluate_checkpoint(workdir, config=other)
  with pytest.raises(CheckpointError, match="no checkpoint for step 5"):
    evaluate_checkpoint(workdir, step=5)
  assert NUM_ROWS == 10  # the worker's state is what test (b) padded across devices


def test_restore_budget_below_a_shard_is_raised_to_it(tmp_path):
  """A restore stages at most restore_buffer_bytes at once, but never refuses a shard
  larger than that; the abstract target (no initial arrays) restores the same state."""
  config, state = make_state(1, seed=5)
  with Checkpointer(tmp_path, keep=1, async_save=False) as writer:
    writer.save(state, metadata(config, state, 2))
  shard_bytes = state.table.size * state.table.dtype.itemsize  # one device: whole table
  reader = Checkpointer(tmp_path, read_only=True, restore_buffer_bytes=shard_bytes // 4)
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  restored = reader.restore(abstract)
  assert restored.step == 2
  for want, got in zip(jax.tree.leaves(state), jax.tree.leaves(restored.state)):
    if jax.dtypes.issubdtype(want.dtype, jax.dtypes.prng_key):
      want, got = jax.random.key_data(want), jax.random.key_data(got)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.fixture(scope="module")
def refresh_runs(tiny_beir, tiny_encoder_dir, tmp_path_factory):
  """6 steps with incremental refreshes after steps 2 and 4, uninterrupted and stopped by
  SIGTERM after step 3 then resumed; exact search, then overlapped search."""
  root = tmp_path_factory.mktemp("refresh_runs")
  out = {}
  for overlap in (False, True):
    config = _config(tiny_beir, tiny_encoder_dir, root / "cache")
    config.train.steps, config.checkpoint.every, config.eval.every = 6, 3, 0
    config.index.rebuild_every, config.index.full_rebuild_every = 2, 6
    config.negatives.overlap = overlap
    name = "overlap" if overlap else "exact"
    out[name] = experiment.train_and_evaluate(config, root / f"{name}_straight")
    assert _stopped_at(signal.SIGTERM, 3, config, root / f"{name}_resumed") == {
        "preempted": True, "step": 3}
    out[f"{name}_resumed"] = experiment.train_and_evaluate(config, root / f"{name}_resumed")
  return root, out


def _saved_index(workdir, step):
  """The checkpoint of ``step`` with its index and moved rows (and its step counter)."""
  return Checkpointer(checkpoint_dir(workdir), read_only=True).restore_arrays(
      {"step": jax.ShapeDtypeStruct((), np.int32)}, step=step, with_index=True)


def test_resume_between_incremental_refreshes_is_exact(refresh_runs):
  """The rows moved since the last refresh are saved with the index: the resumed run's
  incremental refresh re-adds only those, as the uninterrupted run's does (re-adding
  every row would reorder the IVF lists, and search ties with them)."""
  root, out = refresh_runs
  assert out["exact_resumed"]["after"] == out["exact"]["after"]
  straight, resumed = _records(root / "exact_straight"), _records(root / "exact_resumed")
  assert [r["step"] for r in resumed] == list(range(1, 7))
  for a, b in zip(straight, resumed):
    for key in ("loss", "pool_accuracy", "encoder_grad_norm", "row_grad_norm"):
      assert a[key] == b[key], (a["step"], key)
  # The index the loop searched at the end, list order included, is the same bytes.
  final = [_saved_index(root / f"exact_{w}", 6) for w in ("straight", "resumed")]
  np.testing.assert_array_equal(faiss.serialize_index(final[0].index),
                                faiss.serialize_index(final[1].index))
  np.testing.assert_array_equal(final[0].changed_rows, final[1].changed_rows)
  at_stop = _saved_index(root / "exact_resumed", 3)
  assert 0 < at_stop.changed_rows.sum() < 600  # moved after the refresh at step 2


def test_resume_with_overlapped_search_differs_from_the_first_resumed_step(refresh_runs):
  """negatives.overlap=True encodes a step's batch before the previous update, with the
  parameters one update older; the resumed run encodes its first batch with the restored
  ones, so it is the same recipe but not the same numbers (docs/scaling.md)."""
  root, out = refresh_runs
  straight, resumed = _records(root / "overlap_straight"), _records(root / "overlap_resumed")
  assert [r["step"] for r in resumed] == list(range(1, 7))
  assert [r["loss"] for r in resumed[:3]] == [r["loss"] for r in straight[:3]]
  assert resumed[3]["loss"] != straight[3]["loss"]
  np.testing.assert_allclose([r["loss"] for r in resumed[3:]],
                             [r["loss"] for r in straight[3:]], rtol=0.05)



_FINGERPRINT_SCRIPT = """
import jax
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from qdr_jax.train import resume

rng = np.random.default_rng(0)
arrays = {
    "f32": rng.standard_normal((3001, 24)).astype(np.float32),
    "bf16": rng.standard_normal((1000, 8)).astype(ml_dtypes.bfloat16),
    "int3d": rng.integers(-2**31, 2**31 - 1, (8, 5, 3), dtype=np.int64).astype(np.int32),
    "count": rng.integers(0, 300, (1000,)).astype(np.int32),
    "flag": rng.random((16, 3)) > 0.5,
    "scalar": np.float32(3.5),
}

def expected(x):
  x = np.asarray(x)
  bits = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize])
  weights = 2 * np.arange(bits.size, dtype=np.uint64) + 1  # uint64 wraps mod 2**64
  return int((bits.reshape(-1).astype(np.uint64) * weights).sum() % 2**32)

want = {name: expected(x) for name, x in arrays.items()}
assert resume.fingerprints(arrays) == want  # small leaves: one program over all
padded = np.concatenate([arrays["f32"], np.zeros((7, 24), np.float32)])
assert resume.fingerprints({"f32": padded}) == {"f32": want["f32"]}
# Large leaves go shard by shard in row blocks (here every leaf, in blocks of 50 rows or
# fewer; the last block overlaps the one before): the same values, split over 4 devices by
# rows or replicated, and with zero padding.
resume._FINGERPRINT_ALONE_BYTES, resume._FINGERPRINT_BLOCK_ELEMENTS = 0, 1200
mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
split = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
placed = {name: split(x, P("data") if np.ndim(x) and len(x) % 4 == 0 else P())
          for name, x in arrays.items()}
assert resume.fingerprints(placed) == want, (resume.fingerprints(placed), want)
assert resume.fingerprints({"f32": split(padded[:3004], P("data"))}) == {"f32": want["f32"]}
print("ok")
"""


def test_array_fingerprints_are_the_weighted_sum_of_their_bits():
  # The definition, in numpy: sum of bits * (2 * flat_index + 1) mod 2**32, whatever the
  # leaf's dtype, rank, sharding or padding with zero rows.
  env = dict(os.environ, XLA_FLAGS=" ".join(
      [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=4"]))
  proc = subprocess.run([sys.executable, "-c", _FINGERPRINT_SCRIPT], capture_output=True,
                        text=True, timeout=300, env=env)
  assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
