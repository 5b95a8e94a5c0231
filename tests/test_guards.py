"""Runs that would go silently wrong are stopped: non-finite steps, full disks, two runs on
one workdir, and in-loop evaluation of a stale index."""

import builtins
import dataclasses
import errno
import json
import os
import pathlib
import signal
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from qdr_jax import experiment, io_utils
from qdr_jax.index.build import build_quantized
from qdr_jax.io_utils import WorkdirLockedError, workdir_lock
from qdr_jax.quant import quantizer_from_faiss, stored_codes
from qdr_jax.train import loop
from qdr_jax.train import step as step_module
from qdr_jax.train.checkpoint import Checkpointer, checkpoint_dir
from qdr_jax.train.restore import restore_trained

REPO = pathlib.Path(__file__).resolve().parents[1]


def _records(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _leftovers(directory):
  """Temp files of atomic writes left in ``directory``."""
  return sorted(p.name for p in pathlib.Path(directory).iterdir() if p.name.endswith(".tmp"))


# ------------------------------------------------------------------ non-finite guard

def test_zero_temperature_stops_at_the_first_step_and_saves_nothing(tiny_config, tmp_path,
                                                                   monkeypatch):
  # The validation pass refuses temperature 0 up front (tests/test_validation.py); with it
  # out of the way, the loop's own guard must still stop at the first step.
  monkeypatch.setattr(experiment, "validate_config", lambda *args, **kwargs: [])
  tiny_config.loss.temperature = 0.0
  tiny_config.train.steps = 4
  tiny_config.checkpoint.every = 1
  workdir = tmp_path / "run"
  with pytest.raises(loop.NonFiniteError,
                     match=r"^loss is nan at step 1: config.loss.temperature \(0.0\) must be "
                           r"> 0; also check the learning rates \(optim.encoder_lr=0.003, "
                           r"optim.row_lr=0.01\)\. Nothing of this step was saved\.$"):
    experiment.train_and_evaluate(tiny_config, workdir)
  assert not (workdir / "results.json").exists()
  assert not checkpoint_dir(workdir).exists() or not any(checkpoint_dir(workdir).iterdir())
  logged = _records(workdir) if (workdir / "metrics.jsonl").exists() else []
  assert [r for r in logged if "loss" in r] == []


def _poison_step(monkeypatch, at_step: int, what: str):
  """Makes the update of step ``at_step`` (1-based) return a NaN loss or a NaN row."""
  real = loop.make_step_functions

  def make(*args, **kwargs):
    fns = real(*args, **kwargs)

    def update(state, encoder_vjp, query_emb, pool, *rest):
      new, metrics = fns.update(state, encoder_vjp, query_emb, pool, *rest)
      if int(new.step) == at_step:
        if what == "loss":
          metrics = {**metrics, "loss": jnp.float32(jnp.nan)}
        else:  # a pooled row written as inf, with a finite loss and gradients
          new = new.replace(table=new.table.at[pool["row_ids"][0]].set(jnp.inf))
          # The jitted update checks what it wrote; this write happens after it, so run
          # the same check on the poisoned values.
          metrics = {**metrics, "updates_finite": step_module._written_finite(
              {"table": new.table, "params": new.params}, pool["row_ids"])}
      return new, metrics

    return dataclasses.replace(fns, update=update)

  monkeypatch.setattr(loop, "make_step_functions", make)


@pytest.mark.parametrize("what, message", [
    ("loss", (r"^loss is nan at step 3: check config.loss.temperature \(0.05\) and the "
              r"learning rates")),
    ("rows", (r"^the updated rows, encoder or codebooks hold NaN/inf at step 3: check the "
              r"learning rates .* \(the loss was finite: the update diverged\)")),
])
def test_forced_nan_stops_before_that_step_is_saved(tiny_config, tmp_path, monkeypatch,
                                                    what, message):
  tiny_config.train.steps = 5
  tiny_config.checkpoint.every = 1
  tiny_config.checkpoint.keep = 5
  _poison_step(monkeypatch, 3, what)
  workdir = tmp_path / "run"
  with pytest.raises(loop.NonFiniteError, match=message):
    experiment.train_and_evaluate(tiny_config, workdir)
  # Steps 1 and 2 are saved and logged, step 3 is neither, nor are results.
  assert Checkpointer(checkpoint_dir(workdir), read_only=True).all_steps() == [1, 2]
  assert [r["step"] for r in _records(workdir) if "loss" in r] == [1, 2]
  assert not (workdir / "results.json").exists()


def test_a_nan_between_fetched_steps_is_caught_at_the_next_one(tiny_config, tmp_path,
                                                               monkeypatch):
  # Metrics reach the host at log steps only (3, 6): step 2's NaN loss, which does not
  # carry over to step 3 here, is still reported, by its own step, before step 3 is logged.
  tiny_config.train.steps = 6
  tiny_config.train.log_every = 3
  _poison_step(monkeypatch, 2, "loss")
  workdir = tmp_path / "run"
  with pytest.raises(loop.NonFiniteError,
                     match=r"^loss is nan at step 2: check .* Nothing of this step was saved\. "
                           r"Found at step 3: nothing after step 1 was saved\.$"):
    experiment.train_and_evaluate(tiny_config, workdir)
  logged = _records(workdir) if (workdir / "metrics.jsonl").exists() else []
  assert [r for r in logged if "loss" in r] == []


# ------------------------------------------------------------------ atomic writes

class _FullDisk:
  """A file whose first write stores half of its data, then fails with ENOSPC."""

  def __init__(self, f):
    self._f = f

  def write(self, data):
    self._f.write(data[:len(data) // 2])
    self._f.flush()
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  def __getattr__(self, name):
    return getattr(self._f, name)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._f.close()


def _full_disk_for(monkeypatch, name: str | None = None):
  """Every atomic write (of files named ``name``, if given) hits a full disk."""

  def fake_open(path, mode="r", *args, **kwargs):
    f = builtins.open(path, mode, *args, **kwargs)  # noqa: SIM115 (the caller closes it)
    if "w" in mode and (name is None or os.path.basename(path).startswith(f".{name}.")):
      return _FullDisk(f)
    return f

  monkeypatch.setattr(io_utils, "open", fake_open, raising=False)


def _write_figure(path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots()
  ax.plot([0, 1], [1, 0])
  io_utils.save_figure_atomic(fig, path, dpi=50)
  plt.close(fig)


def _truncate_metrics(path):
  loop.MetricsWriter(path, enabled=True).truncate_after(1)


@pytest.mark.parametrize("name, write", [
    ("results.json", lambda p: io_utils.write_json_atomic(p, {"new": list(range(1000))})),
    ("run.trec", lambda p: io_utils.write_text_atomic(p, "q Q0 d 1 1.0 t\n" * 1000)),
    ("plot.png", _write_figure),
    ("metrics.jsonl", _truncate_metrics),
])
def test_full_disk_keeps_the_previous_file(tmp_path, monkeypatch, name, write):
  path = tmp_path / name
  old = "".join(json.dumps({"step": s}) + "\n" for s in range(1, 4))
  path.write_text(old)
  _full_disk_for(monkeypatch)
  with pytest.raises(OSError) as raised:
    write(path)
  assert raised.value.errno == errno.ENOSPC
  assert path.read_text() == old
  assert _leftovers(tmp_path) == []
  monkeypatch.undo()  # the disk has room again: the same write now completes
  write(path)
  assert path.read_bytes() != old.encode() and _leftovers(tmp_path) == []


def test_full_disk_during_results_leaves_no_results_file(tiny_config, tmp_path, monkeypatch):
  tiny_config.train.mode = "posthoc"  # trains nothing: the write is what is tested
  workdir = tmp_path / "run"
  _full_disk_for(monkeypatch, "results.json")
  with pytest.raises(OSError, match="No space left on device"):
    experiment.train_and_evaluate(tiny_config, workdir)
  assert not (workdir / "results.json").exists()
  assert _leftovers(workdir) == []
  before = json.loads((workdir / "eval_before.json").read_text())  # written before: whole
  assert set(before["before"]["eval"]) >= {"flat", "quantized"}
  monkeypatch.undo()
  results = experiment.train_and_evaluate(tiny_config, workdir)  # the lock was released
  assert json.loads((workdir / "results.json").read_text()) == results


# ------------------------------------------------------------------ workdir lock

def test_a_second_run_on_a_locked_workdir_is_refused_with_the_holders_pid(tiny_config,
                                                                          tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  holder = subprocess.Popen(
      [sys.executable, "-c",
       ("import sys; from qdr_jax.io_utils import workdir_lock\n"
        f"with workdir_lock({str(workdir)!r}):\n"
        "  print('locked', flush=True); sys.stdin.read()")],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
      env={**os.environ, "PYTHONPATH": str(REPO)})
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(WorkdirLockedError,
                       match=rf"^workdir {workdir} is in use by another run \(pid "
                             rf"{holder.pid}, lock {workdir}/\.lock\)"):
      experiment.train_and_evaluate(tiny_config, workdir)
    assert sorted(p.name for p in workdir.iterdir()) == [".lock"]  # nothing else done
  finally:
    holder.send_signal(signal.SIGKILL)  # a crash: the kernel drops its flock
    holder.wait()
  with workdir_lock(workdir):
    assert (workdir / ".lock").read_text() == f"{os.getpid()}\n"
    with pytest.raises(WorkdirLockedError, match=rf"\(pid {os.getpid()},"), \
        workdir_lock(workdir):
      pass
  assert (workdir / ".lock").read_text() == ""  # released: no stale pid
  with workdir_lock(workdir, enabled=False), workdir_lock(workdir):
    pass  # processes other than 0 take nothing


# ------------------------------------------------------------------ in-loop evaluation

def test_in_loop_eval_uses_the_saved_tables_index_and_the_last_step(tiny_config, tmp_path,
                                                                    monkeypatch):
  tiny_config.data.eval_split = "train"
  tiny_config.data.dev_split, tiny_config.data.dev_queries = "dev", 16
  tiny_config.train.steps = 4
  tiny_config.eval.every = 3       # evaluated at 3 and, being the last, at 4
  tiny_config.index.rebuild_every = 100  # the run's index stays the one of the start
  tiny_config.checkpoint.every = 1
  tiny_config.checkpoint.keep = 4
  evaluated = []
  real = experiment.evaluate_index

  def recording(index, *args, **kwargs):
    evaluated.append(stored_codes(index))
    return real(index, *args, **kwargs)

  monkeypatch.setattr(experiment, "evaluate_index", recording)
  workdir = tmp_path / "run"
  experiment.train_and_evaluate(tiny_config, workdir)
  evals = [r for r in _records(workdir) if "eval_quantized" in r]
  assert [r["step"] for r in evals] == [3, 4]
  for (codes, lists), step in zip(evaluated[:2], (3, 4)):
    saved = restore_trained(workdir, step=step)
    want_codes, want_lists = stored_codes(build_quantized(saved["table"], tiny_config.index,
                                                          tiny_config.index.seed))
    np.testing.assert_array_equal(codes, want_codes)
    np.testing.assert_array_equal(lists, want_lists)
    stale_codes, _ = stored_codes(saved["index"])  # the run's index, built at step 0
    assert (stale_codes != codes).any()
  ranked = {r["step"]: r["eval_quantized"]["nDCG@10"] for r in evals}
  best = Checkpointer(checkpoint_dir(workdir), read_only=True, keep_best=1,
                      best_metric="nDCG@10").best_step()
  assert best in ranked and ranked[best] == max(ranked.values())


def test_in_loop_eval_of_learned_codebooks_serves_the_saved_codebooks(tiny_config, tmp_path,
                                                                      monkeypatch):
  tiny_config.train.mode = "jpq"
  tiny_config.data.dev_split, tiny_config.data.dev_queries = "dev", 16
  tiny_config.train.steps = 3
  tiny_config.eval.every = 2
  tiny_config.checkpoint.every = 1
  tiny_config.checkpoint.keep = 3
  evaluated = []
  real = experiment.evaluate_index

  def recording(index, *args, **kwargs):
    evaluated.append(np.asarray(quantizer_from_faiss(index).codebooks))
    return real(index, *args, **kwargs)

  monkeypatch.setattr(experiment, "evaluate_index", recording)
  workdir = tmp_path / "run"
  experiment.train_and_evaluate(tiny_config, workdir)
  assert [r["step"] for r in _records(workdir) if "eval_quantized" in r] == [2, 3]
  for codebooks, step in zip(evaluated[:2], (2, 3)):
    saved = restore_trained(workdir, step=step, extra=("index_params",))
    np.testing.assert_allclose(codebooks, saved["index_params"]["codebooks"], rtol=1e-6)


def test_a_resume_elsewhere_reads_the_before_evaluation_back(tiny_config, tmp_path,
                                                              monkeypatch):
  """The saved "before" figures are keyed by what is computed: a resumed job on another
  coordinator reads them back; another evaluation setting computes them again."""
  monkeypatch.setattr(experiment, "has_checkpoint", lambda workdir: True)
  calls = []

  def compute():
    calls.append(1)
    return {"eval": {"flat": {"nDCG@10": 0.5}}}

  first = experiment._before_metrics(tiny_config, tmp_path, compute, lead=True)
  tiny_config.distributed.coordinator_address = "localhost:12345"
  tiny_config.distributed.timeout_seconds = 30
  assert experiment._before_metrics(tiny_config, tmp_path, compute, lead=True) == first
  assert len(calls) == 1
  tiny_config.eval.depth = 200
  experiment._before_metrics(tiny_config, tmp_path, compute, lead=True)
  assert len(calls) == 2
