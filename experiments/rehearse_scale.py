r"""A million-passage rehearsal through ``experiments/train.py``, measured per phase.

  python experiments/rehearse_scale.py --passages=2000000 --out=runs/rehearsal/2m --dim=768

Writes DPR-format data under ``{out}/data``: a passages TSV of ``--passages`` synthetic
passages made of real words (the MiniLM vocabulary, Zipf-distributed), a training JSON
whose questions repeat words of their positive passage, a QA test file whose answer is
two words of its positive passage, the initial table as random unit rows (``table.npy``,
``--dim`` wide: ``table.init=npy``, so that corpus encoding does not dominate) and a
randomly initialised BERT of hidden size ``--dim`` (``--layers`` layers, the full BERT
vocabulary) as the query encoder. Then it runs the path a user takes:
``experiments/train.py --config=configs/nq.py`` with overrides (`overrides`: the paths,
a smaller index, a few steps, SGD on the rows) as 2 processes x 2 CPU devices on localhost; the
driver SIGKILLs both once the first checkpoint is written, reruns the same commands to
resume, and exports a bundle with ``experiments/export.py``.

Phases are read from process 0's log lines (``train_and_evaluate``'s own):

  load             start -> "evaluating before training" (corpus store, encoder, table)
  eval_before      -> "before: flat ..." (exact search on the devices, one streamed build)
  train_until_kill -> SIGKILL after the first checkpoint (index builds, refreshes, save)
  load_resume, eval_before_resume (read back), resume (restore, train to the end)
  eval_after       "trained to step ..." -> exit (served index, a streamed build, results)
  export           one process

At each boundary the driver reads each process's VmHWM from ``/proc/PID/status`` and
resets it (``/proc/PID/clear_refs``); a phase that ends with the process takes the
``ru_maxrss`` its exit reports (the high-water mark since the last reset). Phases that
end before an exit also record each process's RssAnon and RssFile at their end.
``{out}/rehearsal.json``: ``{"entry", "passages", "dim", "layers", "processes",
"devices_per_process", "argv", "phases": {NAME: {"seconds", "peak_rss_bytes": [one per
process]}}, "faiss_index_bytes", "refreshes", "results"}``.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

from absl import flags

from qdr_jax.cli import run_main

_PASSAGES = flags.DEFINE_integer("passages", 1_000_000, "Synthetic corpus size.")
_OUT = flags.DEFINE_string("out", None, "Output directory (data, caches, runs, results).")
_DIM = flags.DEFINE_integer("dim", 768, "Table width and the query encoder's hidden size.")
_LAYERS = flags.DEFINE_integer("layers", 2, "Layers of the query encoder.")
_STEPS = flags.DEFINE_integer("steps", 3, "Training steps (killed after the first "
                              "checkpoint, a third of them, then resumed).")
_RETAIN_HEAP = flags.DEFINE_bool(
    "retain_heap", False, "Let the processes keep the heap they free (the CPU default, "
    "for speed: up to 2 GiB a process, which each later phase's peak then includes). Off, "
    "the peaks are what the code holds.")

PROCESSES, DEVICES_PER_PROCESS = 2, 2
TRAIN_QUERIES, TEST_QUERIES, WORDS_PER_PASSAGE, QUERY_WORDS = 1000, 500, 24, 5
REPO = pathlib.Path(__file__).absolute().parents[1]
MARKS = {"load": "evaluating before training", "eval_before": "before: flat",
         "train": "trained to step"}


# ----------------------------------------------------------------------------- data


def make_data(root: pathlib.Path, passages: int, dim: int, layers: int, seed: int = 0) -> None:
  """DPR-format data, a random table and a random BERT under ``root`` (kept if present)."""
  if (root / "done").exists():
    return  # before the imports: the driver then stays small beside the job
  import numpy as np

  from qdr_jax.models import (BertEncoder, EncoderConfig, default_model_path, init_params,
                              save_encoder_hf)
  root.mkdir(parents=True, exist_ok=True)
  vocab = (pathlib.Path(default_model_path()) / "vocab.txt").read_text().split("\n")
  words = np.asarray([w for w in vocab if w.isalpha() and w.isascii() and len(w) >= 3])
  rng = np.random.default_rng(seed)
  zipf = 1.0 / np.arange(1, words.size + 1) ** 0.8
  zipf /= zipf.sum()
  chunk = 100_000
  positives = rng.choice(passages, TRAIN_QUERIES + TEST_QUERIES, replace=False)
  wanted = {int(r): i for i, r in enumerate(positives)}
  texts: list[str] = [""] * positives.size
  questions: list[str] = [""] * positives.size
  answers: list[str] = [""] * positives.size
  with (root / "passages.tsv").open("w") as f:
    f.write("id\ttext\ttitle\n")
    for start in range(0, passages, chunk):
      ids = rng.choice(words.size, size=(min(chunk, passages - start), WORDS_PER_PASSAGE),
                       p=zipf)
      lines = []
      for offset, row in enumerate(ids):
        text = " ".join(words[row])
        lines.append(f"{start + offset + 1}\t{text}\t")
        if (i := wanted.get(start + offset)) is not None:
          chosen = rng.choice(WORDS_PER_PASSAGE, QUERY_WORDS, replace=False)
          at = int(rng.integers(WORDS_PER_PASSAGE - 1))
          texts[i], questions[i] = text, " ".join(words[row[chosen]])
          answers[i] = " ".join(words[row[at:at + 2]])
      f.write("\n".join(lines) + "\n")
  records = [{"question": questions[i], "answers": [answers[i]],
              "positive_ctxs": [{"passage_id": str(int(positives[i]) + 1), "title": "",
                                 "text": texts[i]}],
              "negative_ctxs": [], "hard_negative_ctxs": []} for i in range(TRAIN_QUERIES)]
  (root / "train.json").write_text(json.dumps(records))
  with (root / "test.csv").open("w") as f:
    for i in range(TRAIN_QUERIES, positives.size):
      f.write(f"{questions[i]}\t{[answers[i]]!r}\n")
  table = np.lib.format.open_memmap(root / "table.npy", "w+", np.float32, (passages, dim))
  for start in range(0, passages, chunk):
    rows = rng.standard_normal((min(chunk, passages - start), dim), np.float32)
    table[start:start + rows.shape[0]] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
  table.flush()
  del table
  config = EncoderConfig(vocab_size=30522, hidden_size=dim, num_layers=layers,
                         num_heads=max(1, dim // 64), intermediate_size=4 * dim,
                         max_position_embeddings=512, type_vocab_size=2, pooling="cls")
  import jax
  params = init_params(BertEncoder(config), jax.random.key(seed))
  save_encoder_hf(str(root / "encoder"), config, params, tokenizer_dir=default_model_path())
  (root / "done").write_text("ok")


def overrides(out: pathlib.Path, passages: int, steps: int) -> list[str]:
  """``configs/nq.py`` pointed at the synthetic data, with a few steps, a bfloat16 table,
  a smaller index of the same family (``IVF256_HNSW32,PQ32x8`` trained on 10,240 rows,
  nprobe 32; the recipe's ``IVF4096_HNSW128,PQ128x8`` trains on 262,144: minutes on 2
  cores), k = 500 and SGD on the rows: a float32 table with per-row Adam moments (three
  times the table, and an asynchronous save copies them too) does not fit in the 24 GiB
  of the machine the rehearsal ran on at 2M x 768; the projection adds them."""
  data = out / "data"
  every = max(1, steps // 3)
  return [
      f"--config.data.name=rehearsal-{passages}", f"--config.data.corpus={data}/passages.tsv",
      f"--config.data.splits.train={data}/train.json",
      f"--config.data.splits.dev={data}/test.csv", f"--config.data.splits.test={data}/test.csv",
      "--config.data.dev_split=", f"--config.data.cache_dir={out}/corpus_cache",
      f"--config.model.query_encoder={data}/encoder", "--config.model.passage_encoder=",
      "--config.model.max_query_length=32", "--config.model.max_passage_length=64",
      "--config.table.init=npy", f"--config.table.path={data}/table.npy",
      "--config.optim.row_optimizer=sgd", "--config.table.dtype=bfloat16",
      "--config.index.factory=IVF256_HNSW32,PQ32x8", "--config.index.train_size=10240",
      "--config.index.nprobe=32",
      f"--config.index.rebuild_every={every}",
      f"--config.index.full_rebuild_every={2 * every}",
      "--config.negatives.k=500", f"--config.train.steps={steps}", "--config.train.log_every=1",
      f"--config.checkpoint.every={every}", "--config.eval.concurrent_builds=1",
  ]


# ----------------------------------------------------------------------------- measuring


def peak_rss(pid: int) -> int:
  status = pathlib.Path(f"/proc/{pid}/status").read_text()
  return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def rss_parts(pid: int) -> dict[str, int]:
  """The current RSS split into anonymous memory and file-backed pages (the memory-mapped
  table's among them, which VmHWM counts too)."""
  status = pathlib.Path(f"/proc/{pid}/status").read_text()
  return {k: int(re.search(rf"{k}:\s+(\d+) kB", status).group(1)) * 1024
          for k in ("RssAnon", "RssFile")}


def reset_peak_rss(pid: int) -> None:
  with open(f"/proc/{pid}/clear_refs", "w") as f:
    f.write("5")  # VmHWM := the current RSS


class Job:
  """Processes started together; records each phase's seconds and peak RSS per process."""

  def __init__(self, out: pathlib.Path, name: str, commands: list[list[str]], env: dict):
    self.logs = [out / f"{name}-{i}.log" for i in range(len(commands))]
    self.procs = [subprocess.Popen(c, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                                   cwd=REPO) for c, log in zip(commands, self.logs)]
    self.phases: dict[str, dict] = {}
    self.started = time.perf_counter()
    self.codes: list[int | None] = [None] * len(self.procs)
    self.peaks: list[int | None] = [None] * len(self.procs)

  def mark(self, phase: str) -> None:
    """Ends ``phase`` now: each live process's VmHWM, then a reset for the next one."""
    peaks, parts = [], []
    for proc in self.procs:
      peaks.append(peak_rss(proc.pid))
      parts.append(rss_parts(proc.pid))
      reset_peak_rss(proc.pid)
    self._record(phase, peaks)
    self.phases[phase]["rss_at_end"] = parts

  def _record(self, phase: str, peaks: list[int]) -> None:
    now = time.perf_counter()
    self.phases[phase] = {"seconds": now - self.started, "peak_rss_bytes": peaks}
    self.started = now

  def poll(self) -> bool:
    """Reaps exited processes (their ``ru_maxrss``: the peak since the last reset);
    True once all have."""
    for i, proc in enumerate(self.procs):
      if self.codes[i] is None:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
          self.codes[i] = os.waitstatus_to_exitcode(status)
          proc.returncode = self.codes[i]
          self.peaks[i] = usage.ru_maxrss * 1024
    return all(c is not None for c in self.codes)

  def lead_log(self) -> str:
    return self.logs[0].read_text(errors="replace")

  def run(self, marks: list[tuple[str, str]], final: str | None = None,
          until=None) -> None:
    """Marks each ``(phase, line)`` as ``line`` appears in process 0's log; then, with
    ``until`` (a callable), calls it and returns; else waits for the exit (``final``: the
    phase that ends with it)."""
    pending = list(marks)
    while True:
      text = self.lead_log()
      while pending and pending[0][1] in text:
        self.mark(pending.pop(0)[0])
      if until is not None and not pending and until():
        return
      if self.poll():
        break
      time.sleep(0.2)
    bad = [(i, c) for i, c in enumerate(self.codes) if c != 0]
    if bad:
      raise RuntimeError(f"process {bad[0][0]} exited with {bad[0][1]}; see "
                         f"{self.logs[bad[0][0]]}")
    if pending:
      raise RuntimeError(f"{self.logs[0]} never logged {pending[0][1]!r}")
    if final is not None:
      self._record(final, self.peaks)

  def kill(self, phase: str) -> None:
    peaks = [peak_rss(p.pid) for p in self.procs]
    parts = [rss_parts(p.pid) for p in self.procs]
    for proc in self.procs:
      proc.send_signal(signal.SIGKILL)
    for proc in self.procs:
      proc.wait()
    self._record(phase, peaks)
    self.phases[phase]["rss_at_end"] = parts


# ----------------------------------------------------------------------------- driver


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
  env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  env.setdefault("HF_HUB_OFFLINE", "1")
  env["QDR_JAX_RETAIN_HEAP"] = "1" if _RETAIN_HEAP.value else "0"
  return env


def train_commands(out: pathlib.Path, argv: list[str], port: int) -> list[list[str]]:
  return [[sys.executable, str(REPO / "experiments" / "train.py"), "--config=configs/nq.py",
           f"--workdir={out / 'run'}", *argv,
           f"--config.distributed.coordinator_address=localhost:{port}",
           f"--config.distributed.num_processes={PROCESSES}",
           f"--config.distributed.process_id={i}", "--config.distributed.cpu_collectives=gloo"]
          for i in range(PROCESSES)]


def faiss_index_bytes(out: pathlib.Path) -> dict:
  """Sizes of the FAISS index files the run wrote (process 0 holds them in memory)."""
  files = sorted((out / "run").rglob("*.faiss")) + sorted((out / "bundle").rglob("*.faiss"))
  return {str(p.relative_to(out)): p.stat().st_size for p in files}


def refreshes(out: pathlib.Path) -> list[dict]:
  """The index refreshes process 0 logged during training (both runs), with seconds."""
  found = []
  for name in ("first", "resume"):
    for kind, step, rows, seconds in re.findall(
        r"index (\w+) refresh at step (\d+): (\d+) rows in ([\d.]+)s",
        (out / f"{name}-0.log").read_text(errors="replace")):
      found.append({"run": name, "kind": kind, "step": int(step), "rows": int(rows),
                    "seconds": float(seconds)})
  return found


def driver_main(out: pathlib.Path) -> None:
  out.mkdir(parents=True, exist_ok=True)
  for stale in ("run", "bundle"):
    shutil.rmtree(out / stale, ignore_errors=True)
  start = time.perf_counter()
  make_data(out / "data", _PASSAGES.value, _DIM.value, _LAYERS.value)
  phases: dict = {"make_data": {"seconds": time.perf_counter() - start, "peak_rss_bytes": []}}
  argv = overrides(out, _PASSAGES.value, _STEPS.value)
  env = _env(DEVICES_PER_PROCESS)
  first_checkpoint = out / "run" / "checkpoints" / str(max(1, _STEPS.value // 3))

  def checkpointed() -> bool:
    # Orbax renames a step directory into place when complete; a second later the kill
    # lands in the steps after it.
    if first_checkpoint.is_dir():
      time.sleep(1.0)
      return True
    return False

  # One coordinator address for both runs, as a rerun of the same command has.
  port = _free_port()
  job = Job(out, "first", train_commands(out, argv, port), env)
  job.run([("load", MARKS["load"]), ("eval_before", MARKS["eval_before"])],
          until=checkpointed)
  job.kill("train_until_kill")
  phases.update(job.phases)
  job = Job(out, "resume", train_commands(out, argv, port), env)
  job.run([("load_resume", MARKS["load"]), ("eval_before_resume", MARKS["eval_before"]),
           ("resume", MARKS["train"])], final="eval_after")
  phases.update(job.phases)
  job = Job(out, "export", [[sys.executable, str(REPO / "experiments" / "export.py"),
                             f"--workdir={out / 'run'}", f"--out={out / 'bundle'}"]], env)
  job.run([], final="export")
  phases.update(job.phases)
  results = json.loads((out / "run" / "results.json").read_text())
  result = {"entry": "experiments/train.py", "config": "configs/nq.py",
            "passages": _PASSAGES.value, "dim": _DIM.value, "layers": _LAYERS.value,
            "steps": _STEPS.value, "processes": PROCESSES,
            "devices_per_process": DEVICES_PER_PROCESS, "retain_heap": _RETAIN_HEAP.value,
            "argv": argv, "phases": phases,
            "faiss_index_bytes": faiss_index_bytes(out), "refreshes": refreshes(out),
            "results": {k: results.get(k) for k in ("before", "after", "seconds_per_step",
                                                    "train_seconds", "index")}}
  (out / "rehearsal.json").write_text(json.dumps(result, indent=1))
  print(json.dumps({k: result[k] for k in ("passages", "dim", "phases")}, indent=1))


def main(argv):
  del argv
  driver_main(pathlib.Path(_OUT.value).absolute())


if __name__ == "__main__":
  flags.mark_flag_as_required("out")
  run_main(main)
