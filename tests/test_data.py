"""Tests for the data readers, the corpus store, the config loader and the SQuAD conversion."""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ml_collections import ConfigDict

from qdr_jax.config import base_config
from qdr_jax.data import dpr as dpr_lib
from qdr_jax.data import loader as loader_lib
from qdr_jax.data import store
from qdr_jax.data import types as types_lib
from qdr_jax.data import (DataFormatError, load_dataset, read_beir, read_corpus,
                          read_dpr_passages, read_dpr_train_json, read_hf_corpus, read_hf_split,
                          read_qa_csv, squad_to_dpr, write_dpr_json, write_dpr_passages,
                          write_qa_csv)
from qdr_jax.data.beir import read_beir_corpus
from qdr_jax.data.types import Corpus
from qdr_jax.targets.table import table_cache_key

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _corpus_cache(tmp_path, monkeypatch):
  """Readers called without a cache_dir convert into the test's tmp dir."""
  monkeypatch.setenv(store.ENV_CACHE_DIR, str(tmp_path / "corpus_cache"))
SQUAD_PATH = REPO_ROOT / ".." / "shared" / "data" / "squad" / "dev-v1.1.json.gz"


# ----------------------------------------------------------------------------- helpers


def _write(path: pathlib.Path, text: str) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  if path.suffix == ".gz":
    with gzip.open(path, "wt", encoding="utf-8") as f:
      f.write(text)
  else:
    path.write_text(text, encoding="utf-8")
  return path


def _jsonl(rows) -> str:
  return "".join(json.dumps(r) + "\n" for r in rows)


CORPUS_ROWS = [
    {"_id": "d1", "title": "One", "text": "first passage"},
    {"_id": "d2", "title": "Two", "text": "second passage"},
    {"_id": 3, "text": "numeric id, no title"},
]
QUERY_ROWS = [
    {"_id": "q1", "text": "query one"},
    {"_id": "q2", "text": "query two"},
    {"_id": "q3", "text": "query three"},
]
QRELS = {
    "test": "query-id\tcorpus-id\tscore\nq2\td2\t1\nq1\td1\t1\nq2\t3\t0\n",
    "train": "query-id\tcorpus-id\tscore\nq3\td1\t2\n",
}


def _beir_dir(root: pathlib.Path, gz: bool = False, corpus=None, queries=None, qrels=None):
  ext = ".jsonl.gz" if gz else ".jsonl"
  _write(root / f"corpus{ext}", corpus if corpus is not None else _jsonl(CORPUS_ROWS))
  _write(root / f"queries{ext}", queries if queries is not None else _jsonl(QUERY_ROWS))
  for split, text in (qrels if qrels is not None else QRELS).items():
    _write(root / "qrels" / f"{split}.tsv", text)
  return root


def _raises(fn, path, line, fragment) -> DataFormatError:
  """Asserts a DataFormatError naming the file, the line and the problem."""
  with pytest.raises(DataFormatError) as info:
    fn()
  err = info.value
  message = str(err)
  assert err.path == str(path) and str(path) in message, message
  assert err.line == line, message
  if line is not None:
    assert f"{path}:{line}:" in message, message
  assert fragment in message, message
  return err


# ----------------------------------------------------------------------------- BEIR


@pytest.mark.parametrize("gz", [False, True])
def test_beir_reads_corpus_queries_and_splits(tmp_path, gz):
  ds = read_beir(_beir_dir(tmp_path / "toy", gz=gz))
  assert ds.name == "toy"
  assert list(ds.corpus.ids) == ["d1", "d2", "3"]
  assert list(ds.corpus.titles) == ["One", "Two", ""]
  assert ds.corpus.row_of["3"] == 2
  assert sorted(ds.splits) == ["test", "train"]
  test = ds.split("test")
  # Queries come in order of first appearance in the qrels.
  assert list(test.queries.ids) == ["q2", "q1"]
  assert list(test.queries.texts) == ["query two", "query one"]
  assert test.qrels == {"q2": {"d2": 1, "3": 0}, "q1": {"d1": 1}}
  assert test.positives("q2") == ["d2"]
  assert test.answers is None
  assert ds.split("train").qrels == {"q3": {"d1": 2}}


def test_beir_reads_only_requested_splits(tmp_path):
  ds = read_beir(_beir_dir(tmp_path), splits=["train"])
  assert list(ds.splits) == ["train"]


def test_beir_qrels_header_is_optional(tmp_path):
  ds = read_beir(_beir_dir(tmp_path, qrels={"dev": "q1\td1\t1\n"}))
  assert ds.split("dev").qrels == {"q1": {"d1": 1}}


