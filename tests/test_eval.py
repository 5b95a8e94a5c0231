"""Tests for qdr_jax.eval: ranking metrics, DPR answer matching, TREC runs, index evaluation."""

import math
import os
import pathlib

import numpy as np
import pytest

from qdr_jax.data.types import Corpus, DataFormatError, Queries, Split
from qdr_jax.eval import (
    AnswerMatcher,
    accuracy_from_ranks,
    answer_accuracy,
    evaluate_index,
    has_answer,
    ranking_metrics,
    read_trec_run,
    run_from_search,
    tokenize,
    write_trec_run,
)
from qdr_jax.index import build_index, compression_ratio

# ----------------------------------------------------------------------------- metrics

QRELS = {
    "q1": {"d1": 1, "d2": 1, "d0": 0},
    "q2": {"d3": 2, "d4": 1},
    "q3": {"d5": 1},  # absent from the run: scores 0 everywhere
}
RUN = {
    "q1": {"d9": 0.9, "d1": 0.8, "d8": 0.7, "d2": 0.6, "d0": 0.5},  # relevant at ranks 2, 4
    "q2": {"d4": 0.9, "d7": 0.5, "d3": 0.4},  # rel 1 at rank 1, rel 2 at rank 3
    "q4": {"d1": 1.0},  # not judged: ignored
}


def test_ranking_metrics_by_hand():
  lg = math.log2
  ndcg_q1 = (1 / lg(3) + 1 / lg(5)) / (1 + 1 / lg(3))
  ndcg_q2 = (1 / lg(2) + 2 / lg(4)) / (2 + 1 / lg(3))  # trec_eval gains are the grades
  expected = {
      "MRR@10": (1 / 2 + 1 + 0) / 3,
      "R@1": (0 + 1 / 2 + 0) / 3,
      "R@2": (1 / 2 + 1 / 2 + 0) / 3,
      "R@10": (1 + 1 + 0) / 3,
      "nDCG@10": (ndcg_q1 + ndcg_q2 + 0) / 3,
  }
  got = ranking_metrics(QRELS, RUN, tuple(expected))
  assert list(got) == list(expected)
  for name, value in expected.items():
    assert got[name] == pytest.approx(value, abs=1e-9), name


def test_missing_queries_count_as_zero():
  qrels = {"a": {"x": 1}, "b": {"y": 1}}
  full = ranking_metrics(qrels, {"a": {"x": 1.0}, "b": {"y": 1.0}}, ("MRR@10", "R@10"))
  assert full == {"MRR@10": 1.0, "R@10": 1.0}
  half = ranking_metrics(qrels, {"a": {"x": 1.0}}, ("MRR@10", "R@10"))
  assert half == {"MRR@10": 0.5, "R@10": 0.5}
  # An empty ranking for a query is the same as a missing one.
  assert ranking_metrics(qrels, {"a": {"x": 1.0}, "b": {}}, ("R@10",)) == {"R@10": 0.5}
  assert ranking_metrics(qrels, {}, ("R@10", "nDCG@10")) == {"R@10": 0.0, "nDCG@10": 0.0}


def test_ranking_metrics_errors():
  with pytest.raises(ValueError, match="judged"):
    ranking_metrics({}, RUN)
  with pytest.raises(ValueError, match="Unknown measure"):
    ranking_metrics(QRELS, RUN, ("NotAMeasure@3",))


def test_run_from_search_drops_padding():
  ids = np.array([[2, 0, -1], [1, -1, -1], [-1, -1, -1]])
  scores = np.array([[0.9, 0.5, -np.inf], [0.3, -np.inf, -np.inf], [-np.inf] * 3], np.float32)
  run = run_from_search(["qa", "qb", "qc"], ids, scores, ["x", "y", "z"])
  assert run == {"qa": {"z": pytest.approx(0.9), "x": 0.5}, "qb": {"y": pytest.approx(0.3)},
                 "qc": {}}
  assert list(run["qa"]) == ["z", "x"]  # rank order kept
  with pytest.raises(ValueError, match="corpus size"):
    run_from_search(["q"], np.array([[5]]), np.array([[1.0]]), ["x"])
  with pytest.raises(ValueError, match="len\\(query_ids\\)"):
    run_from_search(["q", "r"], ids[:1], scores[:1], ["x", "y", "z"])


