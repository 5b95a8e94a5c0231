r"""The JAX encoder against PyTorch's BertModel on the same weights, same threads, one run.

  OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 python benchmarks/bench_encoder.py \
      --out=runs/bench_encoder.json

Times, for all-MiniLM-L6-v2 (mean pooling, L2-normalised):
- forward: a batch of 32 sequences padded to 256 tokens (corpus embedding shape);
- train: forward + backward to every encoder parameter on 32 sequences of 64 tokens
  (the training-query shape), loss = sum of embeddings . fixed random vectors;
- train_queries: the same on a real training batch (``--queries``: the bundled SciFact
  demo's first batch of training queries, as training draws it), each framework
  batching it its own way: JAX as the training step does (packed several to a row,
  ``PACK_QUERY_ROWS`` of ``--queries``), PyTorch padded to the longest query, as
  the paper's recipe and transformers do. Ratio ``ratio_train_queries``.
PyTorch (``pip install -e ".[bench]"``) runs transformers' BertModel in eval mode
(dropout off, as the JAX encoder has none) with ``torch.set_num_threads(--threads)``;
XLA's CPU client uses one intra-op thread per core, so run it on a machine (or a
``taskset``) with ``--threads`` cores. JAX and torch repeats alternate so that load
from other processes hits both alike; each figure is the median of ``--repeats``
after ``--warmup`` calls. Outputs are checked to agree within ``--atol`` first.
Writes ``{"jax": {...}, "torch": {...}, "ratio_forward": ..., "ratio_train": ..., ...}``
(ratio = JAX seconds / PyTorch seconds; null without PyTorch).

"forward" is one jitted graph. The corpus embedding runs the passage encoder's own
forward (``Encoders.passage_apply``: on CPU the staged one of ``qdr_jax.models.staged``,
its attention core compiled apart); it is timed on the same batch as "jax_corpus_forward",
with ``ratio_forward_corpus``.

``--variants=default,ynn_xla_default`` compiles the same JAX functions once per named
set of XLA:CPU options (``VARIANTS``) and alternates them with each other and PyTorch,
so that a flag is judged within one process and one load; "jax" and the top-level
ratios are the first variant's, every variant's own are under "jax_variants".
"""

import functools
import json
import os
import statistics
import time
from typing import Any, Callable

# Before jax/torch start their thread pools (and any OpenMP runtime).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from qdr_jax import host_memory, platform
from qdr_jax.cli import run_main
from qdr_jax.io_utils import write_text_atomic
from qdr_jax.models import load_encoder, resolve_model_path
from qdr_jax.targets.embed import make_corpus_apply

_MODEL = flags.DEFINE_string("model", "all-MiniLM-L6-v2", "Encoder name or directory.")
_BATCH = flags.DEFINE_integer("batch", 32, "Sequences per call.")
_FWD_LEN = flags.DEFINE_integer("forward_len", 256, "Padded length of the forward batch.")
_TRAIN_LEN = flags.DEFINE_integer("train_len", 64, "Padded length of the train batch.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed calls per measurement.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls first (compile, caches).")
_THREADS = flags.DEFINE_integer("threads", 2, "PyTorch intra-op threads.")
_ATOL = flags.DEFINE_float("atol", 1e-4, "Largest allowed |JAX - PyTorch| of the outputs.")
_OUT = flags.DEFINE_string("out", "bench_encoder.json", "Result JSON path.")
_QUERIES = config_flags.DEFINE_config_file(
    "queries", "configs/demo.py",
    "Config whose training split gives the real query batch (and its tokenization).")
_TRAIN_QUERIES = flags.DEFINE_bool("train_queries", True,
                                   "Time the real training query batch (train_queries).")
_VARIANTS = flags.DEFINE_list(
    "variants", ["default"],
    "JAX compile variants to time side by side (names in VARIANTS): each is the same "
    "jitted function compiled with other XLA options, so that flags are compared "
    "within one process and one load, not across runs.")