def test_beir_error_bad_json(tmp_path):
  root = _beir_dir(tmp_path, corpus=_jsonl(CORPUS_ROWS[:1]) + '{"_id": "x", "text": \n')
  _raises(lambda: read_beir(root), root / "corpus.jsonl", 2, "bad JSON")


def test_beir_error_missing_field(tmp_path):
  root = _beir_dir(tmp_path, gz=True,
                   corpus=_jsonl(CORPUS_ROWS[:2]) + "\n" + _jsonl([{"_id": "d9", "title": "t"}]))
  _raises(lambda: read_beir(root), root / "corpus.jsonl.gz", 4, "missing required field 'text'")
  root = _beir_dir(tmp_path / "q", queries=_jsonl([{"text": "no id"}]))
  _raises(lambda: read_beir(root), root / "queries.jsonl", 1, "missing required field '_id'")


def test_beir_error_duplicate_passage(tmp_path):
  root = _beir_dir(tmp_path, corpus=_jsonl(CORPUS_ROWS + [{"_id": "d2", "text": "again"}]))
  _raises(lambda: read_beir(root), root / "corpus.jsonl", 4, "duplicate passage id 'd2'")


def test_beir_error_empty_corpus(tmp_path):
  root = _beir_dir(tmp_path, corpus="\n")
  _raises(lambda: read_beir(root), root / "corpus.jsonl", None, "corpus is empty")


@pytest.mark.parametrize("qrels_text, line, fragment", [
    ("query-id\tcorpus-id\tscore\nq1\td1\n", 2, "expected 3 tab-separated columns"),
    ("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t0.5\n", 3, "score '0.5' is not an integer"),
    ("query-id\tcorpus-id\tscore\nq1\tnope\t1\n", 2, "unknown document id 'nope'"),
    ("query-id\tcorpus-id\tscore\nq1\td1\t1\n\nq7\td1\t1\n", 4, "unknown query id 'q7'"),
])
def test_beir_error_bad_qrels(tmp_path, qrels_text, line, fragment):
  root = _beir_dir(tmp_path, qrels={"test": qrels_text})
  _raises(lambda: read_beir(root), root / "qrels" / "test.tsv", line, fragment)


def test_beir_error_missing_split(tmp_path):
  root = _beir_dir(tmp_path)
  err = _raises(lambda: read_beir(root, splits=["dev"]), root / "qrels", None,
                "missing split file(s) dev.tsv")
  assert "['test', 'train']" in str(err)


# ----------------------------------------------------------------------------- DPR


PASSAGES_TSV = ('id\ttext\ttitle\n'
                '1\t"Aaron ( or ; ""Aharon"") is a prophet"\tAaron\n'
                '2\t"has a\ttab and a\nnewline"\tOdd\n'
                '3\tplain text\tPlain\n')


@pytest.mark.parametrize("name", ["psgs.tsv", "psgs.tsv.gz"])
def test_dpr_passages(tmp_path, name):
  corpus = read_dpr_passages(_write(tmp_path / name, PASSAGES_TSV))
  assert list(corpus.ids) == ["1", "2", "3"]
  assert corpus.texts[0] == 'Aaron ( or ; "Aharon") is a prophet'
  assert corpus.texts[1] == "has a\ttab and a\nnewline"
  assert list(corpus.titles) == ["Aaron", "Odd", "Plain"]
  # Writing and reading back is lossless, carriage returns and quotes included.
  corpus = Corpus(ids=list(corpus.ids) + ["4"], titles=list(corpus.titles) + ['"Q"'],
                  texts=list(corpus.texts) + ["cr\r only\r\n and crlf"])
  write_dpr_passages(tmp_path / "again.tsv", corpus)
  again = read_dpr_passages(tmp_path / "again.tsv")
  assert (again.ids, again.titles, again.texts) == (corpus.ids, corpus.titles, corpus.texts)


def test_dpr_passages_errors(tmp_path):
  path = _write(tmp_path / "cols.tsv", "id\ttext\ttitle\n1\tx\tX\n2\tonly two\n")
  _raises(lambda: read_dpr_passages(path), path, 3, "expected 3 tab-separated columns, got 2")
  path = _write(tmp_path / "dup.tsv", "id\ttext\ttitle\n1\tx\tX\n1\ty\tY\n")
  _raises(lambda: read_dpr_passages(path), path, 3, "duplicate passage id '1'")
  path = _write(tmp_path / "head.tsv", "1\tx\tX\n")
  _raises(lambda: read_dpr_passages(path), path, 1, "header must name columns")
  path = _write(tmp_path / "empty.tsv", "id\ttext\ttitle\n")
  _raises(lambda: read_dpr_passages(path), path, None, "corpus is empty")


def _toy_corpus() -> Corpus:
  return Corpus(ids=["1", "2", "3"], titles=["A", "B", "C"], texts=["a", "b", "c"])


