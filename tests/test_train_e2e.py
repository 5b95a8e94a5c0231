"""A short end-to-end training run on tiny data: files written, loss improves."""

import json

import numpy as np
import pytest

from qdr_jax.experiment import train_and_evaluate
from qdr_jax.negatives.source import batch_indices


@pytest.mark.parametrize("overlap", [False, True], ids=["exact", "overlap-incremental"])
def test_short_run_improves_training_loss_and_writes_results(tiny_config, tmp_path, overlap):
  # Scored on the training queries: with a random tiny encoder only what was trained on
  # can be expected to improve; held-out behaviour is measured by the real-data runs.
  tiny_config.data.eval_split = "train"
  tiny_config.negatives.overlap = overlap
  if overlap:  # also exercise incremental refreshes between full rebuilds
    tiny_config.index.full_rebuild_every = 2 * tiny_config.index.rebuild_every
  workdir = tmp_path / "run"
  results = train_and_evaluate(tiny_config, workdir)
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in records if "loss" in r]
  assert len(losses) == tiny_config.train.steps
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
  saved = json.loads((workdir / "results.json").read_text())
  assert saved["steps"] == tiny_config.train.steps
  for when in ("before", "after"):
    for kind in ("flat", "quantized"):
      assert set(saved[when][kind]) == {"nDCG@10", "R@10", "R@100"}
  assert set(saved["seconds_per_step"]) == {"encode", "search", "step", "rebuild"}
  assert results["after"]["flat"]["nDCG@10"] > results["before"]["flat"]["nDCG@10"]
  assert results["after"]["quantized"]["nDCG@10"] > results["before"]["quantized"]["nDCG@10"]


def test_batches_are_shuffled_epochs_by_seed():
  first_epoch = np.concatenate([batch_indices(s, 20, 4, seed=0) for s in range(5)])
  assert sorted(first_epoch.tolist()) == list(range(20))
  second_epoch = np.concatenate([batch_indices(s, 20, 4, seed=0) for s in range(5, 10)])
  assert sorted(second_epoch.tolist()) == list(range(20))
  assert first_epoch.tolist() != second_epoch.tolist()
  np.testing.assert_array_equal(batch_indices(7, 20, 4, seed=0), batch_indices(7, 20, 4, seed=0))
  assert batch_indices(7, 20, 4, seed=1).tolist() != batch_indices(7, 20, 4, seed=0).tolist()


def test_pq_level_substitution():
  from qdr_jax.eval.compare import with_pq_subquantizers
  assert with_pq_subquantizers("IVF64,PQ48x8", 16) == "IVF64,PQ16x8"
  assert with_pq_subquantizers("OPQ48,IVF64_HNSW32,PQ48x8", 16) == "OPQ16,IVF64_HNSW32,PQ16x8"
  with pytest.raises(ValueError, match="no PQ part"):
    with_pq_subquantizers("IVF64,Flat", 16)


def test_compare_modes_trains_each_mode_at_each_level(tiny_config, tmp_path):
  from qdr_jax.eval.compare import plot_comparison
  from qdr_jax.experiment import compare_modes
  tiny_config.train.steps = 6
  tiny_config.index.rebuild_every = 3
  summary = compare_modes(tiny_config, tmp_path, [2, 4], ["posthoc", "dback"])
  assert [e["factory"] for e in summary["levels"]] == ["IVF4,PQ2x8", "IVF4,PQ4x8"]
  assert [e["bytes_per_vector"] for e in summary["levels"]] == [2, 4]
  for entry in summary["levels"]:
    assert set(entry["modes"]) == set(entry["modes_std"]) == {"posthoc", "dback"}
  # posthoc trains nothing: its row is the quantized index before training.
  for level, entry in zip((2, 4), summary["levels"]):
    saved = json.loads((tmp_path / f"pq{level}" / "posthoc" / "results.json").read_text())
    assert entry["modes"]["posthoc"] == saved["before"]["quantized"]
    assert entry["modes"]["dback"] != entry["modes"]["posthoc"]
  assert json.loads((tmp_path / "compare.json").read_text()) == summary
  plot_comparison(summary, "nDCG@10", tmp_path / "compare.png")
  assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_takes_over_the_before_evaluations_index(tiny_config, tmp_path,
                                                          monkeypatch):
  """With index.seed among eval.index_seeds the run trains from the "before" build of that
  seed instead of building it again, and trains exactly as if it had built it."""
  from qdr_jax.index import lifecycle as lifecycle_module
  builds = []
  real_build = lifecycle_module.IndexLifecycle.build

  def counting_build(self, table, step=0):
    builds.append(step)
    return real_build(self, table, step)

  monkeypatch.setattr(lifecycle_module.IndexLifecycle, "build", counting_build)
  tiny_config.train.steps = 20
  adopted = train_and_evaluate(tiny_config, tmp_path / "adopted")
  assert 0 not in builds and builds  # the refreshes still build
  builds.clear()
  tiny_config.eval.index_seeds = (1,)  # index.seed=0 is not evaluated: nothing to take over
  built = train_and_evaluate(tiny_config, tmp_path / "built")
  assert builds[0] == 0
  assert adopted["after"]["flat"] == built["after"]["flat"]
  assert adopted["after"]["served"]["quantized"] == built["after"]["served"]["quantized"]


