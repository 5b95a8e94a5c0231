"""Seen / unseen query subsets, per-subset means, paired sign-flip tests, and
`compare_modes` over training seeds."""

import json

import numpy as np
import pytest

from qdr_jax.data.types import Corpus, Queries, Split
from qdr_jax.eval.compare import (paired_comparison, paired_test, sign_flip_p_value,
                                  summarize_seeds)
from qdr_jax.eval.evaluator import evaluate_index, score_index
from qdr_jax.eval.metrics import ranking_metrics, share_in_top, split_seen, subset_means
from qdr_jax.eval.report import before_after_table, compare_table, subset_table
from qdr_jax.index import build_index

TRAIN_QRELS = {"t1": {"d1": 1, "d2": 0}, "t2": {"d3": 2}, "t3": {"d4": 0}}
TEST_QRELS = {
    "a": {"d1": 1, "d9": 1},   # d1 was a training positive: seen
    "b": {"d2": 1},            # d2 was judged in training, but not relevant: unseen
    "c": {"d4": 1, "d3": 0},   # d3 was a training positive, but is not one of c's: unseen
    "d": {"d3": 1},            # seen
    "e": {"d7": 1},            # unseen
}


def test_share_in_top_by_hand():
  member = np.array([True, False, False, True, False])
  # 3 of the 5 returned rows are members; the -1 (no result) is not counted.
  assert share_in_top(np.array([[0, 1, 3], [3, 2, -1]]), member) == pytest.approx(3 / 5)
  assert share_in_top(np.full((2, 3), -1), member) == 0.0
  with pytest.raises(ValueError, match="row 5 is outside the 5 rows"):
    share_in_top(np.array([[5]]), member)


def test_split_seen_by_hand():
  assert split_seen(TEST_QRELS, TRAIN_QRELS) == (["a", "d"], ["b", "c", "e"])
  # Given query ids set the order; a query without qrels has no trained positive.
  assert split_seen(TEST_QRELS, TRAIN_QRELS, ["e", "x", "d"]) == (["d"], ["e", "x"])
  assert split_seen(TEST_QRELS, {}) == ([], ["a", "b", "c", "d", "e"])


def test_subset_means_by_hand():
  query_ids = ["a", "b", "c", "d"]
  per_query = {"R@10": np.array([1.0, 0.0, 0.5, np.nan]),  # d not judged by R@10
               "top5": np.array([1.0, 1.0, 0.0, 0.0])}
  got = subset_means(query_ids, per_query,
                     {"seen": ["a", "c", "zz"], "unseen": ["b", "d"], "only_d": ["d"],
                      "empty": []})
  assert got == {
      "seen": {"count": 2, "R@10": 0.75, "top5": 0.5},
      "unseen": {"count": 2, "R@10": 0.0, "top5": 0.5},
      "only_d": {"count": 1, "R@10": None, "top5": 0.0},
      "empty": {"count": 0, "R@10": None, "top5": None},
  }


def _synthetic(n_docs=300, n_queries=40, dim=16):
  rng = np.random.default_rng(1)
  table = rng.standard_normal((n_docs, dim)).astype(np.float32)
  targets = rng.integers(0, n_docs, n_queries)
  q = table[targets] + 0.8 * rng.standard_normal((n_queries, dim)).astype(np.float32)
  corpus = Corpus(ids=[f"d{i}" for i in range(n_docs)], titles=[""] * n_docs,
                  texts=[f"text {i} answer{i}" for i in range(n_docs)])
  qids = [f"q{i}" for i in range(n_queries)]
  # The last 5 queries have answers but no qrels.
  qrels = {qid: {f"d{t}": 1} for qid, t in zip(qids[:-5], targets)}
  answers = {qid: [f"answer{t}"] for qid, t in zip(qids, targets)}
  return build_index(table, "PQ4x4", seed=0, threads=1), q, Split(
      Queries(ids=qids, texts=[""] * n_queries), qrels, answers), corpus