DPR_RECORDS = [
    {"dataset": "nq", "question": "who is a?", "answers": ["a", "A!"],
     "positive_ctxs": [{"title": "A", "text": "a", "score": 1, "passage_id": "1"},
                       {"title": "C", "text": "c", "passage_id": "3"}],
     "negative_ctxs": [{"passage_id": "2"}], "hard_negative_ctxs": []},
    {"question": "what is b?", "answers": ["b"],
     "positive_ctxs": [{"title": "B", "text": "b", "psg_id": 2}],
     "negative_ctxs": [], "hard_negative_ctxs": [{"psg_id": "999"}]},
]


@pytest.mark.parametrize("name", ["train.json", "train.json.gz"])
def test_dpr_train_json(tmp_path, name):
  path = _write(tmp_path / name, json.dumps(DPR_RECORDS, indent=2))
  split = read_dpr_train_json(path, _toy_corpus(), split_name="dev")
  assert list(split.queries.ids) == ["dev-0", "dev-1"]
  assert list(split.queries.texts) == ["who is a?", "what is b?"]
  assert split.qrels == {"dev-0": {"1": 1, "3": 1}, "dev-1": {"2": 1}}
  assert split.answers == {"dev-0": ["a", "A!"], "dev-1": ["b"]}


def test_dpr_train_json_missing_positive(tmp_path):
  records = DPR_RECORDS + [{"question": "q?", "answers": [],
                            "positive_ctxs": [{"passage_id": "77"}, {"passage_id": "1"}]}]
  path = tmp_path / "t.json"
  write_dpr_json(path, records)  # One record per line, from line 2.
  _raises(lambda: read_dpr_train_json(path, _toy_corpus()), path, 4,
          "record 2: positive passage id '77' is not in the corpus")
  split, skipped = dpr_lib.dpr_records_to_split(dpr_lib.iter_json_array(path), _toy_corpus(),
                                                str(path), allow_missing_positives=True)
  assert skipped == 1
  assert split.qrels["train-2"] == {"1": 1}


def test_dpr_train_json_errors(tmp_path):
  path = _write(tmp_path / "syntax.json", '[\n{"question": "x",\n "answers": [}\n]')
  _raises(lambda: read_dpr_train_json(path, _toy_corpus()), path, 3, "bad JSON in record 0")
  path = _write(tmp_path / "noq.json", '[{"question": "x", "positive_ctxs": []},\n'
                '{"answers": [], "positive_ctxs": []}]')
  _raises(lambda: read_dpr_train_json(path, _toy_corpus()), path, 2,
          "record 1: missing required field 'question'")
  path = _write(tmp_path / "obj.json", '{"question": "x"}')
  _raises(lambda: read_dpr_train_json(path, _toy_corpus()), path, 1, "expected a JSON array")
  path = _write(tmp_path / "ctx.json", '[{"question": "x", "positive_ctxs": [{"title": "A"}]}]')
  _raises(lambda: read_dpr_train_json(path, _toy_corpus()), path, 1,
          "positive ctx has no 'passage_id' or 'psg_id'")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=4),
    max_leaves=12)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(json_values, max_size=8), indent=st.sampled_from([None, 0, 2]),
       chunk=st.integers(1, 16))
def test_iter_json_array_streams_any_array(tmp_path, monkeypatch, values, indent, chunk):
  # Tiny chunks force every element and token to straddle chunk boundaries.
  monkeypatch.setattr(dpr_lib, "_CHUNK_CHARS", chunk)
  text = json.dumps(values, indent=indent)
  path = _write(tmp_path / "a.json", text)
  got = list(dpr_lib.iter_json_array(path))
  assert [v for _, _, v in got] == values
  assert [i for _, i, _ in got] == list(range(len(values)))
  if indent is not None:  # One element starts per line after the opening bracket.
    starts = [line for line, _, _ in got]
    assert starts == sorted(starts) and all(s >= 2 for s in starts)


def test_qa_csv(tmp_path):
  path = _write(tmp_path / "nq-test.csv",
                "who got the first nobel prize in physics\t['Wilhelm Conrad Röntgen']\n"
                "where is it?\t[\"O'Hare\", 'Chicago']\n")
  split = read_qa_csv(path, split_name="test")
  assert list(split.queries.ids) == ["test-0", "test-1"]
  assert split.queries.texts[0] == "who got the first nobel prize in physics"
  assert split.answers == {"test-0": ["Wilhelm Conrad Röntgen"], "test-1": ["O'Hare", "Chicago"]}
  assert split.qrels == {}


