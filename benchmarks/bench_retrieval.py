r"""Corpus-embedding throughput against the machine's matmul floor; index build and search.

  python benchmarks/bench_retrieval.py --config=configs/demo.py --workdir=runs/demo

1. Measures the jitted float32 matmul rate (GFLOP/s) of this machine, before and after
   the embedding (the higher one is the floor: a shared machine's rate drifts).
2. Embeds ``--passages`` passages of the corpus with the config's passage encoder
   (length-bucketed, jitted, as the table builder does) and counts the model's FLOPs for
   the tokens actually encoded (padding included), giving the achieved fraction of the
   matmul rate: the encoder cannot go faster than that floor.
3. Builds the config's quantized index over the cached table (or a fresh embedding) and
   times search latency at k=100 for single queries and batches of 64.
Writes ``{workdir}/bench_retrieval.json``.
"""

import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from qdr_jax import host_memory, platform
from qdr_jax.cli import run_main
from qdr_jax.data.loader import load_dataset
from qdr_jax.index.build import build_quantized
from qdr_jax.index.layout import bytes_per_vector
from qdr_jax.index.searching import search
from qdr_jax.models import LENGTH_BUCKET, passage_inputs
from qdr_jax.targets.embed import embed_texts
from qdr_jax.targets.encoders import embed_passages, load_encoders
from qdr_jax.targets.table import build_or_load_table

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (its table cache is reused).")
_PASSAGES = flags.DEFINE_integer("passages", 256, "Passages embedded for the throughput.")
flags.mark_flags_as_required(["config", "workdir"])


# XLA:CPU's dot kernels: its own (Eigen; qdr_jax's default, see qdr_jax/__init__.py) and
# YNNPACK's, which is faster on a lone square matmul (142-160 against 111-118 GFLOP/s
# here). The floor is the faster of the two, so the fraction is not flattered.
_DOT_BACKENDS = ({}, {"xla_cpu_experimental_ynn_fusion_type":
                      "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"})


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
  """Median rate of a jitted (n, n) @ (n, n) float32 matmul, the faster dot backend's."""
  a = jnp.ones((n, n), jnp.float32)
  rates = []
  for options in (_DOT_BACKENDS if platform.is_cpu() else ({},)):
    f = jax.jit(lambda x: x @ x).lower(a).compile(options)
    f(a).block_until_ready()
    seconds = []
    for _ in range(repeats):
      start = time.perf_counter()
      f(a).block_until_ready()
      seconds.append(time.perf_counter() - start)
    rates.append(2 * n ** 3 / float(np.median(seconds)) / 1e9)
  return max(rates)


def encoder_flops(cfg, batch: int, length: int) -> float:
  """Forward FLOPs of a BERT encoder on (batch, length) tokens: the dense layers plus
  the two attention matmuls (embedding lookups and elementwise work left out)."""
  h, f, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
  dense = 2 * batch * length * (4 * h * h + 2 * h * f)
  attention = 2 * 2 * batch * length * length * h
  return float(layers * (dense + attention))


def main(argv):
  del argv
  config = _CONFIG.value
  workdir = pathlib.Path(_WORKDIR.value)
  dataset = load_dataset(config.data)
  encoders = load_encoders(config.model)
  # The rate of a shared machine drifts (89-201 GFLOP/s on the same host): measured before
  # and after the embedding, the higher of the two is the floor the fraction is taken of.
  rate_before = matmul_gflops()

  corpus = dataset.corpus
  n = min(_PASSAGES.value, len(corpus))
  texts, pairs = passage_inputs(corpus.titles[:n], corpus.texts[:n], config.model.passage_style)
  shapes = []
  apply = encoders.passage_apply

  def recording(params, ids, mask, types):
    shapes.append(ids.shape)
    return apply(params, ids, mask, types)

  kwargs = dict(pair_texts=pairs, max_length=config.model.max_passage_length,
                batch_size=config.model.embed_batch_size, bucket=LENGTH_BUCKET,
                progress=False)
  embed_texts(None, encoders.passage_params, encoders.tokenizer, texts, jitted=apply, **kwargs)
  start = time.perf_counter()
  embed_texts(None, encoders.passage_params, encoders.tokenizer, texts, jitted=recording,
              **kwargs)
  seconds = time.perf_counter() - start
  rate_after = matmul_gflops()
  rate = max(rate_before, rate_after)
  flops = sum(encoder_flops(encoders.passage_module.config, b, length) for b, length in shapes)
  tokens = sum(b * length for b, length in shapes)

  table = build_or_load_table(config, corpus,
                              pathlib.Path(config.table.cache_dir or workdir / "cache"),
                              embed_passages(encoders, config))
  start = time.perf_counter()
  index = build_quantized(table, config.index, config.index.seed)
  build_seconds = time.perf_counter() - start
  queries = table[np.random.default_rng(0).choice(len(table), 64, replace=False)]
  search(index, queries, 100)
  start = time.perf_counter()
  for q in queries:
    search(index, q[None], 100)
  single_ms = (time.perf_counter() - start) / len(queries) * 1e3
  start = time.perf_counter()
  for _ in range(5):
    search(index, queries, 100)
  batch_ms = (time.perf_counter() - start) / 5 * 1e3

  result = {
      "platform": jax.devices()[0].platform, "matmul_gflops": rate,
      "host_heap_kept": host_memory.applied, "cpu_model": platform.cpu_model(),
      "matmul_gflops_before_after": [rate_before, rate_after],
      "embed": {"passages": n, "seconds": seconds, "passages_per_second": n / seconds,
                "padded_tokens_per_second": tokens / seconds,
                "model_gflops_per_second": flops / seconds / 1e9,
                "fraction_of_matmul_rate": flops / seconds / 1e9 / rate,
                "floor_passages_per_second": n / (flops / (rate * 1e9))},
      "index": {"factory": config.index.factory, "rows": len(table),
                "bytes_per_vector": bytes_per_vector(index), "build_seconds": build_seconds,
                "nprobe": config.index.nprobe, "search_ms_single_query_k100": single_ms,
                "search_ms_batch64_k100": batch_ms}}
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "bench_retrieval.json").write_text(json.dumps(result, indent=1))
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  run_main(main)