_YNN = "xla_cpu_experimental_ynn_fusion_type"
# XLA:CPU options per variant, passed as `compiler_options` (per executable, so the
# process's XLA_FLAGS stay as they are). Enum lists take the full value names.
_YNN_TYPES = lambda *names: ",".join(f"LIBRARY_FUSION_TYPE_{n}" for n in names)
VARIANTS: dict[str, dict[str, Any]] = {
    # As the process's XLA_FLAGS give it (tuned by run_main: YNNPACK fusions off).
    "default": {},
    # No YNNPACK library fusions: dots go to XLA's own (Eigen) kernels.
    "ynn_off": {_YNN: ""},
    # XLA's own default in jaxlib 0.10.2 (same compiled encoder HLO as no flag at all).
    "ynn_xla_default": {_YNN: _YNN_TYPES("INDIVIDUAL_DOT", "REDUCE")},
    # YNNPACK for single dots only; bias, GELU and reductions stay XLA loop fusions.
    "ynn_individual_dot": {_YNN: _YNN_TYPES("INDIVIDUAL_DOT")},
    # YNNPACK dot fusions (dots with their elementwise producers/consumers).
    "ynn_dot": {_YNN: _YNN_TYPES("DOT")},
}


def make_batch(rng: np.random.Generator, batch: int, length: int,
               vocab: int) -> dict[str, np.ndarray]:
  """Random [CLS] tokens [SEP] rows of lengths in [length/2, length], zero-padded:
  the padding is part of what a real padded batch costs both frameworks."""
  ids = np.zeros((batch, length), np.int32)
  mask = np.zeros((batch, length), np.int32)
  lengths = rng.integers(length // 2, length + 1, size=batch)
  lengths[0] = length  # at least one full row, so the batch really is `length` wide
  for i, n in enumerate(lengths):
    ids[i, :n] = rng.integers(1000, vocab, size=n)
    ids[i, 0], ids[i, n - 1] = 101, 102
    mask[i, :n] = 1
  return {"input_ids": ids, "attention_mask": mask,
          "token_type_ids": np.zeros_like(ids)}


def training_query_texts(config) -> list[str]:
  """The first training batch of a config's data, as the train loop draws it."""
  from qdr_jax.data.loader import load_dataset  # pylint: disable=g-import-not-at-top
  from qdr_jax.negatives.source import batch_indices, training_queries  # pylint: disable=g-import-not-at-top
  dataset = load_dataset(config.data)
  queries = training_queries(dataset.split(config.data.train_split), dataset.corpus)
  rows = batch_indices(0, len(queries.texts), _BATCH.value, config.seed)
  return [queries.texts[i] for i in rows]


def jax_fns(module, compiler_options: dict[str, Any], params, batches: dict[str, Any], w):
  """Forward (on ``batches["forward"]``) and value_and_grad (on every other batch) of the
  JAX encoder, compiled ahead of time for these on-device inputs with
  ``compiler_options``."""

  def embed(p, b):
    return module.apply({"params": p}, **b)

  def loss(p, b, w):
    return jnp.sum(embed(p, b) * w)

  fns = {"forward": jax.jit(embed).lower(params, batches["forward"]).compile(
      compiler_options)}
  for name, batch in batches.items():
    if name != "forward":
      fns[name] = jax.jit(jax.value_and_grad(loss)).lower(params, batch, w).compile(
          compiler_options)
  return fns


def torch_fns(model_dir: str, threads: int):
  """Forward and forward+backward of transformers' BertModel with the same pooling."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import BertModel  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(threads)
  net = BertModel.from_pretrained(model_dir, attn_implementation="sdpa").eval()

  def embed(b):
    mask = b["attention_mask"]
    hidden = net(input_ids=b["input_ids"], attention_mask=mask,
                 token_type_ids=b["token_type_ids"]).last_hidden_state
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)

  def forward(b):
    with torch.inference_mode():
      return embed(b)

  def train(b, w):
    net.zero_grad(set_to_none=True)
    loss = (embed(b) * w).sum()
    loss.backward()
    return loss.detach()

  to_torch = lambda b: {k: torch.from_numpy(v.astype(np.int64)) for k, v in b.items()}
  return torch, forward, train, to_torch


def alternate(calls: dict[str, Callable[[], Any]], repeats: int, warmup: int
              ) -> dict[str, list[float]]:
  """Seconds per call of each entry, the entries interleaved call by call."""
  for fn in calls.values():
    for _ in range(warmup):
      fn()
  times: dict[str, list[float]] = {name: [] for name in calls}
  for _ in range(repeats):
    for name, fn in calls.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return times


def summary(seconds: list[float]) -> dict[str, Any]:
  return {"median_s": statistics.median(seconds), "min_s": min(seconds),
          "all_s": [round(s, 4) for s in seconds]}


def main(argv):
  del argv
  unknown = sorted(set(_VARIANTS.value) - set(VARIANTS))
  if unknown or not _VARIANTS.value:
    raise SystemExit(f"--variants: unknown {unknown}; expected names from {sorted(VARIANTS)}.")
  rng = np.random.default_rng(0)
  module, params = load_encoder(_MODEL.value)
  params = jax.device_put(params)
  vocab = module.config.vocab_size
  # Batches by measurement: "forward" is timed forward only, every other one forward +
  # backward; each framework gets its own tokenization of the same texts.
  batches_np = {"forward": make_batch(rng, _BATCH.value, _FWD_LEN.value, vocab),
                "train": make_batch(rng, _BATCH.value, _TRAIN_LEN.value, vocab)}
  torch_batches_np = dict(batches_np)
  w_np = rng.standard_normal((_BATCH.value, module.config.hidden_size)).astype(np.float32)
  if _TRAIN_QUERIES.value:
    from qdr_jax.models import load_tokenizer, tokenize  # pylint: disable=g-import-not-at-top
    from qdr_jax.negatives.source import query_tokens  # pylint: disable=g-import-not-at-top
    config = _QUERIES.value
    texts = training_query_texts(config)
    tokenizer = load_tokenizer(_MODEL.value)
    batches_np["train_queries"] = query_tokens(tokenizer, texts, config.model, 1)
    torch_batches_np["train_queries"] = tokenize(tokenizer, texts,
                                                 config.model.max_query_length)
  batches, w_j = jax.device_put((batches_np, w_np))
  trains = [name for name in batches if name != "forward"]

  calls: dict[str, Callable[[], Any]] = {}
  compiled = {}
  for variant in _VARIANTS.value:
    compiled[variant] = fns = jax_fns(module, VARIANTS[variant], params, batches, w_j)
    calls[f"{variant}/forward"] = functools.partial(
        lambda f: f(params, batches["forward"]).block_until_ready(), fns["forward"])
    for name in trains:
      calls[f"{variant}/{name}"] = functools.partial(
          lambda f, b: jax.block_until_ready(f(params, b, w_j)), fns[name], batches[name])
  result: dict[str, Any] = {
      "model": _MODEL.value, "batch": _BATCH.value, "forward_len": _FWD_LEN.value,
      "train_len": _TRAIN_LEN.value, "repeats": _REPEATS.value,
      "jax_shapes": {k: list(v["input_ids"].shape) for k, v in batches_np.items()},
      "torch_shapes": {k: list(v["input_ids"].shape) for k, v in torch_batches_np.items()},
      "jax": {"version": jax.__version__, "devices": str(jax.devices()),
              "variant": _VARIANTS.value[0]},
      "jax_variants": {}, "torch": None, "ratio_forward": None, "ratio_train": None,
  }
  # The forward the corpus embedding runs (staged on CPU), on the same batch.
  corpus_forward = make_corpus_apply(module)
  fb = batches["forward"]
  corpus_args = (params, fb["input_ids"], fb["attention_mask"], fb["token_type_ids"])
  calls["corpus/forward"] = lambda: jax.block_until_ready(corpus_forward(*corpus_args))
  try:
    torch_mod = __import__("torch")
  except ImportError:
    torch_mod = None
    print("PyTorch not installed (pip install -e '.[bench]'): timing JAX alone.")
  if torch_mod is not None:
    torch, t_forward, t_train, to_torch = torch_fns(
        resolve_model_path(_MODEL.value), _THREADS.value)
    torch_batches = {k: to_torch(v) for k, v in torch_batches_np.items()}
    w_t = torch.from_numpy(w_np)
    # Agreement first, for every variant: a fast wrong model proves nothing.
    ref_fwd = t_forward(torch_batches["forward"]).numpy()
    ref_loss = {name: float(t_train(torch_batches[name], w_t)) for name in trains}
    for variant, fns in compiled.items():
      diff_fwd = float(np.abs(np.asarray(fns["forward"](params, batches["forward"]))
                              - ref_fwd).max())
      diff_loss = max(abs(float(fns[name](params, batches[name], w_j)[0]) - ref_loss[name])
                      for name in trains)
      result.setdefault("max_abs_diff_forward", {})[variant] = diff_fwd
      result.setdefault("abs_diff_train_loss", {})[variant] = diff_loss
      if diff_fwd > _ATOL.value or diff_loss > _ATOL.value * _BATCH.value:
        raise SystemExit(f"JAX ({variant}) and PyTorch disagree: forward max |diff| "
                         f"{diff_fwd:.2e}, train loss |diff| {diff_loss:.2e} "
                         f"(atol {_ATOL.value}).")
    diff_corpus = float(np.abs(np.asarray(corpus_forward(*corpus_args)) - ref_fwd).max())
    result.setdefault("max_abs_diff_forward", {})["corpus"] = diff_corpus
    if diff_corpus > _ATOL.value:
      raise SystemExit(f"JAX (corpus forward) and PyTorch disagree: forward max |diff| "
                       f"{diff_corpus:.2e} (atol {_ATOL.value}).")
    calls["torch/forward"] = lambda: t_forward(torch_batches["forward"])
    for name in trains:
      calls[f"torch/{name}"] = functools.partial(t_train, torch_batches[name], w_t)
    result["torch"] = {"version": torch.__version__, "threads": torch.get_num_threads()}

  times = alternate(calls, _REPEATS.value, _WARMUP.value)
  for name, seconds in times.items():
    who, what = name.split("/")
    if who == "torch":
      result["torch"][what] = summary(seconds)
    elif who == "corpus":
      result["jax_corpus_forward"] = summary(seconds)
    else:
      entry = result["jax_variants"].setdefault(who, {"compiler_options": VARIANTS[who]})
      entry[what] = summary(seconds)
  # The first variant is "jax" in the result and in the ratios; every variant has
  # its own ratios under "jax_variants".
  result["jax"].update({k: result["jax_variants"][_VARIANTS.value[0]][k]
                        for k in ["forward"] + trains})
  if result["torch"] is not None:
    for entry in [result] + list(result["jax_variants"].values()):
      jax_entry = entry["jax"] if entry is result else entry
      for name in ["forward"] + trains:
        entry[f"ratio_{name}"] = (jax_entry[name]["median_s"]
                                  / result["torch"][name]["median_s"])
    result["ratio_forward_corpus"] = (result["jax_corpus_forward"]["median_s"]
                                      / result["torch"]["forward"]["median_s"])
  result["load_average"] = os.getloadavg()
  result["host_heap_kept"] = host_memory.applied  # both frameworks share the process
  result["cpu_model"], result["tuned"] = platform.cpu_model(), dict(platform.tuned)
  text = json.dumps(result, indent=2)
  print(text)
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  write_text_atomic(_OUT.value, text + "\n")


if __name__ == "__main__":
  run_main(main)