def test_qa_csv_errors(tmp_path, monkeypatch):
  path = _write(tmp_path / "cols.csv", "q\t['a']\nno answers here\n")
  _raises(lambda: read_qa_csv(path), path, 2, "expected 2 tab-separated columns")
  # Code in the answer field must be rejected, never run.
  ran = []
  monkeypatch.setattr(sys.modules["builtins"], "_qdr_probe", ran.append, raising=False)
  path = _write(tmp_path / "code.csv", "q\t['a']\nq2\t_qdr_probe(1)\n")
  _raises(lambda: read_qa_csv(path), path, 2, "not a Python list literal")
  assert ran == []
  path = _write(tmp_path / "type.csv", "q\t['a', 3]\n")
  _raises(lambda: read_qa_csv(path), path, 1, "must be a list of strings")


qa_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(qa_text, st.lists(qa_text, max_size=4)), max_size=6))
def test_qa_csv_round_trip(tmp_path, rows):
  path = tmp_path / "rt.csv"
  write_qa_csv(path, [q for q, _ in rows], [a for _, a in rows])
  split = read_qa_csv(path, split_name="s")
  assert list(split.queries.texts) == [q for q, _ in rows]
  assert [split.answers[q] for q in split.queries.ids] == [a for _, a in rows]


# ----------------------------------------------------------------------------- HF


def test_hf_split_with_id_columns(tmp_path):
  datasets = pytest.importorskip("datasets")
  datasets.Dataset.from_dict({
      "query": ["who is a?", "what is b?"],
      "positive_passage_ids": [["1", "3"], ["2"]],
      "answers": [["a"], ["b", "B"]],
  }).save_to_disk(str(tmp_path / "ds"))
  split = read_hf_split(tmp_path / "ds", _toy_corpus(), "train")
  assert list(split.queries.ids) == ["train-0", "train-1"]
  assert list(split.queries.texts) == ["who is a?", "what is b?"]
  assert split.qrels == {"train-0": {"1": 1, "3": 1}, "train-1": {"2": 1}}
  assert split.answers == {"train-0": ["a"], "train-1": ["b", "B"]}


def test_hf_split_with_ctxs_and_dataset_dict(tmp_path):
  datasets = pytest.importorskip("datasets")
  ds = datasets.Dataset.from_dict({
      "question": ["q0", "q1"],
      "positive_ctxs": [[{"passage_id": "2", "title": "B", "text": "b"}],
                        [{"passage_id": "77", "title": "", "text": ""},
                         {"passage_id": "3", "title": "C", "text": "c"}]],
  })
  datasets.DatasetDict({"train": ds, "dev": ds}).save_to_disk(str(tmp_path / "dd"))
  with pytest.raises(DataFormatError, match="'77' is not in the corpus"):
    read_hf_split(tmp_path / "dd", _toy_corpus(), "dev")
  split = read_hf_split(tmp_path / "dd", _toy_corpus(), "dev", allow_missing_positives=True)
  assert split.qrels == {"dev-0": {"2": 1}, "dev-1": {"3": 1}}
  assert split.answers is None


def test_hf_split_missing_column(tmp_path):
  datasets = pytest.importorskip("datasets")
  datasets.Dataset.from_dict({"question": ["q"], "docs": [["1"]]}).save_to_disk(
      str(tmp_path / "bad"))
  err = _raises(lambda: read_hf_split(tmp_path / "bad", _toy_corpus(), "train"),
                tmp_path / "bad", None, "missing a positives column (positive_passage_ids")
  assert "columns found: ['question', 'docs']" in str(err)
  datasets.Dataset.from_dict({"text": ["q"], "positive_ids": [["1"]]}).save_to_disk(
      str(tmp_path / "noq"))
  _raises(lambda: read_hf_split(tmp_path / "noq", _toy_corpus(), "train"), tmp_path / "noq",
          None, "missing a question column (question or query); columns found: ['text'")


# ----------------------------------------------------------------------------- loader


def test_load_demo_scifact():
  ds = load_dataset(ConfigDict({"name": "scifact", "format": "beir", "root": "demo:scifact"}))
  assert ds.name == "scifact"
  assert len(ds.corpus) == 5183
  test, train = ds.split("test"), ds.split("train")
  assert len(test.queries) == 300
  assert sum(len(j) for j in test.qrels.values()) == 339
  assert len(train.queries) == 809
  assert sum(len(j) for j in train.qrels.values()) == 919
  assert all(test.positives(q) for q in test.queries.ids)


