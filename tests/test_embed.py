"""Corpus embedding: pipelined, sharded over processes, resumable, never half-cached."""

import concurrent.futures
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from qdr_jax.data.loader import load_dataset
from qdr_jax.models.tokenization import LENGTH_BUCKET, passage_inputs, tokenize
from qdr_jax.targets.embed import Batching, embed_corpus, embed_texts, partial_path
from qdr_jax.targets.encoders import embed_passages, load_encoders
from qdr_jax.targets.table import build_or_load_table

WORKER = pathlib.Path(__file__).with_name("embed_worker.py")
TIMEOUT_S = 360  # two xdist workers share the 2 cores with these jobs
CHUNK_ROWS = 128  # 600 passages: chunks of 128, 128, 128, 128, 88


@pytest.fixture(scope="module")
def setup(tiny_beir, tiny_encoder_dir, tmp_path_factory):
  from conftest import make_tiny_config
  config = make_tiny_config(tiny_beir, tiny_encoder_dir, tmp_path_factory.mktemp("cache"))
  config.table.embed_chunk_rows = CHUNK_ROWS
  corpus = load_dataset(config.data).corpus
  return config, corpus, load_encoders(config.model)


def _embed(setup, path, **kwargs):
  config, corpus, encoders = setup
  return embed_passages(encoders, config).embed_corpus(corpus, path, progress=False, **kwargs)


def _per_batch_reference(setup) -> np.ndarray:
  """The previous pipeline: corpus order, every batch padded to the full batch size."""
  config, corpus, encoders = setup
  texts, pairs = passage_inputs(corpus.titles[:], corpus.texts[:], config.model.passage_style)
  size = config.model.embed_batch_size
  out = []
  for start in range(0, len(texts), size):
    tokens = tokenize(encoders.tokenizer, texts[start:start + size],
                      config.model.max_passage_length,
                      pad_to_multiple_of=LENGTH_BUCKET)
    real = tokens["input_ids"].shape[0]
    tokens = {k: np.pad(v, ((0, size - real), (0, 0))) for k, v in tokens.items()}
    emb = encoders.passage_apply(encoders.passage_params, tokens["input_ids"],
                                 tokens["attention_mask"], tokens["token_type_ids"])
    out.append(np.asarray(emb)[:real])
  return np.concatenate(out)


def test_pipeline_matches_per_batch_reference(setup, tmp_path):
  config, corpus, encoders = setup
  stats = _embed(setup, tmp_path / "t.npy")
  table = np.load(tmp_path / "t.npy", allow_pickle=False)
  ref = _per_batch_reference(setup)
  assert table.shape == ref.shape == (600, 32) and table.dtype == np.float32
  assert stats["chunks"] == 5 and stats["computed"] == 5 and stats["skipped"] == 0
  np.testing.assert_allclose(table, ref, atol=1e-5, rtol=0)
  # embed_texts (queries, in memory) runs the same pipeline.
  texts, _ = passage_inputs(corpus.titles[:], corpus.texts[:], config.model.passage_style)
  in_memory = embed_texts(None, encoders.passage_params, encoders.tokenizer, texts,
                          jitted=encoders.passage_apply, max_length=32, batch_size=64,
                          bucket=32, chunk_size=CHUNK_ROWS, progress=False)
  np.testing.assert_array_equal(in_memory, table)


def test_interrupted_run_resumes_bit_identical(setup, tmp_path):
  _embed(setup, tmp_path / "full.npy")
  path = tmp_path / "resumed.npy"
  seen = []

  def crash(chunk):
    seen.append(chunk)
    if len(seen) == 2:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    _embed(setup, path, on_chunk=crash)
  assert not path.exists() and partial_path(path).exists()  # never a half-written cache
  manifest = json.loads(path.with_name(path.name + ".done-p0.json").read_text())
  assert manifest["done"] == [0, 1]
  redone = []
  stats = _embed(setup, path, on_chunk=redone.append)
  assert redone == [2, 3, 4] and stats["computed"] == 3 and stats["skipped"] == 2
  assert not partial_path(path).exists() and not list(tmp_path.glob("*.done-p*.json"))
  np.testing.assert_array_equal(np.load(path), np.load(tmp_path / "full.npy"))


def test_changed_batching_restarts_from_scratch(setup, tmp_path):
  path = tmp_path / "t.npy"

  def stop(chunk):
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    _embed(setup, path, on_chunk=stop)
  config, corpus, encoders = setup
  stats = embed_corpus(encoders.passage_apply, encoders.passage_params, encoders.tokenizer,
                       corpus, path, batching=Batching(32, 16, 32, 8), passage_style="concat",
                       chunk_rows=CHUNK_ROWS, progress=False)
  assert stats["computed"] == 5 and stats["skipped"] == 0


