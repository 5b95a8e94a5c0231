"""Validation before any work (qdr_jax.validation) and one-line user errors (qdr_jax.cli)."""

import dataclasses
import importlib
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import time

import faiss
import numpy as np
import pytest

from qdr_jax import cli
from qdr_jax.config import base_config
from qdr_jax.data.beir import read_beir_corpus
from qdr_jax.data.loader import load_dataset
from qdr_jax.data.types import DataFormatError, Queries
from qdr_jax.index.build import build_index
from qdr_jax.targets.table import load_npy_table
from qdr_jax.validation import ConfigError, validate_config, validate_runs

REPO = pathlib.Path(__file__).resolve().parent.parent
DIM = 32  # the tiny encoder's hidden size


@pytest.fixture(scope="module")
def tiny_dataset(tiny_beir):
  c = base_config()
  c.data.name = "tiny"
  c.data.root = str(tiny_beir)
  return load_dataset(c.data)


def _with(config, **overrides):
  c = config.copy_and_resolve_references()
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  return c


def _int8_table(tmp_path):
  path = tmp_path / "table.npy"
  np.save(path, np.ones((600, DIM), np.int8), allow_pickle=False)
  return str(path)


# (case, overrides, expected line); the tiny data set has 600 passages and 128 training
# queries with a positive, the tiny encoder 32 dimensions, the config IVF4,PQ4x8.
CASES = [
    ("temperature", {"loss.temperature": 0.0}, "config.loss.temperature=0.0: expected a number > 0"),
    ("batch_zero", {"train.batch_size": 0}, "config.train.batch_size=0: expected a number >= 1"),
    ("steps", {"train.steps": -3}, "config.train.steps=-3: expected a number >= 0"),
    ("enum", {"optim.schedule": "cos"},
     "config.optim.schedule='cos': expected one of 'cosine', 'linear', 'constant'"),
    ("bad_factory", {"index.factory": "IVF4,PQ4x8,Bogus"},
     "config.index.factory='IVF4,PQ4x8,Bogus': Invalid FAISS factory string"),
    ("pq_divides", {"index.factory": "IVF4,PQ5x8"},
     "the PQ sub-quantizer count (5) does not divide the dimension 32"),
    ("few_points", {"index.factory": "IVF1024,PQ4x8", "index.nprobe": 1},
     "its IVF coarse quantizer needs at least 1024 training points, the corpus's 600 "
     "passages give 600"),
    ("train_size", {"index.train_size": 100},
     "its PQ4x8 sub-quantizers needs at least 256 training points, "
     "config.index.train_size=100 give 100"),
    ("batch_queries", {"train.batch_size": 200},
     "config.train.batch_size=200: expected <= the 128 queries of split 'train' with a "
     "positive passage in the corpus"),
    ("batch_devices", {"train.batch_size": 6, "sharding.num_devices": 4},
     "config.train.batch_size=6: expected a multiple of the 4 devices"),
    ("nprobe", {"index.nprobe": 8}, "config.index.nprobe=8: expected <= nlist=4 of 'IVF4,PQ4x8'"),
    ("k", {"negatives.k": 1000}, "config.negatives.k=1000: expected <= the corpus's 600 passages"),
    ("rebuild", {"index.full_rebuild_every": 15},
     "config.index.full_rebuild_every=15: expected a multiple of config.index.rebuild_every=10"),
    ("int8_table", {"table.init": "npy", "table.path": _int8_table},
     "holds int8 values; expected a floating-point embedding table"),
    ("mode", {"train.mode": "bogus"}, "config.train.mode='bogus': expected one of 'dback'"),
    # The tiny encoder has 128 positions (its config.json's max_position_embeddings).
    ("passage_positions", {"model.max_passage_length": 1024},
     "config.model.max_passage_length=1024: expected <= 128, the positions of encoder"),
    ("query_positions", {"model.max_query_length": 129},
     "config.model.max_query_length=129: expected <= 128, the positions of encoder"),
    ("depth", {"eval.depth": 50},
     "config.eval.depth=50: expected >= 100, the cut-offs of config.eval.measures 'R@100' "
     "(rankings 50 deep would report them wrong)"),
    ("primary_metric", {"eval.primary_metric": "MRR@10"},
     "config.eval.primary_metric='MRR@10': expected one of config.eval.measures"),
]