def test_subset_means_match_a_separate_evaluation_of_each_subset():
  index, q, split, corpus = _synthetic()
  measures = ("nDCG@10", "R@10")
  scores = score_index(index, q, split, corpus, depth=50, measures=measures, answer_ks=(5,))
  assert scores.metrics == evaluate_index(index, q, split, corpus, depth=50,
                                          measures=measures, answer_ks=(5,))
  assert np.isnan(scores.per_query["nDCG@10"][-5:]).all()
  half = scores.query_ids[::2]
  got = subset_means(scores.query_ids, scores.per_query, {"half": half})["half"]
  run = {qid: ranked for qid, ranked in
         evaluate_index(index, q, split, corpus, depth=50, measures=measures,
                        answer_ks=(5,), return_run=True)[1].items()}
  judged = {qid: split.qrels[qid] for qid in half if qid in split.qrels}
  want = ranking_metrics(judged, run, measures)
  assert got["count"] == len(half)
  for m in measures:
    assert got[m] == pytest.approx(want[m], abs=1e-12)
  rows = [scores.query_ids.index(qid) for qid in half]
  assert got["top5"] == pytest.approx(np.mean(scores.per_query["top5"][rows]), abs=1e-12)


def test_sign_flip_exact_p_values():
  # 3 positive differences: only the all-plus and all-minus of 8 sign vectors reach |6|.
  assert sign_flip_p_value([1.0, 2.0, 3.0]) == 0.25
  # |sum(s*d)| >= 2 for d = (1, 1, 2, 2): sums are 6,4,2,2,2,0,0,-2,... -> 12 of 16.
  signs = np.array([[a, b, c, e] for a in (1, -1) for b in (1, -1) for c in (1, -1)
                    for e in (1, -1)])
  want = np.mean(np.abs(signs @ np.array([1, 1, -2, 2])) >= 2)
  assert sign_flip_p_value([1, 1, -2, 2]) == want == 0.75
  assert sign_flip_p_value([0.0, 0.0]) == 1.0
  assert sign_flip_p_value([]) is None
  # Ten equal positive differences: p = 2 / 2**10 exactly; sampling agrees.
  assert sign_flip_p_value(np.full(10, 0.1)) == 2 / 1024
  sampled = sign_flip_p_value(np.full(10, 0.1), exact_max=4, samples=50_000)
  assert sampled == pytest.approx(2 / 1024, abs=1e-3)
  mixed = np.random.default_rng(0).standard_normal(12) + 0.3
  assert sign_flip_p_value(mixed, exact_max=4, samples=50_000) == pytest.approx(
      sign_flip_p_value(mixed), abs=0.01)
  assert paired_test([0.5, 0.7, 0.9], [0.4, 0.5, 0.6]) == {
      "n": 3, "mean_diff": pytest.approx(0.2), "p": 0.25}


def _after(cells, per_query, query_ids=("x", "y", "z")):
  """An `evaluate_table` "after" result with `cells` quantized values (one per index seed)."""
  return {"quantized": {"m": float(np.mean(cells))}, "quantized_std": {"m": float(np.std(cells))},
          "quantized_per_seed": [{"m": c} for c in cells],
          "per_query": {"metric": "m", "query_ids": list(query_ids), "flat": [0, 0, 0],
                        "quantized": per_query},
          "subsets": {"all": {"count": 3, "quantized": {"m": float(np.mean(cells))},
                              "quantized_std": {"m": 0.0}},
                      "unseen": {"count": 0, "quantized": {"m": None},
                                 "quantized_std": {"m": None}}}}


