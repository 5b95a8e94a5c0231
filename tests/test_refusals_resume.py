"""Refusals: a corpus or encoder changed since training, a config changed on resume, a
state structure that differs from the checkpoint's; and what resume may change."""

import gzip
import json
import pathlib
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from checkpoint_worker import DIM, NUM_ROWS, metadata
from conftest import make_tiny_config
from qdr_jax import experiment, sharding
from qdr_jax.config import base_config
from qdr_jax.data.loader import load_dataset
from qdr_jax.data.types import Corpus
from qdr_jax.fingerprint import FingerprintMismatchError, file_fingerprint, params_fingerprint
from qdr_jax.serving import export_bundle, load_bundle
from qdr_jax.targets.table import table_cache_key
from qdr_jax.train import checkpoint, optim
from qdr_jax.train.checkpoint import Checkpointer, checkpoint_dir
from qdr_jax.train.resume import MetadataMismatchError, validate_metadata
from qdr_jax.train.modes import get_mode
from qdr_jax.train.state import init_state

STEPS = 4


def _config(root, encoder_dir, cache_dir, **changes):
  c = make_tiny_config(root, encoder_dir, cache_dir)
  c.data.eval_split = "train"
  c.data.dev_split, c.data.dev_queries = "dev", 16
  c.train.steps = STEPS
  c.index.rebuild_every = 4
  c.checkpoint.every = 4
  for key, value in changes.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


@pytest.fixture(scope="module")
def base(tiny_beir, tiny_encoder_dir, tmp_path_factory):
  """A 4-step run with one checkpoint, on a private copy of the tiny data (which the
  reordering test edits in place)."""
  root = tmp_path_factory.mktemp("refusals")
  data = root / "data"
  shutil.copytree(tiny_beir, data)
  config = _config(data, tiny_encoder_dir, root / "cache")
  workdir = root / "run"
  results = experiment.train_and_evaluate(config, workdir)
  meta = Checkpointer(checkpoint_dir(workdir), read_only=True).read_metadata()
  return {"root": root, "data": data, "workdir": workdir, "results": results, "meta": meta,
          "encoder": tiny_encoder_dir}


def _snapshot(directory: pathlib.Path) -> dict:
  """Every file under ``directory`` with its size and modification time."""
  return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in directory.rglob("*") if p.is_file()}


def _copy_run(base, tmp_path) -> pathlib.Path:
  workdir = tmp_path / "run"
  shutil.copytree(base["workdir"], workdir)
  return workdir


def test_results_record_config_and_fingerprints(base):
  saved = json.loads((base["workdir"] / "results.json").read_text())
  assert saved["config"]["train"]["steps"] == STEPS
  assert saved["config"]["index"]["factory"] == "IVF4,PQ4x8"
  corpus = load_dataset(ml_collections.ConfigDict(saved["config"]["data"])).corpus
  assert saved["input_fingerprints"] == base["meta"]["input_fingerprints"]
  assert saved["input_fingerprints"]["corpus"] == corpus.fingerprint()
  assert len(saved["input_fingerprints"]["encoder"]) == 32


@pytest.fixture
def reordered(base):
  """corpus.jsonl.gz with its lines reversed (same ids, same count), restored afterwards."""
  path = base["data"] / "corpus.jsonl.gz"
  original = path.read_bytes()
  with gzip.open(path, "rt") as f:
    lines = f.readlines()
  with gzip.open(path, "wt") as f:
    f.writelines(lines[::-1])
  yield path
  path.write_bytes(original)


@pytest.mark.parametrize("consumer", ["resume", "evaluate_checkpoint", "export"])
def test_reordered_corpus_is_refused(base, reordered, consumer, tmp_path):
  config = _config(base["data"], base["encoder"], base["root"] / "cache", **{
      "train.steps": 2 * STEPS})
  new = load_dataset(config.data).corpus.fingerprint()
  old = base["meta"]["input_fingerprints"]["corpus"]
  assert new != old
  workdir = _copy_run(base, tmp_path) if consumer == "resume" else base["workdir"]
  before = _snapshot(workdir)
  with pytest.raises(MetadataMismatchError) as error:
    if consumer == "resume":
      experiment.train_and_evaluate(config, workdir)
    elif consumer == "evaluate_checkpoint":
      experiment.evaluate_checkpoint(workdir, out=tmp_path / "eval.json")
    else:
      export_bundle(workdir, tmp_path / "bundle")
  message = str(error.value)
  assert f"corpus {reordered} changed" in message
  assert old in message and new in message
  assert _snapshot(workdir) == before  # nothing written, nothing moved
  assert [p.name for p in tmp_path.iterdir() if p.name != "run"] == []


@pytest.mark.parametrize("key,value", [
    ("train.batch_size", 4), ("optim.encoder_lr", 1e-3), ("index.factory", "IVF4,PQ8x8"),
    ("table.dtype", "bfloat16"), ("optim.row_optimizer", "sgd")])
