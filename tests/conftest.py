"""Shared fixtures: a tiny BEIR data set and a tiny random encoder saved as a HF directory."""

import gzip
import json
import os

# The suite runs as the experiment scripts do: tuned for CPU (OpenMP's wait policy, the
# XLA:CPU flag, glibc's malloc), set before FAISS loads OpenMP and before JAX starts its
# backend; worker subprocesses inherit the environment.
from qdr_jax import platform  # noqa: E402  pylint: disable=g-bad-import-order

platform.tune_process(restart=False)

# Compiling, not running, is most of the suite's time: its programs are tiny, and each
# test builds its own step functions. LLVM's optimization level 0 cuts XLA:CPU's compile
# time by about a third and leaves the values alone (no fast-math at any level: LLVM
# may not reorder float operations). Worker subprocesses inherit it.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()

import jax  # noqa: E402  pylint: disable=g-bad-import-order
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from qdr_jax.config import base_config  # noqa: E402
from qdr_jax.models import BertEncoder, EncoderConfig, default_model_path, init_params  # noqa: E402
from qdr_jax.models import save_encoder_hf  # noqa: E402

WORDS = [f"w{i}" for i in range(400)]


@pytest.fixture(scope="session", autouse=True)
def xla_compilation_cache(tmp_path_factory):
  """One persistent XLA compilation cache for the run: its processes (pytest-xdist
  workers, worker subprocesses) compile the same tiny programs over and over, which a
  cache hit skips (measured: -28% on test_train_families.py). It lives in the run's
  pytest base directory (the parent of an xdist worker's), so every run starts cold and
  pytest prunes it with the run."""
  base = tmp_path_factory.getbasetemp()
  path = str((base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "xla_cache")
  settings = {"jax_compilation_cache_dir": path,
              "jax_persistent_cache_min_compile_time_secs": 0,
              "jax_persistent_cache_min_entry_size_bytes": 0}
  old = {name: (getattr(jax.config, name), os.environ.get(name.upper())) for name in settings}
  for name, value in settings.items():
    jax.config.update(name, value)
    os.environ[name.upper()] = str(value)  # for the worker subprocesses
  yield path
  for name, (value, env) in old.items():
    jax.config.update(name, value)
    if env is None:
      os.environ.pop(name.upper(), None)
    else:
      os.environ[name.upper()] = env


@pytest.fixture(scope="session", autouse=True)
def corpus_cache(tmp_path_factory):
  """Corpus stores (qdr_jax.data.store) go to a session tmp dir instead of ~/.cache;
  set in the environment so that worker subprocesses use it too."""
  path = str(tmp_path_factory.mktemp("corpus_cache"))
  old = os.environ.get("QDR_JAX_CORPUS_CACHE")
  os.environ["QDR_JAX_CORPUS_CACHE"] = path
  yield path
  if old is None:
    os.environ.pop("QDR_JAX_CORPUS_CACHE", None)
  else:
    os.environ["QDR_JAX_CORPUS_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_beir(tmp_path_factory):
  """600 passages of random words; each query repeats 4 words of its one positive."""
  root = tmp_path_factory.mktemp("tiny_beir")
  rng = np.random.default_rng(0)
  docs = [" ".join(rng.choice(WORDS, 12)) for _ in range(600)]
  with gzip.open(root / "corpus.jsonl.gz", "wt") as f:
    for i, text in enumerate(docs):
      f.write(json.dumps({"_id": f"d{i}", "title": "", "text": text}) + "\n")
  (root / "qrels").mkdir()
  with open(root / "queries.jsonl", "w") as f, \
       open(root / "qrels" / "train.tsv", "w") as train, \
       open(root / "qrels" / "test.tsv", "w") as test:
    train.write("query-id\tcorpus-id\tscore\n")
    test.write("query-id\tcorpus-id\tscore\n")
    for q in range(160):
      doc = int(rng.integers(600))
      words = rng.choice(docs[doc].split(), 4, replace=False)
      f.write(json.dumps({"_id": f"q{q}", "text": " ".join(words)}) + "\n")
      (test if q >= 128 else train).write(f"q{q}\td{doc}\t1\n")
  return root


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory):
  """A random 2-layer, 32-wide BERT with MiniLM's tokenizer (full vocabulary)."""
  out = tmp_path_factory.mktemp("tiny_encoder")
  config = EncoderConfig.tiny(vocab_size=30522, max_position_embeddings=128, pooling="mean",
                              normalize=True)
  params = init_params(BertEncoder(config), jax.random.key(0))
  return save_encoder_hf(str(out), config, params, tokenizer_dir=default_model_path())


@pytest.fixture
def tiny_config(tiny_beir, tiny_encoder_dir, tmp_path):
  return make_tiny_config(tiny_beir, tiny_encoder_dir, tmp_path / "cache")


def make_tiny_config(tiny_beir, tiny_encoder_dir, cache_dir):
  """The `tiny_config` fixture's config, for fixtures of a wider scope."""
  c = base_config()
  c.data.name = "tiny"
  c.data.root = str(tiny_beir)
  c.model.query_encoder = tiny_encoder_dir
  c.model.max_query_length = 16
  c.model.max_passage_length = 32
  c.model.embed_batch_size = 64
  c.table.cache_dir = str(cache_dir)
  c.index.factory = "IVF4,PQ4x8"
  c.index.nprobe = 2
  c.index.rebuild_every = 10
  c.negatives.k = 16
  c.loss.temperature = 0.05
  c.optim.encoder_lr = 3e-3
  c.optim.row_lr = 1e-2
  c.optim.warmup_steps = 2
  c.train.batch_size = 8
  c.train.steps = 80
  c.train.log_every = 1
  c.eval.index_seeds = (0,)
  c.eval.depth = 100
  c.eval.measures = ("nDCG@10", "R@10", "R@100")
  c.lock()
  return c
