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
