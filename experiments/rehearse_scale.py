r"""A million-passage rehearsal of the whole pipeline, on one machine, measured per phase.

  python experiments/rehearse_scale.py --passages=2000000 --out=runs/rehearsal/2m

Synthetic passages made of real words (the MiniLM vocabulary, Zipf-distributed), so the
real tokenizer and encoder run; synthetic queries that repeat words of one known positive
passage; a small randomly initialised BERT (so that embedding takes minutes, not days).
The job runs as ``--processes`` JAX processes of ``--devices_per_process`` CPU devices
on localhost, through the library's own entry points:

  corpus    the BEIR files converted into the Arrow corpus store (memory-mapped)
  embed     sharded, resumable corpus embedding into the memory-mapped table
  train     DBACK with k=500 negatives from an ``IVF..._HNSW32,PQ..x8`` index, an
            incremental refresh and a full rebuild, checkpoints; the driver SIGKILLs
            every process once the first checkpoint is written...
  resume    ...and the rerun resumes from it and finishes training
  evaluate  exact search on the devices (flat) and a streamed quantized index: Recall@100
  refresh   5% of the rows moved: incremental refresh vs full rebuild, time and Recall@100
  export    a serving bundle from the last checkpoint (one process)

``{out}/rehearsal.json``: ``{"passages", "processes", "devices_per_process", "phases":
{NAME: {"seconds", "peak_rss_bytes": [one per process]}}, "device_bytes": [one per
device], "recall_at_100", ...}``. Peak RSS is each process's high-water mark over the
phase (reset at its start through ``/proc/self/clear_refs``); device bytes are the live
arrays on each device at the end of training (CPU devices live in host memory).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

from absl import flags

from qdr_jax.cli import run_main

_PASSAGES = flags.DEFINE_integer("passages", 250_000, "Synthetic corpus size.")
_OUT = flags.DEFINE_string("out", None, "Output directory (data, caches, runs, results).")
_PROCESSES = flags.DEFINE_integer("processes", 2, "JAX processes on localhost.")
_DEVICES = flags.DEFINE_integer("devices_per_process", 2, "CPU devices per process.")
_DIM = flags.DEFINE_integer("dim", 64, "Hidden size (= embedding dimension) of the BERT.")
_STEPS = flags.DEFINE_integer("steps", 40, "Training steps (killed at half, resumed).")
_FACTORY = flags.DEFINE_string("factory", "IVF1024_HNSW32,PQ16x8", "FAISS index factory.")
_MOVED = flags.DEFINE_float("moved_fraction", 0.05, "Rows moved for the refresh benchmark.")
_ROLE = flags.DEFINE_enum("role", "driver", ["driver", "job", "export"], "Internal.")
_STAGE = flags.DEFINE_enum("stage", "first", ["first", "resume"], "Internal: job stage.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "Internal.")
_PORT = flags.DEFINE_integer("port", 0, "Internal: coordinator port.")

TRAIN_QUERIES, TEST_QUERIES, WORDS_PER_PASSAGE, QUERY_WORDS = 2000, 2000, 24, 5


# ----------------------------------------------------------------------------- measuring


class PhaseLog:
  """Appends {"phase", "process", "seconds", "peak_rss_bytes"} lines for this process."""

  def __init__(self, path: pathlib.Path, process: int):
    self.path, self.process = path, process

  def start(self) -> float:
    _reset_peak_rss()
    return time.perf_counter()

  def end(self, phase: str, started: float, **extra) -> None:
    record = {"phase": phase, "process": self.process,
              "seconds": time.perf_counter() - started, "peak_rss_bytes": peak_rss(), **extra}
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")


def _reset_peak_rss(pid: str = "self") -> None:
  with open(f"/proc/{pid}/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current RSS


def peak_rss(pid: str = "self") -> int:
  status = pathlib.Path(f"/proc/{pid}/status").read_text()
  return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def device_bytes() -> dict[int, int]:
  """Bytes of live device buffers per addressable device (id -> bytes)."""
  from qdr_jax.sharding import device_buffer_bytes
  return device_buffer_bytes()


# ----------------------------------------------------------------------------- data


def make_data(root: pathlib.Path, passages: int, dim: int, seed: int = 0) -> None:
  """Synthetic BEIR data and a random BERT encoder under ``root`` (skipped if present)."""
  import numpy as np

  from qdr_jax.models import (BertEncoder, EncoderConfig, default_model_path, init_params,
                              save_encoder_hf)
  if (root / "done").exists():
    return
  root.mkdir(parents=True, exist_ok=True)
  vocab = (pathlib.Path(default_model_path()) / "vocab.txt").read_text().split("\n")
  words = np.asarray([w for w in vocab if w.isalpha() and w.isascii() and len(w) >= 3])
  rng = np.random.default_rng(seed)
  zipf = 1.0 / np.arange(1, words.size + 1) ** 0.8
  zipf /= zipf.sum()
  chunk = 100_000
  positives = rng.choice(passages, TRAIN_QUERIES + TEST_QUERIES, replace=False)
  wanted = {int(r): i for i, r in enumerate(positives)}
  query_words: list[list[str]] = [[] for _ in positives]
  with (root / "corpus.jsonl").open("w") as f:
    for start in range(0, passages, chunk):
      ids = rng.choice(words.size, size=(min(chunk, passages - start), WORDS_PER_PASSAGE),
                       p=zipf)
      lines = []
      for offset, row in enumerate(ids):
        text = " ".join(words[row])
        lines.append(json.dumps({"_id": f"p{start + offset}", "title": "", "text": text}))
        if start + offset in wanted:
          chosen = rng.choice(WORDS_PER_PASSAGE, QUERY_WORDS, replace=False)
          query_words[wanted[start + offset]] = list(words[row[chosen]])
      f.write("\n".join(lines) + "\n")
  (root / "qrels").mkdir(exist_ok=True)
  with (root / "queries.jsonl").open("w") as q, \
       (root / "qrels" / "train.tsv").open("w") as train, \
       (root / "qrels" / "test.tsv").open("w") as test:
    for out in (train, test):
      out.write("query-id\tcorpus-id\tscore\n")
    for i, row in enumerate(positives):
      q.write(json.dumps({"_id": f"q{i}", "text": " ".join(query_words[i])}) + "\n")
      (train if i < TRAIN_QUERIES else test).write(f"q{i}\tp{row}\t1\n")
  config = EncoderConfig.tiny(vocab_size=30522, hidden_size=dim, num_heads=2,
                              intermediate_size=4 * dim, max_position_embeddings=128,
                              pooling="mean", normalize=True)
  import jax
  params = init_params(BertEncoder(config), jax.random.key(seed))
  save_encoder_hf(str(root / "encoder"), config, params, tokenizer_dir=default_model_path())
  (root / "done").write_text("ok")


def rehearsal_config(out: pathlib.Path, passages: int):
  from qdr_jax.config import base_config
  c = base_config()
  c.data.name = f"synthetic-{passages}"
  c.data.root = str(out / "data")
  c.data.cache_dir = str(out / "corpus_cache")
  c.model.query_encoder = str(out / "data" / "encoder")
  c.model.max_query_length = 16
  c.model.max_passage_length = 32
  c.model.embed_batch_size = 256
  c.table.cache_dir = str(out / "cache")
  c.index.factory = _FACTORY.value
  c.index.nprobe = 32
  c.index.ef_search = 64
  c.index.train_size = 100_000
  c.index.rebuild_every = _STEPS.value // 4
  c.index.full_rebuild_every = _STEPS.value // 2
  c.negatives.k = 500
  c.train.batch_size = 32
  c.train.steps = _STEPS.value
  c.train.log_every = 5
  c.checkpoint.every = _STEPS.value // 2
  c.eval.index_seeds = (0,)
  c.sharding.num_devices = 0
  return c


# ----------------------------------------------------------------------------- job


def recall_at(ids, positive_rows, k: int = 100) -> float:
  """Share of queries whose labelled positive is among their first ``k`` results."""
  import numpy as np
  return float(np.mean([row in set(found[:k].tolist())
                        for row, found in zip(positive_rows, ids)]))


def neighbour_recall(ids, exact_ids, k: int = 100) -> float:
  """ANN recall: the share of the exact top-``k`` that the index also returns (what the
  quantization costs, independent of how good the random encoder is)."""
  import numpy as np
  return float(np.mean([len(set(a[:k].tolist()) & set(b[:k].tolist())) / k
                        for a, b in zip(ids, exact_ids)]))


def job_main(out: pathlib.Path) -> None:
  """One process of the training job (``--stage=first`` is killed mid-training)."""
  # Appended: importing qdr_jax put its own XLA:CPU defaults there (qdr_jax/__init__.py).
  os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} "
                             f"--xla_force_host_platform_device_count={_DEVICES.value}").strip()
  config = rehearsal_config(out, _PASSAGES.value)
  if _PROCESSES.value > 1:
    config.distributed.coordinator_address = f"localhost:{_PORT.value}"
    config.distributed.num_processes = _PROCESSES.value
    config.distributed.process_id = _PROCESS_ID.value
    config.distributed.cpu_collectives = "gloo"
  config.lock()
  from qdr_jax import distributed
  distributed.initialize_distributed(config)

  import jax
  import numpy as np

  from qdr_jax import sharding
  from qdr_jax.data.loader import load_dataset
  from qdr_jax.index.exact import exact_search
  from qdr_jax.index.lifecycle import IndexLifecycle
  from qdr_jax.index.searching import search
  from qdr_jax.targets.encoders import embed_passages, embed_queries, load_encoders
  from qdr_jax.targets.table import build_or_load_table
  from qdr_jax.train import checkpoint
  from qdr_jax.train.loop import train
  from qdr_jax.train.modes import get_mode

  checkpoint.ASYNC_SAVE = False  # each save is whole on disk when the driver sees it

  stage = _STAGE.value
  log = PhaseLog(out / f"phases-{stage}.jsonl", jax.process_index())
  t = log.start()
  dataset = load_dataset(config.data)
  log.end("corpus" if stage == "first" else "corpus_reload", t)
  t = log.start()
  encoders = load_encoders(config.model)
  table0 = build_or_load_table(config, dataset.corpus, pathlib.Path(config.table.cache_dir),
                               embed_passages(encoders, config))
  log.end("embed" if stage == "first" else "embed_reload", t)
  t = log.start()
  trained = train(config, get_mode("dback"), dataset, encoders, table0, out / "run")
  rows_on = device_bytes()
  log.end("train" if stage == "first" else "resume", t, device_bytes=rows_on,
          refreshes=[vars(r) for r in trained.lifecycle.history])
  if stage == "first":
    return  # the driver kills the first stage before it gets here

  # Evaluation: the trained table stays on the devices.
  t = log.start()
  mesh = sharding.make_mesh(config.sharding)
  num_rows = len(dataset.corpus)
  split = dataset.split(config.data.eval_split)
  positive_rows = np.asarray([dataset.corpus.row_of[split.positives(q)[0]]
                              for q in split.queries.ids])
  queries = embed_queries(encoders, trained.params, split.queries.texts, config)
  _, flat_ids = exact_search(trained.state.table, queries, 100, mesh, num_rows)
  evaluated = IndexLifecycle(config.index, mesh=mesh, num_rows=num_rows,
                             padded_rows=trained.state.table.shape[0], quantize=True,
                             codes_from_index=True, learn_index=False)
  evaluated.build(trained.state.table)
  recall = {"flat": recall_at(flat_ids, positive_rows)}
  if evaluated.lead:
    quantized_ids = search(evaluated.index, queries, 100)[1]
    recall["quantized"] = recall_at(quantized_ids, positive_rows)
    recall["quantized_of_exact_top100"] = neighbour_recall(quantized_ids, flat_ids)
  log.end("evaluate", t, recall_at_100=recall)

  # Refresh benchmark: move a fraction of the rows, refresh incrementally vs rebuild.
  t = log.start()
  rng = np.random.default_rng(1)
  moved = np.sort(rng.choice(num_rows, int(_MOVED.value * num_rows), replace=False))
  values = sharding.rows_to_host(trained.state.table, moved, mesh)
  values = values + rng.normal(0, 0.02, values.shape).astype(np.float32)
  values /= np.linalg.norm(values, axis=1, keepdims=True)
  table = sharding.set_rows(trained.state.table, moved, values, mesh)
  evaluated.note_updated(moved)
  start = time.perf_counter()
  assert evaluated.maybe_refresh(config.index.rebuild_every, table) == "incremental"
  incremental_seconds = time.perf_counter() - start
  rebuilt = IndexLifecycle(config.index, mesh=mesh, num_rows=num_rows,
                           padded_rows=table.shape[0], quantize=True, codes_from_index=True,
                           learn_index=False)
  start = time.perf_counter()
  rebuilt.build(table)
  full_seconds = time.perf_counter() - start
  refresh = {"moved_rows": int(moved.size), "incremental_seconds": incremental_seconds,
             "full_rebuild_seconds": full_seconds,
             "speedup": full_seconds / incremental_seconds}
  _, exact_ids = exact_search(table, queries, 100, mesh, num_rows)  # of the moved table
  if evaluated.lead:
    for name, index in (("incremental", evaluated.index), ("full", rebuilt.index)):
      found = search(index, queries, 100)[1]
      refresh[f"recall_at_100_{name}"] = recall_at(found, positive_rows)
      refresh[f"exact_top100_recall_{name}"] = neighbour_recall(found, exact_ids)
  log.end("refresh", t, refresh=refresh)
  if jax.process_count() > 1:
    jax.distributed.shutdown()


def export_main(out: pathlib.Path) -> None:
  from qdr_jax.serving import export_bundle
  log = PhaseLog(out / "phases-export.jsonl", 0)
  t = log.start()
  bundle = out / "bundle"
  if bundle.exists():
    import shutil
    shutil.rmtree(bundle)
  export_bundle(out / "run", bundle)
  log.end("export", t)


# ----------------------------------------------------------------------------- driver


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(out: pathlib.Path, role: str, stage: str = "first", processes: int = 1):
  port = _free_port()
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
                      "JAX_PROCESS_ID")}
  env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  env.setdefault("HF_HUB_OFFLINE", "1")
  common = [sys.executable, os.path.abspath(__file__), f"--role={role}", f"--stage={stage}",
            f"--out={out}", f"--passages={_PASSAGES.value}", f"--processes={_PROCESSES.value}",
            f"--devices_per_process={_DEVICES.value}", f"--dim={_DIM.value}",
            f"--steps={_STEPS.value}", f"--factory={_FACTORY.value}",
            f"--moved_fraction={_MOVED.value}", f"--port={port}"]
  logs = []
  procs = []
  for pid in range(processes):
    logs.append((out / f"{role}-{stage}-{pid}.log").open("w"))
    procs.append(subprocess.Popen(common + [f"--process_id={pid}"], stdout=logs[-1],
                                  stderr=subprocess.STDOUT, env=env))
  return procs, logs


def _wait(procs, logs, what: str) -> None:
  for proc in procs:
    if proc.wait() != 0:
      raise RuntimeError(f"{what} failed (exit {proc.returncode}); see {logs[0].name}")
  for f in logs:
    f.close()


def _kill_after_checkpoint(out: pathlib.Path, procs, logs, step: int) -> dict:
  """Waits for the checkpoint of ``step`` to be complete, then SIGKILLs every process."""
  done = out / "run" / "checkpoints" / str(step)
  started = time.perf_counter()
  while not done.is_dir():  # Orbax renames a step directory into place when complete
    if any(p.poll() is not None for p in procs):
      raise RuntimeError(f"the job ended before its step-{step} checkpoint; see {logs[0].name}")
    time.sleep(0.5)
  time.sleep(1.0)  # let the step after the save start, so the kill lands mid-training
  peaks = [peak_rss(str(p.pid)) for p in procs]
  for proc in procs:
    proc.send_signal(signal.SIGKILL)
  for proc in procs:
    proc.wait()
  for f in logs:
    f.close()
  return {"peaks": peaks, "waited_seconds": time.perf_counter() - started}


def driver_main(out: pathlib.Path) -> None:
  out.mkdir(parents=True, exist_ok=True)
  for stale in out.glob("phases-*.jsonl"):
    stale.unlink()
  start = time.perf_counter()
  make_data(out / "data", _PASSAGES.value, _DIM.value)
  data_seconds = time.perf_counter() - start

  started = time.perf_counter()
  procs, logs = _launch(out, "job", "first", _PROCESSES.value)
  killed = _kill_after_checkpoint(out, procs, logs, _STEPS.value // 2)
  first_seconds = time.perf_counter() - started
  procs, logs = _launch(out, "job", "resume", _PROCESSES.value)
  _wait(procs, logs, "the resumed job")
  procs, logs = _launch(out, "export")
  _wait(procs, logs, "the export")

  records = [json.loads(line) for path in sorted(out.glob("phases-*.jsonl"))
             for line in path.read_text().splitlines()]
  phases: dict = {"make_data": {"seconds": data_seconds, "peak_rss_bytes": []}}
  for record in sorted(records, key=lambda r: r["process"]):
    entry = phases.setdefault(record["phase"], {"seconds": 0.0, "peak_rss_bytes": []})
    entry["seconds"] = max(entry["seconds"], record["seconds"])
    entry["peak_rss_bytes"].append(record["peak_rss_bytes"])
  before_kill = sum(phases[p]["seconds"] for p in ("corpus", "embed") if p in phases)
  phases["train_until_kill"] = {"seconds": first_seconds - before_kill,
                                "peak_rss_bytes": killed["peaks"]}
  order = ("make_data", "corpus", "embed", "train_until_kill", "corpus_reload",
           "embed_reload", "resume", "evaluate", "refresh", "export")
  phases = {name: phases[name] for name in order if name in phases}
  by_phase = {r["phase"]: r for r in records if r["process"] == 0}
  devices: dict[int, int] = {}
  for record in records:
    if record["phase"] == "resume":
      devices.update({int(k): v for k, v in record["device_bytes"].items()})
  result = {"passages": _PASSAGES.value, "processes": _PROCESSES.value,
            "devices_per_process": _DEVICES.value, "dim": _DIM.value,
            "factory": _FACTORY.value, "steps": _STEPS.value, "k": 500,
            "phases": phases, "device_bytes": [devices[d] for d in sorted(devices)],
            "recall_at_100": by_phase["evaluate"]["recall_at_100"],
            "refresh": by_phase["refresh"]["refresh"],
            "refreshes_during_training": by_phase["resume"]["refreshes"]}
  (out / "rehearsal.json").write_text(json.dumps(result, indent=1))
  print(json.dumps(result, indent=1))


def main(argv):
  del argv
  out = pathlib.Path(_OUT.value).absolute()
  if _ROLE.value == "job":
    job_main(out)
  elif _ROLE.value == "export":
    export_main(out)
  else:
    driver_main(out)


if __name__ == "__main__":
  flags.mark_flag_as_required("out")
  run_main(main)