def test_build_or_load_table_streams_and_maps(setup, tmp_path):
  config, corpus, encoders = setup
  table = build_or_load_table(config, corpus, tmp_path, embed_passages(encoders, config))
  assert isinstance(table, np.memmap) and not table.flags.writeable
  (cached,) = tmp_path.glob("table-*.npy")
  assert json.loads(cached.with_suffix(".json").read_text())["rows"] == 600
  np.testing.assert_allclose(table, _per_batch_reference(setup), atol=1e-5, rtol=0)

  class Refuses:
    def embed_corpus(self, corpus, path):
      raise AssertionError("the cached table must be loaded, not embedded again")

  again = build_or_load_table(config, corpus, tmp_path, Refuses())
  np.testing.assert_array_equal(again, table)


def test_processes_of_a_job_decide_together_that_the_table_is_cached(setup, tmp_path,
                                                                    monkeypatch):
  """Another job can finish the shared cache between two processes' looks at it: in a job
  of several processes the cached table goes through embed_corpus, whose barrier all of
  them reach, never through a per-process shortcut (the hang behind a CI failure)."""
  config, corpus, encoders = setup
  table = build_or_load_table(config, corpus, tmp_path, embed_passages(encoders, config))
  calls = []

  class Collective:
    def embed_corpus(self, corpus, path):
      calls.append(path)
      return {"rows": len(corpus), "dim": table.shape[1], "cached": True}

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  again = build_or_load_table(config, corpus, tmp_path, Collective())
  assert calls == list(tmp_path.glob("table-*.npy"))
  np.testing.assert_array_equal(again, table)
  # The real embed_corpus, on one process, takes the same path for a finished table.
  monkeypatch.undo()
  stats = embed_passages(encoders, config).embed_corpus(corpus, calls[0])
  assert stats["cached"] and stats["computed"] == 0


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run(jobs: dict[str, list[str]], tmp: pathlib.Path) -> dict[str, int]:
  """Runs the workers at once (logs in ``tmp``); their exit codes."""
  env = {k: v for k, v in os.environ.items() if k not in (
      "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}

  def run(name):
    with open(tmp / f"{name}.log", "w") as log:
      return subprocess.run([sys.executable, str(WORKER), *jobs[name]], stdout=log,
                            stderr=subprocess.STDOUT, cwd=WORKER.parent.parent, env=env,
                            timeout=TIMEOUT_S, check=False).returncode

  with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
    return dict(zip(jobs, pool.map(run, jobs)))


def _tail(tmp, name):
  return (tmp / f"{name}.log").read_text()[-3000:]


def test_two_processes_equal_one_and_a_crash_resumes(tiny_beir, tiny_encoder_dir, tmp_path):
  """2 processes x 2 devices == 1 process x 2 devices killed after 2 chunks and rerun."""
  from embed_worker import DIE_CODE
  common = [f"--beir={tiny_beir}", f"--encoder={tiny_encoder_dir}", "--devices=2"]
  port = _free_port()
  jobs = {f"p{i}": [str(tmp_path / f"p{i}.json"), *common, f"--cache={tmp_path / 'two'}",
                    f"--process-id={i}", "--num-processes=2", f"--port={port}"]
          for i in range(2)}
  one = [*common, f"--cache={tmp_path / 'one'}"]
  jobs["crash"] = [str(tmp_path / "crash.json"), *one, "--die-after=2"]
  codes = _run(jobs, tmp_path)
  for name in ("p0", "p1"):
    assert codes[name] == 0, _tail(tmp_path, name)
  assert codes["crash"] == DIE_CODE, _tail(tmp_path, "crash")
  assert not list((tmp_path / "one").glob("table-*.npy"))  # the cache is absent until done
  assert len(list((tmp_path / "one").glob("table-*.npy.partial"))) == 1
  codes = _run({"resume": [str(tmp_path / "resume.json"), *one]}, tmp_path)
  assert codes["resume"] == 0, _tail(tmp_path, "resume")

  stats = {n: json.loads((tmp_path / f"{n}.json").read_text()) for n in ("p0", "p1", "resume")}
  # Each process embedded its own contiguous block of chunks on its 2 local devices.
  assert stats["p0"]["recorded"] == [0, 1] and stats["p1"]["recorded"] == [2, 3, 4]
  assert all(s["local_devices"] == 2 and s["memmap"] for s in stats.values())
  assert stats["resume"]["recorded"] == [2, 3, 4] and stats["resume"]["skipped"] == 2
  (two,) = (tmp_path / "two").glob("table-*.npy")
  (one_file,) = (tmp_path / "one").glob("table-*.npy")
  assert two.name == one_file.name
  np.testing.assert_array_equal(np.load(two), np.load(one_file))
  assert stats["p0"]["sha1"] == stats["p1"]["sha1"] == stats["resume"]["sha1"]


def _damage_sign_flip(path):
  table = np.load(path, mmap_mode="r+")
  table[100:300] *= -1  # 200 rows negated: every value still finite
  table.flush()


def _damage_truncate(path):
  with open(path, "r+b") as f:
    f.truncate(path.stat().st_size - 1000)


def _damage_nan(path):
  table = np.load(path, mmap_mode="r+")
  table[7, 3] = np.nan
  table.flush()


def _damage_random(path):
  path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


@pytest.mark.parametrize("damage", [_damage_sign_flip, _damage_truncate, _damage_nan,
                                    _damage_random])
def test_damaged_cache_is_set_aside_and_rebuilt(setup, tmp_path, damage, caplog):
  from qdr_jax.checksums import sums_path, verify_table
  config, corpus, encoders = setup
  table = np.array(build_or_load_table(config, corpus, tmp_path,
                                       embed_passages(encoders, config)))
  (cached,) = tmp_path.glob("table-*.npy")
  assert verify_table(cached) is None and sums_path(cached).exists()
  damage(cached)
  assert verify_table(cached) is not None
  with caplog.at_level("WARNING"):
    again = build_or_load_table(config, corpus, tmp_path, embed_passages(encoders, config))
  np.testing.assert_array_equal(again, table)
  assert verify_table(cached) is None
  (aside,) = tmp_path.glob("table-*.npy.damaged-*[0-9]")  # kept, not deleted
  assert aside.stat().st_size and verify_table(aside) is not None
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(warnings) == 1 and str(cached) in warnings[0]


def test_cache_without_checksums_is_rebuilt(setup, tmp_path):
  from qdr_jax.checksums import sums_path
  config, corpus, encoders = setup
  build_or_load_table(config, corpus, tmp_path, embed_passages(encoders, config))
  (cached,) = tmp_path.glob("table-*.npy")
  sums_path(cached).unlink()
  calls = []

  class Counting:
    def embed_corpus(self, corpus, path):
      calls.append(path)
      return embed_passages(encoders, config).embed_corpus(corpus, path, progress=False)

  build_or_load_table(config, corpus, tmp_path, Counting())
  assert calls == [cached] and sums_path(cached).exists()


def test_non_finite_rows_are_never_cached(setup, tmp_path):
  config, corpus, encoders = setup

  def nan_apply(params, *tokens):
    return encoders.passage_apply(params, *tokens) * np.nan

  path = tmp_path / "t.npy"
  with pytest.raises(FloatingPointError, match="NaN or infinite"):
    embed_corpus(nan_apply, encoders.passage_params, encoders.tokenizer, corpus, path,
                 batching=Batching(32, 16, 32, 8), passage_style="concat",
                 chunk_rows=CHUNK_ROWS, progress=False)
  assert not path.exists() and not list(tmp_path.glob("*.done-p*.json"))


def test_chunks_adapt_to_the_corpus_size():
  from qdr_jax.targets.embed import resumable_chunk_rows
  # The demo's 5,183 abstracts in batches of 32: 15 chunks of 352, not one of 16,384.
  assert resumable_chunk_rows(5183, 0, 32) == 352
  assert resumable_chunk_rows(100_000_000, 0, 32) == 16384
  assert resumable_chunk_rows(10, 0, 32) == 32
  assert resumable_chunk_rows(5183, 1000, 32) == 1000  # configured: kept


def test_interrupted_small_corpus_keeps_the_finished_half(setup, tmp_path):
  config, corpus, encoders = setup
  adapted = config.copy_and_resolve_references()
  with adapted.unlocked():
    adapted.table.embed_chunk_rows = 0  # 600 rows, batches of 64: 10 chunks of 64
  embedder = embed_passages(encoders, adapted)
  path = tmp_path / "t.npy"
  seen = []

  def ctrl_c_half_way(chunk):
    seen.append(chunk)
    if len(seen) == 5:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    embedder.embed_corpus(corpus, path, progress=False, on_chunk=ctrl_c_half_way)
  stats = embedder.embed_corpus(corpus, path, progress=False)
  assert stats["chunks"] == 10 and stats["skipped"] == 5 and stats["computed"] == 5
  np.testing.assert_allclose(np.load(path), _per_batch_reference(setup), atol=1e-5, rtol=0)