def _assert_same_figures(got, want, path="results"):
  """Equal structure; numbers equal within 1e-6 (None where None)."""
  if isinstance(want, dict):
    assert set(got) == set(want), path
    for key in want:
      _assert_same_figures(got[key], want[key], f"{path}/{key}")
  elif isinstance(want, (list, tuple)):
    assert len(got) == len(want), path
    for i, (g, w) in enumerate(zip(got, want)):
      _assert_same_figures(g, w, f"{path}[{i}]")
  elif isinstance(want, float) and not isinstance(want, bool):
    assert got == pytest.approx(want, abs=1e-6), path
  else:
    assert got == want, path


def test_evaluation_holds_no_host_copy_of_the_table(tiny_config, tmp_path, monkeypatch):
  """Before and after training, with every way of the whole table to a host refused (the
  trained table's gather to process 0, a Flat or quantized build over a host table, a
  row gather beyond one stream chunk), results.json holds the figures of the evaluation
  over a host copy: flat (exact search on the devices), quantized (streamed builds, one
  per index seed), served, on the evaluated and the dev split."""
  from qdr_jax import experiment, sharding
  from qdr_jax.data.loader import load_dataset
  from qdr_jax.eval import table_eval
  from qdr_jax.index import lifecycle as lifecycle_module
  tiny_config.data.dev_split, tiny_config.data.dev_queries = "dev", 16
  tiny_config.train.steps = 4
  tiny_config.index.train_size = 500  # of 600 rows: the sample is gathered, not the table
  tiny_config.eval.index_seeds = (0, 1)
  chunk = 128
  real_rows_to_host, real_evaluate = sharding.rows_to_host, experiment._evaluate_on_devices
  evaluated = []

  def recording(config, lifecycle, table, queries, corpus, **kwargs):
    out = real_evaluate(config, lifecycle, table, queries, corpus, **kwargs)
    # The host copy the figures are checked against, gathered outside the refusals.
    host = real_rows_to_host(table, np.arange(lifecycle.num_rows), lifecycle.mesh)
    evaluated.append((host, queries, kwargs.get("served_index")))
    return out

  def refused(*args, **kwargs):
    raise AssertionError("the whole table on a host")

  def chunked(table, rows, mesh):
    assert np.size(rows) <= chunk, f"{np.size(rows)} rows gathered at once"
    return real_rows_to_host(table, rows, mesh)

  monkeypatch.setattr(experiment, "_evaluate_on_devices", recording)
  monkeypatch.setattr(lifecycle_module.IndexLifecycle, "table_to_lead", refused)
  monkeypatch.setattr(table_eval, "build_index", refused)
  monkeypatch.setattr(table_eval, "build_quantized_seeds", refused)
  monkeypatch.setattr(lifecycle_module, "STREAM_ROWS", chunk)
  monkeypatch.setattr(sharding, "rows_to_host", chunked)
  results = train_and_evaluate(tiny_config, tmp_path / "run")
  monkeypatch.undo()
  assert len(evaluated) == 2 and "served" in results["after"]
  corpus = load_dataset(tiny_config.data).corpus
  for when, (host, queries, served) in zip(("before", "after"), evaluated):
    want = table_eval.evaluate_splits(host, queries, corpus, tiny_config.index,
                                      tiny_config.eval, served_index=served)
    _assert_same_figures(results[when], want["eval"], when)
    _assert_same_figures(results["dev"][when], want["dev"], f"dev/{when}")
  assert json.loads((tmp_path / "run" / "results.json").read_text())["after"] == json.loads(
      json.dumps(results["after"]))