def test_summarize_seeds_and_paired_comparison_by_hand():
  mode = [_after([0.5, 0.7], [[1, 0, 1], [1, 1, 0]]), _after([0.6, 0.6], [[1, 0, 0], [1, 1, 1]])]
  ref = [_after([0.4, 0.5], [[0, 0, 1], [1, 0, 0]]), _after([0.5, 0.4], [[1, 0, 0], [0, 1, 1]])]
  stats = summarize_seeds(mode)
  assert stats["mean"] == {"m": pytest.approx(0.6)} and stats["std"] == {"m": pytest.approx(0.0)}
  assert stats["per_training_seed"] == [{"m": 0.6}, {"m": 0.6}]
  assert stats["min"] == stats["max"] == {"m": 0.6}
  assert stats["spread_over"] == "training seeds"
  assert stats["subsets"]["unseen"] == {"count": 0, "quantized": {"m": None},
                                        "quantized_std": {"m": None}}
  one = summarize_seeds(mode[:1])
  assert one["spread_over"] == "index seeds" and one["min"] == {"m": 0.5}
  assert one["max"] == {"m": 0.7} and one["std"] == {"m": pytest.approx(0.1)}

  got = paired_comparison(mode, ref, "m", {"first": ["x"], "none": []})
  # Cells: differences 0.1, 0.2, 0.1, 0.2, all positive: exact p = 2 / 16.
  assert got["cells"] == {"n": 4, "mean_diff": pytest.approx(0.15), "p": 0.125}
  # Per query, differences averaged over the 4 cells: x 2/4, y 1/4, z 0.
  assert got["queries"]["all"]["mean_diff"] == pytest.approx(0.25)
  assert got["queries"]["all"]["p"] == 0.5  # |0.5 +- 0.25 +- 0| >= 0.75 in 2 of 8
  assert got["queries"]["first"] == {"n": 1, "mean_diff": pytest.approx(0.5), "p": 1.0}
  assert got["queries"]["none"] == {"n": 0, "mean_diff": None, "p": None}
  other_queries = [_after([0.4, 0.5], [[0, 0], [1, 0]], ("x", "w"))] * 2
  assert "queries" not in paired_comparison(mode, other_queries, "m")
  with pytest.raises(ValueError, match="same seeds"):
    paired_comparison(mode, ref[:1], "m")


def test_tables_show_empty_subsets_as_dashes():
  evaluation = {"subsets": {
      "all": {"count": 3, "flat": {"m": 0.5}, "quantized": {"m": 0.4},
              "quantized_std": {"m": 0.01}},
      "unseen": {"count": 0, "flat": {"m": None}, "quantized": {"m": None},
                 "quantized_std": {"m": None}}}}
  text = subset_table({"before": evaluation, "after": evaluation}, "m")
  lines = text.splitlines()
  assert lines[0].split() == ["m", "on", "flat", "before", "quantized", "before", "flat",
                              "after", "quantized", "after"]
  assert lines[2].split() == ["all", "(n=3)", "0.5000", "0.4000±0.010", "0.5000",
                              "0.4000±0.010"]
  assert lines[3].split() == ["unseen", "(n=0)", "-", "-", "-", "-"]
  assert max(len(line) for line in lines) <= 100
  results = {"config": {"eval": {"primary_metric": "m"}},
             **{when: {"flat": {"m": 0.5}, "quantized": {"m": 0.4}, **evaluation}
                for when in ("before", "after")}}
  assert text in before_after_table(results)