def test_run_from_search_keeps_the_index_order_on_ties():
  # The index put "a" first; trec_eval alone would order the tie by passage id.
  ids, scores = np.array([[0, 1, 2]]), np.array([[0.5, 0.5, 0.5]], np.float32)
  run = run_from_search(["q"], ids, scores, ["a", "b", "c"])
  values = list(run["q"].values())
  assert list(run["q"]) == ["a", "b", "c"] and values[0] > values[1] > values[2]
  assert values[0] == 0.5 and values[2] == pytest.approx(0.5, abs=1e-6)
  assert ranking_metrics({"q": {"a": 1}}, run, ("MRR@10",)) == {"MRR@10": 1.0}
  assert ranking_metrics({"q": {"c": 1}}, run, ("MRR@10",)) == {"MRR@10": pytest.approx(1 / 3)}
  raw = run_from_search(["q"], ids, scores, ["a", "b", "c"], keep_order=False)
  assert list(raw["q"].values()) == [0.5, 0.5, 0.5]


# ----------------------------------------------------------------------------- answers


def test_tokenize_rules():
  assert tokenize("Barack Obama, 1,000 U.S.!") == [
      "barack", "obama", ",", "1", ",", "000", "u", ".", "s", ".", "!"]
  # NFD keeps an accent as a combining mark inside the word token.
  assert tokenize("Café") == tokenize("cafe\u0301") == ["cafe\u0301"]


@pytest.mark.parametrize(
    "answers, text, hit",
    [
        (["Obama"], "Barack Obama was the 44th president.", True),
        (["bam"], "Barack Obama was the 44th president.", False),  # token boundary
        (["Barack Obama"], "the president barack obama said", True),  # case
        (["Obama Barack"], "Barack Obama", False),  # order
        (["Barack was"], "Barack Obama was", False),  # contiguity
        (["Café"], "a cafe\u0301 in Paris", True),  # composed vs decomposed accent
        (["cafe\u0301"], "the CAFÉ opened", True),
        (["cafe"], "the Café opened", False),  # accents are not stripped (as in DPR)
        (["1,000"], "about 1,000 people", True),
        (["1000"], "about 1,000 people", False),
        (["000"], "about 1,000 people", True),  # "," splits the number into tokens
        (["U.S."], "the U.S. army", True),
        (["U.S."], "the US army", False),
        (["(1990)"], "born (1990) in", True),
        (["nope", "army"], "the U.S. army", True),  # any answer
        ([], "anything at all", False),
        ([""], "anything at all", False),  # empty answers never hit
        (["  "], "anything at all", False),
    ],
)
def test_has_answer_known_cases(answers, text, hit):
  assert has_answer(answers, text) is hit


def test_has_answer_rejects_a_bare_string():
  with pytest.raises(TypeError):
    has_answer("Obama", "Obama")


PASSAGES = [
    "Paris is the capital of France.",  # 0
    "Berlin is the capital of Germany.",  # 1
    "The Eiffel Tower is in Paris.",  # 2
    "Nothing relevant here.",  # 3
    "Mount Everest is 8,849 metres high.",  # 4
]


def test_answer_accuracy_by_hand():
  answers = [["Paris"], ["Germany"], ["8,849"], ["Tokyo"], []]
  retrieved = [
      [3, 2, 0],  # first hit at rank 1 (0-based)
      [1, 0, 2],  # rank 0
      [3, 3, 3, 3, 3, 4],  # rank 5
      [0, 1, 2],  # never
      [0, 1],  # no answers: never
  ]
  matcher = AnswerMatcher(PASSAGES, cache_size=2)  # tiny cache: eviction must not matter
  ranks = matcher.first_hit_ranks(answers, retrieved)
  np.testing.assert_array_equal(ranks, [1, 0, 5, -1, -1])
  got = answer_accuracy(answers, retrieved, ks=(1, 2, 5, 6, 100), matcher=matcher)
  assert got == {"top1": 1 / 5, "top2": 2 / 5, "top5": 2 / 5, "top6": 3 / 5, "top100": 3 / 5}
  # Same answer from texts instead of row ids, and from a padded FAISS id array.
  texts = [[PASSAGES[i] for i in row] for row in retrieved]
  assert answer_accuracy(answers, texts, ks=(1, 2, 5, 6, 100)) == got
  padded = np.array([[3, 2, -1], [-1, 1, 0]])
  assert answer_accuracy([["Paris"], ["Germany"]], padded, ks=(1, 2), passages=PASSAGES) == {
      "top1": 0.0, "top2": 1.0}