@pytest.mark.parametrize("overrides,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused(tiny_config, tiny_dataset, tmp_path, overrides, expected):
  overrides = {k: v(tmp_path) if callable(v) else v for k, v in overrides.items()}
  with pytest.raises(ConfigError) as e:
    validate_config(_with(tiny_config, **overrides), dataset=tiny_dataset, dim=DIM)
  assert any(expected in line for line in e.value.problems), e.value.problems
  assert all("\n" not in line for line in e.value.problems)
  assert str(e.value) == "\n".join(e.value.problems)


def test_depth_and_primary_metric_accept_what_is_computed(tiny_config, tiny_dataset):
  validate_config(_with(tiny_config, **{"eval.depth": 100, "eval.primary_metric": "top20"}),
                  dataset=tiny_dataset, dim=DIM)


def test_train_and_test_queries_overlap(tiny_config, tiny_dataset):
  train = tiny_dataset.split("train")
  test = dataclasses.replace(train, queries=Queries(list(train.queries.ids[:3]),
                                                    list(train.queries.texts[:3])))
  dataset = dataclasses.replace(tiny_dataset, splits={**tiny_dataset.splits, "test": test})
  with pytest.raises(ConfigError) as e:
    validate_config(tiny_config, dataset=dataset, dim=DIM)
  assert e.value.problems == [
      "config.data.eval_split='test': 3 of its queries are also in config.data.train_split="
      "'train' (ids 'q0', 'q1', 'q2'); they would be trained on and reported as test queries "
      "(config.data.allow_query_overlap=True runs anyway and records the overlap in "
      "results.json)"]
  validate_config(_with(tiny_config, **{"data.allow_query_overlap": True}), dataset=dataset,
                  dim=DIM)
  validate_config(tiny_config, dataset=dataset, dim=DIM, training=False)  # nothing trained
  validate_config(_with(tiny_config, **{"data.eval_split": "train"}), dataset=dataset,
                  dim=DIM)  # the training split itself, chosen on purpose


def test_both_compressed_and_plain_corpus_refused(tiny_config, tiny_beir, tmp_path):
  root = tmp_path / "beir"
  shutil.copytree(tiny_beir, root)
  (root / "corpus.jsonl").write_text('{"_id": "d0", "text": "x"}\n')
  with pytest.raises(ConfigError, match=r"holds both corpus.jsonl and corpus.jsonl.gz"):
    validate_config(_with(tiny_config, **{"data.root": str(root)}))


def test_every_problem_reported_at_once(tiny_config, tiny_dataset):
  bad = _with(tiny_config, **{"loss.temperature": 0.0, "train.steps": -3, "index.nprobe": 8,
                              "negatives.k": 1000})
  with pytest.raises(ConfigError) as e:
    validate_config(bad, dataset=tiny_dataset, dim=DIM)
  assert [p.split("=")[0] for p in e.value.problems] == [
      "config.loss.temperature", "config.train.steps", "config.index.nprobe",
      "config.negatives.k"]


def test_config_checks_need_no_data(tiny_config):
  with pytest.raises(ConfigError, match=r"^config.train.batch_size=0: expected"):
    validate_config(_with(tiny_config, **{"train.batch_size": 0}))


def test_empty_query_text(tiny_config, tiny_dataset):
  train = tiny_dataset.split("train")
  texts = list(train.queries.texts)
  texts[3] = "  "
  split = dataclasses.replace(train, queries=Queries(list(train.queries.ids), texts))
  dataset = dataclasses.replace(tiny_dataset, splits={**tiny_dataset.splits, "train": split})
  with pytest.raises(ConfigError) as e:
    validate_config(tiny_config, dataset=dataset, dim=DIM)
  assert e.value.problems == [
      f"config.data.train_split='train': 1 queries have empty text (ids {train.queries.ids[3]!r})"]


def test_evaluation_only_skips_training_checks(tiny_config, tiny_dataset):
  # An evaluation neither trains on the batch nor draws k negatives.
  validate_config(_with(tiny_config, **{"train.batch_size": 200, "negatives.k": 1000}),
                  dataset=tiny_dataset, dim=DIM, training=False)


def test_valid_configs_validate_cleanly_and_fast(tiny_config, tiny_dataset):
  start = time.perf_counter()
  warnings = validate_config(tiny_config, dataset=tiny_dataset, dim=DIM)
  assert time.perf_counter() - start < 1.0
  # 600 points for 256-centroid PQ k-means: allowed, below FAISS's 39 per centroid.
  assert warnings == ["config.index.factory='IVF4,PQ4x8': the corpus's 600 passages give 600 "
                      "training points for the PQ4x8 sub-quantizers (256 centroids), fewer "
                      "than the 9984 FAISS recommends (39 per centroid)"]
  demo = importlib.import_module("configs.demo")
  assert validate_config(demo.get_config(), dim=384) == []  # its default mode
  for mode in ("dback", "jpq", "posthoc"):
    assert validate_config(demo.get_config(f"mode={mode}"), dim=384) == []
  for name, dim in (("squad", 384), ("nq", 768), ("trivia", 768), ("msmarco", 768)):
    assert validate_config(importlib.import_module(f"configs.{name}").get_config(),
                           dim=dim) == [], name


def test_compare_validates_every_run(tiny_config):
  runs = [_with(tiny_config, **{"train.mode": m}) for m in ("posthoc", "bogus")]
  with pytest.raises(ConfigError) as e:
    validate_runs(runs, lambda c: f"mode {c.train.mode!r}")
  assert e.value.problems == ["mode 'bogus': config.train.mode='bogus': expected one of "
                              "'dback', 'dback_no_ste', 'jpq', 'query_only', 'posthoc', "
                              "'rows_only'"]


def test_int8_cached_table_not_cast(tmp_path):
  with pytest.raises(DataFormatError, match="table.npy: table holds int8 values"):
    load_npy_table(_int8_table(tmp_path), 600)


def test_non_utf8_corpus_names_file_and_line(tmp_path):
  path = tmp_path / "corpus.jsonl"
  path.write_bytes(b'{"_id": "a", "text": "ok"}\n{"_id": "b", "text": "caf\xe9"}\n')
  with pytest.raises(DataFormatError) as e:
    read_beir_corpus(path, cache_dir=tmp_path / "store")
  assert str(e.value) == f"{path}:2: not UTF-8 text: byte b'\\xe9' at column 26"


def test_faiss_clustering_warnings_become_one_line(capfd, caplog):
  x = np.random.default_rng(0).standard_normal((600, DIM)).astype(np.float32)
  with caplog.at_level(logging.WARNING):
    index = build_index(x, "IVF8,PQ8x8", seed=0)
  assert index.ntotal == 600
  assert "WARNING clustering" not in capfd.readouterr().err  # FAISS's C++ fprintf
  lines = [r.getMessage() for r in caplog.records if "per centroid" in r.getMessage()]
  assert lines == ["Index 'IVF8,PQ8x8' trains on 600 points, fewer than the 39 per centroid "
                   "FAISS recommends for: PQ8x8 sub-quantizers (256 centroids); its "
                   "clustering may be poor."]
  # Lowering FAISS's threshold leaves the clustering itself unchanged.
  ref = faiss.index_factory(DIM, "IVF8,PQ8x8", faiss.METRIC_INNER_PRODUCT)
  ref.cp.seed = ref.pq.cp.seed = 0
  ref.do_polysemous_training = False
  ref.train(x)
  assert np.array_equal(faiss.vector_to_array(ref.pq.centroids),
                        faiss.vector_to_array(
      faiss.downcast_index(faiss.extract_index_ivf(index)).pq.centroids))


def test_guarded_main_one_line_and_status_2(capsys, monkeypatch):
  def main(argv):
    raise ConfigError(["config.a=1: expected x", "config.b=2: expected y"])

  monkeypatch.delenv("QDR_JAX_VERBOSE", raising=False)
  with pytest.raises(SystemExit) as e:
    cli.guarded(main)([])
  assert e.value.code == 2
  assert capsys.readouterr().err == "error: config.a=1: expected x\nerror: config.b=2: expected y\n"
  monkeypatch.setenv("QDR_JAX_VERBOSE", "1")
  with pytest.raises(SystemExit):
    cli.guarded(main)([])
  assert "Traceback" in capsys.readouterr().err

  def missing(argv):
    open("/nonexistent/qrels.tsv", encoding="utf-8")

  with pytest.raises(SystemExit) as e:
    cli.guarded(missing)([])
  assert e.value.code == 2
  assert capsys.readouterr().err.endswith(
      "error: /nonexistent/qrels.tsv: No such file or directory\n")

  def bug(argv):
    raise KeyError("a bug, not a user error")

  with pytest.raises(KeyError):
    cli.guarded(bug)([])


# ----------------------------------------------------------------------------- scripts

_CONFIG_FILE = '''
from qdr_jax.config import base_config

def get_config():
  c = base_config()
  c.data.name = "tiny"
  c.data.root = {root!r}
  c.model.query_encoder = {encoder!r}
  c.model.max_query_length = 16
  c.model.max_passage_length = 32
  c.table.cache_dir = {cache!r}
  c.index.factory = "IVF4,PQ4x8"
  c.index.nprobe = 2
  c.index.rebuild_every = 10
  c.negatives.k = 16
  c.train.batch_size = 8
  c.train.steps = 2
  c.eval.index_seeds = (0,)
  return c
'''


def _script(name, tmp_path, root, encoder, *args):
  config = tmp_path / "tiny_config.py"
  config.write_text(_CONFIG_FILE.format(root=str(root), encoder=encoder,
                                        cache=str(tmp_path / "cache")))
  env = dict(os.environ, JAX_PLATFORMS="cpu", OMP_WAIT_POLICY="PASSIVE",
             HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
  env.pop("QDR_JAX_VERBOSE", None)
  return subprocess.run([sys.executable, str(REPO / "experiments" / name),
                         f"--config={config}", f"--workdir={tmp_path / 'run'}", *args],
                        capture_output=True, text=True, env=env, timeout=300)


def _assert_refused(result, expected, tmp_path):
  assert result.returncode == 2, result.stderr
  assert "Traceback" not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert any(expected in line for line in errors), result.stderr
  assert not (tmp_path / "run").exists()  # no workdir, so no results.json / compare.json
  assert not (tmp_path / "cache").exists()  # nothing embedded


def test_train_script_refuses_bad_config(tmp_path, tiny_beir, tiny_encoder_dir):
  result = _script("train.py", tmp_path, tiny_beir, tiny_encoder_dir,
                   "--config.loss.temperature=0")
  _assert_refused(result, "error: config.loss.temperature=0.0: expected a number > 0",
                  tmp_path)


def test_compare_script_refuses_bogus_mode_first(tmp_path, tiny_beir, tiny_encoder_dir):
  result = _script("compare.py", tmp_path, tiny_beir, tiny_encoder_dir,
                   "--modes=posthoc,bogus", "--levels=4")
  _assert_refused(result, "error: level 4, mode 'bogus', seed 0: config.train.mode='bogus'", tmp_path)


def test_train_script_refuses_non_utf8_corpus(tmp_path, tiny_beir, tiny_encoder_dir):
  root = tmp_path / "beir"
  root.mkdir()
  (root / "qrels").mkdir()
  (root / "corpus.jsonl").write_bytes(b'{"_id": "d0", "text": "ok"}\n'
                                      b'{"_id": "d1", "text": "\xff\xfe"}\n')
  (root / "queries.jsonl").write_text('{"_id": "q0", "text": "ok"}\n')
  (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\n")
  (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\n")
  result = _script("train.py", tmp_path, root, tiny_encoder_dir)
  _assert_refused(result, f"error: {root / 'corpus.jsonl'}:2: not UTF-8 text", tmp_path)


def test_a_job_of_several_processes_needs_a_mesh_over_all_of_them(tiny_config, tiny_dataset,
                                                                  monkeypatch):
  import jax  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "device_count", lambda: 4)
  with pytest.raises(ConfigError) as e:
    validate_config(_with(tiny_config, **{"sharding.num_devices": 1}), dataset=tiny_dataset,
                    dim=DIM)
  assert e.value.problems == [
      "config.sharding.num_devices=1: expected 0 (every device) or 4 in a job of 2 processes: "
      "the mesh must hold devices of every process"]
  validate_config(_with(tiny_config, **{"sharding.num_devices": 0}), dataset=tiny_dataset,
                  dim=DIM)