def test_compare_modes_over_two_training_seeds(tiny_config, tmp_path):
  from qdr_jax.data.loader import load_dataset
  from qdr_jax.eval.compare import plot_comparison
  from qdr_jax.experiment import compare_modes
  tiny_config.train.steps = 3
  tiny_config.index.rebuild_every = 3
  tiny_config.eval.index_seeds = (0, 1)
  summary = compare_modes(tiny_config, tmp_path, [4], ["query_only", "dback"], seeds=2)
  assert summary["training_seeds"] == [0, 1] and summary["metric"] == "nDCG@10"
  (entry,) = summary["levels"]
  assert entry["spread_over"] == "training seeds"
  dataset = load_dataset(tiny_config.data)
  seen, unseen = split_seen(dataset.split("test").qrels, dataset.split("train").qrels)
  assert len(seen) + len(unseen) == 32 and seen and unseen
  afters = {}
  for mode in ("query_only", "dback"):
    afters[mode] = []
    for seed in (0, 1):
      saved = json.loads((tmp_path / "pq4" / mode / f"seed{seed}" / "results.json").read_text())
      assert saved["config"]["seed"] == seed
      for when in ("before", "after"):
        subsets = saved[when]["subsets"]
        assert {k: v["count"] for k, v in subsets.items()} == {
            "all": 32, "seen": len(seen), "unseen": len(unseen)}
        assert subsets["all"]["quantized"] == saved[when]["quantized"]
        per_query = saved[when]["per_query"]
        assert per_query["metric"] == "nDCG@10" and len(per_query["quantized"]) == 2
        for values, cell in zip(per_query["quantized"], saved[when]["quantized_per_seed"]):
          assert np.mean(values) == pytest.approx(cell["nDCG@10"], abs=1e-12)
      afters[mode].append(saved["after"])
    per_seed = [a["quantized"] for a in afters[mode]]
    assert entry["modes_per_training_seed"][mode] == per_seed
    assert entry["modes"][mode]["nDCG@10"] == pytest.approx(
        np.mean([m["nDCG@10"] for m in per_seed]))
    assert entry["modes_std"][mode]["nDCG@10"] == pytest.approx(
        np.std([m["nDCG@10"] for m in per_seed]))
    assert entry["modes_min"][mode]["nDCG@10"] == min(m["nDCG@10"] for m in per_seed)
    assert entry["subsets"][mode]["unseen"]["count"] == len(unseen)
  test = entry["paired"]["query_only"]["vs_dback"]
  assert test == paired_comparison(afters["query_only"], afters["dback"], "nDCG@10",
                                   {"seen": seen, "unseen": unseen})
  assert test["cells"]["n"] == 4 and test["queries"]["unseen"]["n"] == len(unseen)
  assert entry["paired"]["dback"] == {"vs_query_only": paired_comparison(
      afters["dback"], afters["query_only"], "nDCG@10", {"seen": seen, "unseen": unseen})}
  assert json.loads((tmp_path / "compare.json").read_text()) == summary
  # The served index: dback's training quantizer (one per seed), query_only's fresh builds.
  served = entry["served"]
  assert all("served" in a and len(a["served"]["quantized_per_seed"]) == 1
             for a in afters["dback"]) and not any("served" in a for a in afters["query_only"])
  assert served["modes"]["dback"]["nDCG@10"] == pytest.approx(
      np.mean([a["served"]["quantized"]["nDCG@10"] for a in afters["dback"]]))
  assert served["modes"]["query_only"] == entry["modes"]["query_only"]
  assert served["flat"]["dback"]["nDCG@10"] == pytest.approx(
      np.mean([a["flat"]["nDCG@10"] for a in afters["dback"]]))
  assert served["subsets"]["dback"]["unseen"]["count"] == len(unseen)
  test = entry["served_paired"]["dback"]["vs_query_only"]
  assert test["cells"]["n"] == 2 and test["queries"]["seen"]["n"] == len(seen)
  text = compare_table(summary["flat_before"], entry, "nDCG@10")
  assert "query_only vs dback" in text and max(map(len, text.splitlines())) <= 100
  assert "The index each mode serves" in text and "served / flat" in text
  plot_comparison(summary, "nDCG@10", tmp_path / "compare.png")
  assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # A rerun reuses the finished runs (their files are untouched) and sums up the same;
  # a run whose config changed (other than its checkpoint settings) trains again.
  first = tmp_path / "pq4" / "dback" / "seed1" / "results.json"
  stamp = first.stat().st_mtime_ns
  tiny_config.checkpoint.keep = 3
  assert compare_modes(tiny_config, tmp_path, [4], ["query_only", "dback"], seeds=2) == summary
  assert first.stat().st_mtime_ns == stamp
  from qdr_jax.experiment import _finished_run, _run_config
  run_cfg = _run_config(tiny_config, 4, "dback",
                        tiny_config.table.cache_dir or str(tmp_path / "cache"), 1)
  assert _finished_run(run_cfg, first.parent)["after"] == afters["dback"][1]
  run_cfg.loss.temperature *= 2
  assert _finished_run(run_cfg, first.parent) is None