def test_accuracy_from_ranks_errors():
  assert accuracy_from_ranks(np.array([0, -1]), ks=(1,)) == {"top1": 0.5}
  with pytest.raises(ValueError):
    accuracy_from_ranks(np.array([], dtype=np.int64))
  with pytest.raises(ValueError):
    accuracy_from_ranks(np.array([0]), ks=(0,))


# ----------------------------------------------------------------------------- TREC runs


def test_trec_run_round_trip(tmp_path):
  run = {"q2": {"b": 0.5, "a": 0.5, "c": 1.25}, "q1": {"x": -3.0, "y": 1 / 3}, "q3": {}}
  path = tmp_path / "run.trec"
  write_trec_run(path, run, tag="mytag")
  lines = path.read_text().splitlines()
  assert lines == [
      f"q1 Q0 y 1 {1 / 3!r} mytag",
      "q1 Q0 x 2 -3.0 mytag",
      "q2 Q0 c 1 1.25 mytag",
      "q2 Q0 a 2 0.5 mytag",  # tie broken by passage id
      "q2 Q0 b 3 0.5 mytag",
  ]
  back = read_trec_run(path)
  assert back == {q: d for q, d in run.items() if d}  # exact floats, empty query has no lines
  assert os.listdir(tmp_path) == ["run.trec"]


def test_trec_run_read_errors(tmp_path):
  path = tmp_path / "bad.trec"
  path.write_text("q1 Q0 d1 1 0.5 t\n\nq1 Q0 d2 2 0.4\n")
  with pytest.raises(DataFormatError, match=r"bad\.trec:3: expected 6 columns"):
    read_trec_run(path)
  path.write_text("q1 Q0 d1 1 high t\n")
  with pytest.raises(DataFormatError, match=r"bad\.trec:1: score 'high'"):
    read_trec_run(path)
  path.write_text("q1 Q0 d1 one 0.5 t\n")
  with pytest.raises(DataFormatError, match=r":1: rank 'one'"):
    read_trec_run(path)
  path.write_text("q1 Q0 d1 1 0.5 t\nq1 Q0 d1 2 0.4 t\n")
  with pytest.raises(DataFormatError, match=r":2: passage 'd1' listed twice"):
    read_trec_run(path)
  with pytest.raises(FileNotFoundError):
    read_trec_run(tmp_path / "missing.trec")


def test_trec_run_write_errors(tmp_path):
  with pytest.raises(ValueError, match="whitespace"):
    write_trec_run(tmp_path / "r.trec", {"q 1": {"d": 1.0}})
  with pytest.raises(ValueError, match="tag"):
    write_trec_run(tmp_path / "r.trec", {"q": {"d": 1.0}}, tag="my tag")
  with pytest.raises(OSError):
    write_trec_run(tmp_path / "no_dir" / "r.trec", {"q": {"d": 1.0}})
  assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- evaluate_index

N_DOCS, DIM = 400, 32


@pytest.fixture(scope="module")
def synthetic():
  """Each query is a noisy copy of one passage's vector; that passage is its only positive
  and the only one holding its answer token."""
  rng = np.random.default_rng(0)
  table = rng.standard_normal((N_DOCS, DIM)).astype(np.float32)
  table /= np.linalg.norm(table, axis=1, keepdims=True)
  corpus = Corpus(
      ids=[f"doc{i}" for i in range(N_DOCS)],
      titles=[""] * N_DOCS,
      texts=[f"passage number {i} mentions answer{i} once." for i in range(N_DOCS)])
  targets = rng.permutation(N_DOCS)[:60]
  q = table[targets] + 0.05 * rng.standard_normal((60, DIM)).astype(np.float32)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  qids = [f"q{i}" for i in range(60)]
  queries = Queries(ids=qids, texts=[""] * 60)
  qrels = {qid: {f"doc{t}": 1} for qid, t in zip(qids, targets)}
  answers = {qid: [f"answer{t}"] for qid, t in zip(qids, targets)}
  return table, corpus, queries, qrels, answers, q


MEASURES = ("MRR@10", "R@10", "nDCG@10")
KS = (1, 5, 20)