def test_resume_refuses_changed_settings(base, tmp_path, key, value):
  workdir = _copy_run(base, tmp_path)
  config = _config(base["data"], base["encoder"], base["root"] / "cache",
                   **{"train.steps": 2 * STEPS, key: value})
  old = base["meta"]["config"][key.split(".")[0]][key.split(".")[1]]
  before = _snapshot(workdir)
  with pytest.raises(MetadataMismatchError,
                     match=rf"{key}: checkpoint has {old!r}, config has {value!r}"):
    experiment.train_and_evaluate(config, workdir)
  assert _snapshot(workdir) == before
  assert not (checkpoint_dir(workdir) / checkpoint.CORRUPT_SUBDIR).exists()


def test_loop_refuses_a_changed_row_optimizer_and_keeps_the_checkpoint(base, tmp_path,
                                                                       monkeypatch):
  # Without the early check the loop's own resume check refuses, before any restore.
  monkeypatch.setattr(experiment, "check_resumable", lambda *a, **k: None)
  workdir = _copy_run(base, tmp_path)
  config = _config(base["data"], base["encoder"], base["root"] / "cache",
                   **{"optim.row_optimizer": "sgd"})
  with pytest.raises(MetadataMismatchError, match="optim.row_optimizer: checkpoint has "
                     "'adam', config has 'sgd'"):
    experiment.train_and_evaluate(config, workdir)
  assert Checkpointer(checkpoint_dir(workdir), read_only=True).all_steps() == [STEPS]
  assert not (checkpoint_dir(workdir) / checkpoint.CORRUPT_SUBDIR).exists()


@pytest.mark.parametrize("changes", [
    {"train.steps": STEPS + 2},
    {"train.steps": STEPS + 2, "eval.every": 1, "checkpoint.keep": 3, "train.log_every": 2}])
def test_resume_allows_steps_eval_logging_retention(base, tmp_path, changes):
  workdir = _copy_run(base, tmp_path)
  config = _config(base["data"], base["encoder"], base["root"] / "cache", **changes)
  results = experiment.train_and_evaluate(config, workdir)
  assert results["steps"] == STEPS + 2
  assert results["config"]["train"]["steps"] == STEPS + 2
  assert results["input_fingerprints"] == base["meta"]["input_fingerprints"]
  steps = Checkpointer(checkpoint_dir(workdir), read_only=True).all_steps()
  assert steps[-1] == STEPS + 2 and STEPS in steps


def _state(**changes):
  """The checkpoint worker's 10-row dback state, with config changes."""
  config = base_config()
  for key, value in changes.items():
    section, name = key.split(".")
    config[section][name] = value
  mesh = sharding.make_mesh(config.sharding)
  rng = np.random.default_rng(0)
  params = {"dense": {"kernel": rng.normal(size=(DIM, DIM)).astype(np.float32)}}
  table = rng.normal(size=(NUM_ROWS, DIM)).astype(np.float32)
  encoder_tx, _ = optim.make_encoder_optimizer(config.optim, 10)
  state = init_state(config, get_mode("dback"), params, table, None, mesh, encoder_tx,
                     optim.make_row_transform(config.optim), None)
  return config, state


@pytest.mark.parametrize("key,value,expected", [
    ("table.dtype", "bfloat16", r"table: checkpoint has float32\(10, 4\), config builds "
                                r"bfloat16\(10, 4\)"),
    ("optim.row_optimizer", "sgd", r"row_opt_state\S*: in the checkpoint, absent")])
def test_structure_mismatch_is_not_corruption(tmp_path, key, value, expected):
  config, state = _state()
  writer = Checkpointer(tmp_path, keep=3)
  writer.save(state, metadata(config, state, 1))
  writer.wait_until_finished()
  _, other = _state(**{key: value})
  with pytest.raises(MetadataMismatchError, match=expected):
    writer.restore(other)  # "the latest": would fall back and set aside if corrupt
  assert writer.all_steps() == [1]
  assert not (tmp_path / checkpoint.CORRUPT_SUBDIR).exists()
  assert writer.restore(state).step == 1  # and the right structure still restores
  writer.close()


def test_changed_encoder_weights_are_named():
  config = make_tiny_config(pathlib.Path("/data/tiny"), "/models/enc", "/tmp/cache")
  saved = {"step": 3, "model": "/models/enc", "table_dim": 32, "corpus_size": 600,
           "input_fingerprints": {"corpus": "c0", "encoder": "e0"},
           "config": json.loads(config.to_json_best_effort())}
  validate_metadata(saved, config, 600, 32, inputs={"corpus": "c0", "encoder": "e0"},
                    resume=True)
  with pytest.raises(MetadataMismatchError, match="encoder /models/enc changed since the "
                     "checkpoint of step 3 was written: .* fingerprint e0, the file now has e1"):
    validate_metadata(saved, config, 600, 32, inputs={"corpus": "c0", "encoder": "e1"})