def test_compare_mode_spec_adds_learned_index_parameters(tiny_config):
  from qdr_jax.experiment import _run_config
  from qdr_jax.train.modes import mode_from_config
  tiny_config.quant.learn = ("codebooks",)
  run = _run_config(tiny_config, 4, "dback+centroids+codebooks", "/tmp/cache", 7)
  assert run.train.mode == "dback" and tuple(run.quant.learn) == ("codebooks", "centroids")
  assert set(mode_from_config(run).learn) == {"centroids", "codebooks"}
  assert run.seed == 7 and "PQ4" in run.index.factory
  plain = _run_config(tiny_config, 4, "query_only", "/tmp/cache", 0)
  assert plain.train.mode == "query_only" and tuple(plain.quant.learn) == ("codebooks",)


def test_compare_draws_one_kmeans_seed_per_training_seed(tiny_config):
  from qdr_jax.experiment import _run_config
  tiny_config.seed, tiny_config.index.seed = 5, 10
  seeds = [_run_config(tiny_config, 4, "dback", "/tmp/cache", s).index.seed for s in (5, 6, 7)]
  assert seeds == [10, 11, 12]
  assert tiny_config.index.seed == 10  # the shared config is untouched
  pinned = _run_config(tiny_config, 4, "dback@index.seed=3", "/tmp/cache", 7)
  assert pinned.index.seed == 3 and pinned.seed == 7


def test_compare_mode_spec_overrides_config_values_by_their_type(tiny_config):
  from qdr_jax.experiment import _run_config
  from qdr_jax.validation import ConfigError
  spec = ("dback+centroids@loss.distill_weight=0.5@negatives.pseudo_queries=8"
          "@negatives.pseudo_query_source=positive@negatives.overlap=true@eval.index_seeds=3|4")
  run = _run_config(tiny_config, 4, spec, "/tmp/cache", 0)
  assert run.train.mode == "dback" and tuple(run.quant.learn) == ("centroids",)
  assert run.loss.distill_weight == 0.5 and isinstance(run.loss.distill_weight, float)
  assert run.negatives.pseudo_queries == 8 and isinstance(run.negatives.pseudo_queries, int)
  assert run.negatives.pseudo_query_source == "positive" and run.negatives.overlap is True
  assert tuple(run.eval.index_seeds) == (3, 4)
  assert tiny_config.loss.distill_weight == 0.0  # the shared config is untouched
  for bad, named in (("dback@loss.distill_wieght=1", "loss.distill_wieght"),
                     ("dback@negatives.pseudo_queries=0.5", "negatives.pseudo_queries"),
                     ("dback@negatives.overlap=yes", "negatives.overlap"),
                     ("dback@loss.temperature", "KEY=VALUE")):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
      _run_config(tiny_config, 4, bad, "/tmp/cache", 0)


def test_compare_refuses_a_base_config_that_learns_index_parameters(tiny_config, tmp_path):
  # Mode specs add what they learn to the base config's quant.learn: from such a base,
  # "dback" and "query_only" would quietly learn centroids too.
  from qdr_jax.experiment import compare_modes
  from qdr_jax.validation import ConfigError
  base = tiny_config.copy_and_resolve_references()
  base.quant.learn = ("centroids",)
  with pytest.raises(ConfigError, match=r"base config learns index parameters .*'centroids'"):
    compare_modes(base, tmp_path, [4], ["query_only", "dback"])
  assert not any(tmp_path.iterdir())  # refused before any run or file