def test_evaluate_flat_is_perfect_and_pq_is_worse(synthetic):
  table, corpus, queries, qrels, answers, q = synthetic
  split = Split(queries, qrels, answers)
  flat = build_index(table, "Flat")
  got = evaluate_index(flat, q, split, corpus, depth=100, measures=MEASURES, answer_ks=KS)
  assert got == {"MRR@10": 1.0, "R@10": 1.0, "nDCG@10": 1.0, "top1": 1.0, "top5": 1.0,
                 "top20": 1.0}

  tiny = build_index(table, "PQ2x4", seed=0, threads=1)  # 1 byte per vector
  assert compression_ratio(tiny) == 128.0
  worse = evaluate_index(tiny, q, split, corpus, depth=100, measures=MEASURES, answer_ks=KS)
  assert worse["MRR@10"] < 0.9 and worse["nDCG@10"] < 0.9 and worse["top1"] < 0.9
  # Qrels and answers agree here (the positive holds the only copy of the answer), so
  # recall at k must equal top-k answer accuracy.
  recall = evaluate_index(tiny, q, split, corpus, depth=100, measures=("R@1", "R@5", "R@20"),
                          answer_ks=KS)
  for k in KS:
    assert recall[f"R@{k}"] == pytest.approx(recall[f"top{k}"], abs=1e-12)


def test_evaluate_by_qrels_only_or_answers_only(synthetic):
  table, corpus, queries, qrels, answers, q = synthetic
  flat = build_index(table, "Flat")
  by_qrels = evaluate_index(flat, q, Split(queries, qrels), corpus, measures=MEASURES)
  assert set(by_qrels) == set(MEASURES)
  by_answers, run = evaluate_index(
      flat, q, Split(queries, {}, answers), corpus, answer_ks=KS, return_run=True)
  assert by_answers == {"top1": 1.0, "top5": 1.0, "top20": 1.0}
  # depth 1000 is capped at the corpus size; the run follows the split's query order.
  assert list(run) == list(queries.ids) and all(len(r) == N_DOCS for r in run.values())
  with pytest.raises(ValueError, match="neither"):
    evaluate_index(flat, q, Split(queries, {}), corpus)
  with pytest.raises(ValueError, match="shape"):
    evaluate_index(flat, q[:5], Split(queries, qrels), corpus)
  with pytest.raises(ValueError, match="corpus"):
    evaluate_index(build_index(table[:10], "Flat"), q, Split(queries, qrels), corpus)


def test_evaluate_run_matches_trec_file(tmp_path, synthetic):
  table, corpus, queries, qrels, _, q = synthetic
  index = build_index(table, "PQ4x4", seed=0, threads=1)
  metrics, run = evaluate_index(
      index, q, Split(queries, qrels), corpus, depth=10, measures=MEASURES, return_run=True)
  write_trec_run(tmp_path / "run.trec", run)
  assert ranking_metrics(qrels, read_trec_run(tmp_path / "run.trec"), MEASURES) == pytest.approx(
      metrics, abs=1e-12)


def test_answer_matcher_contains_answer_by_row():
  from qdr_jax.data.answers import AnswerMatcher
  matcher = AnswerMatcher(["Barack Obama was born in Hawaii.", "Obamacare is a law.",
                           "The year was 1,000 AD."])
  np.testing.assert_array_equal(matcher.contains_answer(["Obama"], [0, 1, 2]),
                                [True, False, False])
  np.testing.assert_array_equal(matcher.contains_answer(["1,000"], [2, 0]), [True, False])
  assert not matcher.contains_answer([], [0, 1]).any()


def test_evaluate_config_writes_the_trec_runs_it_scores(tiny_config, tmp_path):
  from qdr_jax.eval.metrics import ranking_metrics
  from qdr_jax.eval.trec import read_trec_run
  from qdr_jax.experiment import evaluate_config
  workdir = tmp_path / "eval"
  results, _ = evaluate_config(tiny_config, workdir)
  assert sorted(pathlib.Path(p).name for p in results["run_files"]) == [
      "run.flat.trec", "run.quantized.seed0.trec"]
  from qdr_jax.data.loader import load_dataset
  qrels = load_dataset(tiny_config.data).split(tiny_config.data.eval_split).qrels
  for name, key in (("run.flat.trec", "flat"), ("run.quantized.seed0.trec", "quantized")):
    run = read_trec_run(workdir / name)
    assert len(run) == len(qrels) and all(len(r) == 100 for r in run.values())  # eval.depth
    again = ranking_metrics(qrels, run, tiny_config.eval.measures)
    for measure in tiny_config.eval.measures:
      assert again[measure] == pytest.approx(results[key][measure], abs=1e-9), (name, measure)