def test_params_fingerprint_is_order_free_and_sees_one_bit():
  a = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "y": {"z": np.ones(3, np.int32)}}
  b = {"y": {"z": np.ones(3, np.int32)}, "x": jax.numpy.asarray(a["x"])}
  assert params_fingerprint(a) == params_fingerprint(b)
  flipped = a["x"].copy()
  flipped.view(np.uint32)[1, 2] ^= 1
  assert params_fingerprint({**a, "x": flipped}) != params_fingerprint(a)
  assert params_fingerprint({**a, "x": a["x"].reshape(3, 2)}) != params_fingerprint(a)


def test_load_bundle_refuses_edited_ids(base, tmp_path):
  bundle = export_bundle(base["workdir"], tmp_path / "bundle")
  manifest = json.loads((bundle / "bundle.json").read_text())
  assert manifest["source"]["input_fingerprints"] == base["meta"]["input_fingerprints"]
  assert load_bundle(bundle).ids[:2] == ["d0", "d1"]  # untouched: every fingerprint agrees
  ids_path = bundle / "ids.json"
  ids = json.loads(ids_path.read_text())
  ids[0], ids[1] = ids[1], ids[0]  # same ids, same size: rows mapped to the wrong passages
  ids_path.write_text(json.dumps(ids))
  with pytest.raises(FingerprintMismatchError, match=rf"{ids_path}: .*bundle.json records "
                     rf"fingerprint {manifest['fingerprints']['ids.json']}, the file now has "
                     rf"{file_fingerprint(ids_path)}\)$"):
    load_bundle(bundle)


def test_table_cache_key_sees_replaced_encoder_weights(tiny_encoder_dir, tmp_path):
  encoder = tmp_path / "encoder"
  shutil.copytree(tiny_encoder_dir, encoder)
  model = make_tiny_config(pathlib.Path("/data/tiny"), str(encoder), tmp_path).model
  corpus = Corpus(["a", "b"], ["", ""], ["x", "y"])
  before = table_cache_key(model, corpus)
  assert table_cache_key(model, corpus) == before
  weights = encoder / "model.safetensors"
  raw = bytearray(weights.read_bytes())
  raw[-1] ^= 1  # other weights, same path and size
  weights.write_bytes(bytes(raw))
  assert table_cache_key(model, corpus) != before


@pytest.fixture(scope="module")
def bundle_with_passages(base, tmp_path_factory):
  return export_bundle(base["workdir"], tmp_path_factory.mktemp("bundles") / "b",
                       store_passages=True)


def _damaged_copy(bundle, tmp_path, name, damage):
  copy = tmp_path / "bundle"
  shutil.copytree(bundle, copy)
  path = copy / name
  damage(path)
  return copy, path


def _reorder_lines(path):
  lines = path.read_text().splitlines(keepends=True)
  path.write_text("".join(lines[1:] + lines[:1]))


def _truncate(path):
  path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


@pytest.mark.parametrize("name,damage", [("passages.jsonl", _reorder_lines),
                                         ("passages.jsonl", _truncate),
                                         ("index.faiss", _truncate),
                                         ("index.faiss", lambda p: p.write_bytes(b"")),
                                         ("ids.json", _truncate)])
def test_damaged_bundle_file_is_refused_before_it_is_read(bundle_with_passages, tmp_path,
                                                          monkeypatch, name, damage):
  bundle, path = _damaged_copy(bundle_with_passages, tmp_path, name, damage)

  def never(*args, **kwargs):
    raise AssertionError("a file was parsed before its fingerprint was checked")

  monkeypatch.setattr("qdr_jax.serving.load_index", never)
  monkeypatch.setattr("qdr_jax.serving.load_encoder", never)
  with pytest.raises(FingerprintMismatchError) as error:
    load_bundle(bundle)
  message = str(error.value)
  assert "\n" not in message and f"{path}: " in message


def test_bundle_passages_are_looked_up_by_id(bundle_with_passages, tmp_path):
  loaded = load_bundle(bundle_with_passages)
  assert set(loaded.passages) == set(loaded.ids)
  queries = ["w1 w2 w3", "w10 w20"]
  hits = loaded.search(queries, k=5)
  for query_hits in hits:
    for hit in query_hits:
      assert hit["text"] == loaded.passages[hit["id"]]["text"]
  # An older bundle (no fingerprint of passages.jsonl) with its lines reordered still
  # shows each id's own passage.
  copy = tmp_path / "old"
  shutil.copytree(bundle_with_passages, copy)
  manifest = json.loads((copy / "bundle.json").read_text())
  del manifest["fingerprints"]["passages.jsonl"]
  (copy / "bundle.json").write_text(json.dumps(manifest))
  _reorder_lines(copy / "passages.jsonl")
  assert load_bundle(copy).search(queries, k=5) == hits