def test_load_max_passages_keeps_positives():
  cfg = ConfigDict({"name": "scifact", "format": "beir", "root": "demo:scifact",
                    "splits": ["test"], "max_passages": 500})
  ds = load_dataset(cfg)
  assert len(ds.corpus) == 500
  rows = ds.corpus.row_of
  test = ds.split("test")
  assert len(test.queries) == 300
  assert all(d in rows for judged in test.qrels.values() for d in judged)
  assert sum(len(j) for j in test.qrels.values()) == 339
  # Kept passages stay in corpus order.
  full = load_dataset(ConfigDict({"name": "s", "format": "beir", "root": "demo:scifact",
                                  "splits": ["test"]})).corpus.row_of
  assert [full[d] for d in ds.corpus.ids] == sorted(full[d] for d in ds.corpus.ids)


def test_truncate_drops_judgments_of_removed_passages(tmp_path):
  root = _beir_dir(tmp_path)
  ds = load_dataset(ConfigDict({"name": "t", "format": "beir", "root": str(root),
                                "max_passages": 1}))
  # d1 and d2 are positives; "3" is only a score-0 judgment and is dropped with it.
  assert list(ds.corpus.ids) == ["d1", "d2"]
  assert ds.split("test").qrels == {"q2": {"d2": 1}, "q1": {"d1": 1}}


def test_load_dpr_all_split_kinds(tmp_path, monkeypatch):
  datasets = pytest.importorskip("datasets")
  _write(tmp_path / "psgs.tsv.gz", PASSAGES_TSV)
  _write(tmp_path / "train.json", json.dumps(DPR_RECORDS))
  _write(tmp_path / "test.csv", "q\t['a']\n")
  datasets.Dataset.from_dict({"question": ["q"], "positive_ids": [[3]]}).save_to_disk(
      str(tmp_path / "dev"))
  monkeypatch.chdir(tmp_path)  # Relative paths resolve against the current directory.
  ds = load_dataset(ConfigDict({
      "name": "toy", "format": "dpr", "corpus": "psgs.tsv.gz",
      "splits": {"train": "train.json", "test": "test.csv", "dev": "dev"}}))
  assert len(ds.corpus) == 3
  assert ds.split("train").qrels["train-1"] == {"2": 1}
  assert ds.split("test").answers == {"test-0": ["a"]}
  assert ds.split("dev").qrels == {"dev-0": {"3": 1}}


def test_load_dpr_hub_split_spec(tmp_path, monkeypatch):
  calls = []

  def fake_read_hf_split(name, corpus, split_name, hub_split=None, allow_missing_positives=False):
    calls.append((name, split_name, hub_split, allow_missing_positives))
    return read_qa_csv(_write(tmp_path / "q.csv", "q\t['a']\n"), split_name)

  monkeypatch.setattr(loader_lib, "read_hf_split", fake_read_hf_split)
  _write(tmp_path / "p.tsv", PASSAGES_TSV)
  load_dataset(ConfigDict({"name": "x", "format": "dpr", "corpus": str(tmp_path / "p.tsv"),
                           "allow_missing_positives": True,
                           "splits": {"train": "hf:coign/dback_nq",
                                      "dev": "hf:coign/dback_nq:validation"}}))
  assert sorted(calls) == [("coign/dback_nq", "dev", "validation", True),
                           ("coign/dback_nq", "train", None, True)]


def test_load_config_errors(tmp_path):
  with pytest.raises(ValueError, match="'format' is 'tsv'"):
    load_dataset(ConfigDict({"name": "x", "format": "tsv", "root": "demo:scifact"}))
  with pytest.raises(ValueError, match="'root' is required"):
    load_dataset(ConfigDict({"name": "x", "format": "beir"}))
  _write(tmp_path / "p.tsv", PASSAGES_TSV)
  with pytest.raises(ValueError, match="splits.train: cannot tell the kind"):
    load_dataset(ConfigDict({"name": "x", "format": "dpr", "corpus": str(tmp_path / "p.tsv"),
                             "splits": {"train": str(tmp_path / "train.parquet")}}))


# ----------------------------------------------------------------------------- SQuAD

needs_squad = pytest.mark.skipif(not SQUAD_PATH.exists(), reason="shared SQuAD data absent")


@pytest.fixture(scope="module")
def squad():
  with gzip.open(SQUAD_PATH, "rt", encoding="utf-8") as f:
    return json.load(f)


@needs_squad
def test_squad_to_dpr_split_by_article(squad):
  out = squad_to_dpr(squad, test_fraction=0.25, seed=0)
  assert len(out.corpus) == 2067
  assert len(out.train_records) + len(out.test_records) == 10570
  assert len(out.train_titles) + len(out.test_titles) == 48
  assert len(out.test_titles) == 12
  assert not set(out.train_titles) & set(out.test_titles)
  test_titles = set(out.test_titles)
  texts = dict(zip(out.corpus.ids, out.corpus.texts))
  for records, on_test in ((out.train_records, False), (out.test_records, True)):
    for r in records:
      (ctx,) = r["positive_ctxs"]
      assert (ctx["title"] in test_titles) == on_test
      assert texts[ctx["passage_id"]] == ctx["text"]
      assert any(a in ctx["text"] for a in r["answers"]), r["question"]
  # Deterministic given the seed; another seed picks other articles.
  assert squad_to_dpr(squad, 0.25, seed=0).test_titles == out.test_titles
  assert squad_to_dpr(squad, 0.25, seed=1).test_titles != out.test_titles


@needs_squad
def test_convert_squad_script_output_loads(tmp_path):
  out_dir = tmp_path / "squad_dpr"
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
  result = subprocess.run(
      [sys.executable, str(REPO_ROOT / "experiments" / "convert_squad.py"),
       f"--input={SQUAD_PATH}", f"--output_dir={out_dir}"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True)
  assert "passages: 2067" in result.stdout
  ds = load_dataset(ConfigDict({
      "name": "squad", "format": "dpr", "corpus": str(out_dir / "psgs.tsv"),
      "splits": {"train": str(out_dir / "train.json"), "test": str(out_dir / "test.json"),
                 "test_qa": str(out_dir / "test.csv")}}))
  test, test_qa = ds.split("test"), ds.split("test_qa")
  assert len(ds.corpus) == 2067
  assert len(ds.split("train").queries) + len(test.queries) == 10570
  assert list(test.queries.texts) == list(test_qa.queries.texts)
  assert [test.answers[q] for q in test.queries.ids] == [
      test_qa.answers[q] for q in test_qa.queries.ids]
  for q in test.queries.ids:
    (pos,) = test.positives(q)
    assert any(a in ds.corpus.texts[ds.corpus.row_of[pos]] for a in test.answers[q])


# ----------------------------------------------------------------------------- store

@pytest.fixture
def conversions(monkeypatch):
  """Counts store conversions (cache misses)."""
  calls = []
  convert = store._convert

  def spy(final, source, rows, line_kind):
    calls.append(source)
    return convert(final, source, rows, line_kind)

  monkeypatch.setattr(store, "_convert", spy)
  return calls


def _lists(corpus):
  return list(corpus.ids), list(corpus.titles), list(corpus.texts)


def _big_rows(n):
  return [{"_id": f"p{i}", "title": f"T{i % 7}", "text": f"passage {i} " + "word " * 50}
          for i in range(n)]


def test_store_beir_round_trip_maps_second_load(tmp_path, conversions):
  rows = _big_rows(3000)
  path = _write(tmp_path / "src" / "corpus.jsonl.gz", _jsonl(rows))
  cache = tmp_path / "cache"
  corpus = read_beir_corpus(path, cache)
  expected = ([r["_id"] for r in rows], [r["title"] for r in rows], [r["text"] for r in rows])
  assert _lists(corpus) == expected
  assert corpus.store_dir is not None and corpus.store_dir.startswith(str(cache))
  assert sorted(os.listdir(corpus.store_dir)) == [
      "corpus.json", "data-00000.arrow", "id_hash.npy", "id_rows.npy"]
  assert len(conversions) == 1
  before = pa.total_allocated_bytes()
  again = read_beir_corpus(path, cache)
  # Mapped, not read: the 3000 passages (about 800 KB of text) are not in Arrow's heap.
  assert pa.total_allocated_bytes() - before < 50_000
  assert len(conversions) == 1
  assert again.store_dir == corpus.store_dir
  assert again.fingerprint() == corpus.fingerprint() == Corpus(*expected).fingerprint()
  assert again.texts[[2999, 0, 1500]] == [expected[2][2999], expected[2][0], expected[2][1500]]
  np.testing.assert_array_equal(again.rows(expected[0]), np.arange(3000))
  # An edited source converts again into a new store.
  _write(path, _jsonl(rows[:10]))
  assert len(read_beir_corpus(path, cache)) == 10
  assert len(conversions) == 2


@pytest.mark.parametrize("damaged", ["data-00000.arrow", "id_rows.npy"])
def test_damaged_store_is_set_aside_and_converted_again(tmp_path, conversions, damaged, caplog):
  rows = _big_rows(300)
  path = _write(tmp_path / "src" / "corpus.jsonl.gz", _jsonl(rows))
  cache = tmp_path / "cache"
  store = read_beir_corpus(path, cache).store_dir
  target = pathlib.Path(store) / damaged
  raw = bytearray(target.read_bytes())
  raw[-20] ^= 0xFF  # one byte of a text or a row number: same size, no other sign
  target.write_bytes(bytes(raw))
  with caplog.at_level("WARNING"):
    again = read_beir_corpus(path, cache)
  assert len(conversions) == 2 and again.store_dir == store
  assert _lists(again)[2] == [r["text"] for r in rows]
  (aside,) = [p for p in cache.iterdir() if ".damaged-" in p.name]  # kept, not deleted
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(warnings) == 1 and str(target) in warnings[0] and store in warnings[0]


def test_store_dpr_round_trip(tmp_path, conversions):
  path = _write(tmp_path / "psgs.tsv", PASSAGES_TSV)
  corpus = read_dpr_passages(path, tmp_path / "cache")
  assert corpus.store_dir is not None
  assert _lists(corpus) == (["1", "2", "3"], ["Aaron", "Odd", "Plain"],
                            ['Aaron ( or ; "Aharon") is a prophet', "has a\ttab and a\nnewline",
                             "plain text"])
  read_corpus(str(path), tmp_path / "cache")
  assert len(conversions) == 1


def test_store_hf_round_trip(tmp_path, conversions):
  datasets = pytest.importorskip("datasets")
  datasets.Dataset.from_dict({"docid": [7, 8, 9], "title": ["A", "B", ""],
                              "text": ["a", "b", "c"], "extra": [1, 2, 3]}).save_to_disk(
                                  str(tmp_path / "psgs"))
  corpus = read_hf_corpus(tmp_path / "psgs", cache_dir=tmp_path / "cache")
  assert _lists(corpus) == (["7", "8", "9"], ["A", "B", ""], ["a", "b", "c"])
  assert corpus.store_dir is not None
  # A dpr config may name the directory as its corpus; the store is reused.
  ds = load_dataset(ConfigDict({"name": "h", "format": "dpr", "corpus": str(tmp_path / "psgs"),
                                "cache_dir": str(tmp_path / "cache"),
                                "splits": {"test": str(_write(tmp_path / "t.csv", "q\t['a']\n"))}}))
  assert ds.corpus.store_dir == corpus.store_dir
  assert len(conversions) == 1
  datasets.Dataset.from_dict({"docid": ["x", "y", "x"], "text": ["a", "b", "c"]}).save_to_disk(
      str(tmp_path / "dup"))
  _raises(lambda: read_hf_corpus(tmp_path / "dup", cache_dir=tmp_path / "cache"),
          tmp_path / "dup", None, "row 2: duplicate passage id 'x' (already passage #1)")
  datasets.Dataset.from_dict({"docid": ["x"], "body": ["a"]}).save_to_disk(str(tmp_path / "bad"))
  _raises(lambda: read_hf_corpus(tmp_path / "bad", cache_dir=tmp_path / "cache"),
          tmp_path / "bad", None, "missing a text column (text, contents, passage); "
          "columns found: ['docid', 'body']")


def test_store_squad_round_trip(tmp_path, conversions):
  squad = {"data": [
      {"title": f"Article_{a}", "paragraphs": [
          {"context": f"Paragraph {a}.{p} says answer{a}{p}.",
           "qas": [{"id": f"{a}{p}", "question": f"What does {a}.{p} say?",
                    "answers": [{"text": f"answer{a}{p}", "answer_start": 0}]}]}
          for p in range(2)]} for a in range(4)]}
  path = _write(tmp_path / "squad.json.gz", json.dumps(squad))
  cfg = ConfigDict({"name": "sq", "format": "squad", "root": str(path), "test_fraction": 0.25,
                    "cache_dir": str(tmp_path / "cache")})
  ds = load_dataset(cfg)
  assert ds.corpus.store_dir is not None
  assert list(ds.corpus.ids) == [str(i) for i in range(1, 9)]
  assert ds.corpus.titles[0] == "Article 0"
  assert ds.corpus.texts[-1] == "Paragraph 3.1 says answer31."
  test = ds.split("test")
  for q in test.queries.ids:
    (pos,) = test.positives(q)
    assert any(a in ds.corpus.texts[ds.corpus.row_of[pos]] for a in test.answers[q])
  assert len(ds.split("train").queries) + len(test.queries) == 8
  load_dataset(cfg)
  assert len(conversions) == 1


def test_store_config_cache_dir_and_default(tmp_path, monkeypatch):
  root = _beir_dir(tmp_path / "toy")
  ds = load_dataset(ConfigDict({"name": "t", "format": "beir", "root": str(root),
                                "cache_dir": str(tmp_path / "cfg_cache")}))
  assert os.path.dirname(ds.corpus.store_dir) == str(tmp_path / "cfg_cache")
  monkeypatch.setenv(store.ENV_CACHE_DIR, "")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert store.default_cache_dir() == str(tmp_path / "xdg" / "qdr_jax" / "corpora")
  assert base_config().data.cache_dir == ""


def test_store_failed_conversion_leaves_nothing(tmp_path, conversions):
  root = _beir_dir(tmp_path / "b", corpus=_jsonl(CORPUS_ROWS) + "{oops\n")
  cache = tmp_path / "cache"
  _raises(lambda: read_beir(root, cache_dir=cache), root / "corpus.jsonl", 4, "bad JSON")
  assert os.listdir(cache) == []
  root = _beir_dir(tmp_path / "d", corpus=_jsonl(CORPUS_ROWS + [{"_id": "d1", "text": "x"}]))
  _raises(lambda: read_beir(root, cache_dir=cache), root / "corpus.jsonl", 4,
          "duplicate passage id 'd1' (already passage #1)")
  assert os.listdir(cache) == []
  assert len(conversions) == 2


def _chunked_corpus(ids, titles, texts, chunk):
  """The same passages in an Arrow table of several chunks, as the store writes them."""
  table = pa.Table.from_batches(
      pa.table({"id": ids, "title": titles, "text": texts}).to_batches(max_chunksize=chunk))
  return Corpus.from_arrow(table)


def test_corpus_lookup_every_id_and_missing_ones():
  ids = [f"id-{i}" for i in range(1000)]
  corpus = _chunked_corpus(ids, [""] * 1000, [f"t{i}" for i in range(1000)], chunk=77)
  assert corpus.table.column("id").num_chunks == 13
  order = np.random.default_rng(0).permutation(1000)
  np.testing.assert_array_equal(corpus.rows([ids[i] for i in order]), order)
  np.testing.assert_array_equal(corpus.find_rows(["id-5", "nope", "id-999", ""]),
                                [5, -1, 999, -1])
  with pytest.raises(KeyError, match="'nope' is not in the corpus .2 of 3 ids missing"):
    corpus.rows(["id-1", "nope", "nope2"])
  row_of = corpus.row_of
  assert "id-42" in row_of and "id-1000" not in row_of and 42 not in row_of
  assert row_of["id-42"] == 42 and row_of.get("x", -7) == -7 and len(row_of) == 1000
  with pytest.raises(KeyError):
    row_of["x"]
  assert corpus.first_duplicate() is None
  assert corpus.rows([]).shape == (0,)


def test_corpus_hash_collisions_are_verified(monkeypatch):
  # Two hash values for every id: every lookup lands in a run of colliding ids.
  monkeypatch.setattr(types_lib, "_hash_id", lambda data: len(data) % 2)
  ids = ["a", "bb", "c", "dd", "eee", "f"]
  corpus = Corpus(ids=ids, titles=[""] * 6, texts=[""] * 6)
  assert len(set(corpus.lookup.keys.tolist())) == 2
  np.testing.assert_array_equal(corpus.rows(ids[::-1]), np.arange(6)[::-1])
  np.testing.assert_array_equal(corpus.find_rows(["g", "hh", "eee"]), [-1, -1, 4])
  dup = Corpus(ids=["a", "bb", "c", "bb", "a"], titles=[""] * 5, texts=[""] * 5)
  assert dup.first_duplicate() == (3, 1)  # "bb" repeats first (row 3), then "a" (row 4).


def test_str_column_indexing():
  texts = [f"text {i}" for i in range(50)]
  col = _chunked_corpus([str(i) for i in range(50)], [""] * 50, texts, chunk=8).texts
  assert len(col) == 50 and col[0] == "text 0" and col[-1] == "text 49"
  assert col[np.int64(17)] == "text 17"
  assert col[5:20] == texts[5:20] and col[40:] == texts[40:] and col[::-7] == texts[::-7]
  rows = np.array([49, 0, 8, 7, 8, -2])
  assert col[rows] == [texts[r] for r in rows] and col[[3]] == ["text 3"]
  assert list(col) == texts and col == texts and col != texts[:-1]
  assert [len(c) for c in col.chunks(5)] == [5, 3] * 6 + [2]
  with pytest.raises(IndexError):
    col[50]
  with pytest.raises(IndexError):
    col[np.array([0, -51])]


def test_fingerprint_covers_ids_and_text_not_chunking():
  ids, titles, texts = ["a", "b", "c"], ["", "T", ""], ["x", "y", "z"]
  base = Corpus(ids, titles, texts).fingerprint()
  assert _chunked_corpus(ids, titles, texts, chunk=1).fingerprint() == base
  assert _chunked_corpus(ids, titles, texts, chunk=2).table.column("id").num_chunks == 2
  assert Corpus(ids, titles, ["x", "y", "zz"]).fingerprint() != base
  assert Corpus(["a", "b", "d"], titles, texts).fingerprint() != base
  # Moving a character between neighbouring passages changes it too.
  assert Corpus(ids, titles, ["x", "yz", ""]).fingerprint() != base
  model = base_config().model
  assert table_cache_key(model, Corpus(ids, titles, texts)) != table_cache_key(
      model, Corpus(ids, titles, ["x", "y", "zz"]))
