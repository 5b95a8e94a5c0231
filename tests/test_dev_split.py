"""The passage-disjoint dev split: its carve, its loading, its refusals and its use for
selection and in the results."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qdr_jax import experiment
from qdr_jax.data import load_dataset
from qdr_jax.data.splits import carve_dev_split, shared_positives, with_dev_split
from qdr_jax.data.types import Queries, Split
from qdr_jax.eval.report import before_after_table
from qdr_jax.validation import ConfigError, validate_config


def _split(positives: list[list[str]], answers: bool = False) -> Split:
  ids = [f"q{i}" for i in range(len(positives))]
  return Split(queries=Queries(ids=ids, texts=[f"text {i}" for i in ids]),
               qrels={q: {d: 1 for d in docs} for q, docs in zip(ids, positives) if docs},
               answers={q: [q.upper()] for q in ids} if answers else None)


def test_carve_holds_out_whole_groups_of_queries_sharing_a_positive():
  # q0-q2 share d0 (through q1's d1 as well), q3/q4 share d5, the rest stand alone.
  train = _split([["d0"], ["d0", "d1"], ["d1"], ["d5"], ["d5"], ["d6"], ["d7"], ["d8"],
                  ["d9"], [], ["d10", "d11"]], answers=True)
  rest, dev = carve_dev_split(train, 4, seed=3)
  assert not shared_positives(rest, dev)
  dev_ids, rest_ids = set(dev.queries.ids), set(rest.queries.ids)
  assert not dev_ids & rest_ids and dev_ids | rest_ids == set(train.queries.ids)
  assert 4 <= len(dev_ids) <= 5          # whole groups: never more than one group over
  for group in ({"q0", "q1", "q2"}, {"q3", "q4"}):
    assert group <= dev_ids or not group & dev_ids
  assert "q9" in rest_ids                # unlabelled: nothing to evaluate, it stays
  assert set(dev.qrels) == dev_ids and set(dev.answers) == dev_ids
  assert all(rest.qrels[q] == train.qrels[q] for q in rest.qrels)  # labels kept whole
  # Texts stay with their ids.
  assert all(t == f"text {q}" for q, t in zip(dev.queries.ids, dev.queries.texts))


def test_carve_is_deterministic_and_the_seed_moves_it():
  train = _split([[f"d{i}"] for i in range(60)])
  first = carve_dev_split(train, 10, seed=0)[1].queries.ids
  assert first == carve_dev_split(train, 10, seed=0)[1].queries.ids
  assert first != carve_dev_split(train, 10, seed=1)[1].queries.ids
  # The carve depends on the ids and labels, not on the order queries were read in.
  reordered = Split(queries=Queries(ids=list(reversed(train.queries.ids)),
                                    texts=list(reversed(train.queries.texts))),
                    qrels=train.qrels)
  assert sorted(first) == sorted(carve_dev_split(reordered, 10, seed=0)[1].queries.ids)


def test_carve_skips_a_group_larger_than_what_is_still_wanted():
  hub = [["hub"] for _ in range(8)]            # one 8-query group around a hub passage
  train = _split(hub + [[f"d{i}"] for i in range(10)])
  rest, dev = carve_dev_split(train, 5, seed=0)
  assert len(dev.queries) == 5 and not {f"q{i}" for i in range(8)} & set(dev.queries.ids)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(0, 30), max_size=3), min_size=3, max_size=40),
       st.integers(1, 10), st.integers(0, 5))
def test_carve_never_shares_a_positive(docs, size, seed):
  train = _split([[f"d{d}" for d in row] for row in docs])
  labelled = sum(1 for row in docs if row)
  if labelled <= size:
    with pytest.raises(ValueError, match="labelled queries"):
      carve_dev_split(train, size, seed)
    return
  rest, dev = carve_dev_split(train, size, seed)
  assert not shared_positives(rest, dev)
  assert len(rest.queries) + len(dev.queries) == len(train.queries)


def test_with_dev_split_prefers_the_data_sets_own_split():
  own = _split([["x"]])
  splits = {"train": _split([[f"d{i}"] for i in range(20)]), "dev": own}
  assert with_dev_split(splits, train_split="train", dev_split="dev", num_queries=5,
                        seed=0)["dev"] is own
  carved = with_dev_split({"train": splits["train"]}, train_split="train", dev_split="dev",
                          num_queries=5, seed=0)
  assert len(carved["dev"].queries) == 5 and len(carved["train"].queries) == 15
  assert with_dev_split({"train": splits["train"]}, train_split="train", dev_split="",
                        num_queries=5, seed=0).keys() == {"train"}


def test_loaded_dev_split_shares_no_positive_with_training(tiny_config):
  tiny_config.data.dev_split, tiny_config.data.dev_queries = "dev", 20
  dataset = load_dataset(tiny_config.data)
  train, dev = dataset.split("train"), dataset.split("dev")
  assert len(dev.queries) >= 20 and len(train.queries) + len(dev.queries) == 128
  assert not shared_positives(train, dev)


def test_too_large_a_dev_split_is_refused_naming_the_key(tiny_config):
  tiny_config.data.dev_split, tiny_config.data.dev_queries = "dev", 128
  with pytest.raises(ValueError, match="'dev_queries' is 128: the training split has 128"):
    load_dataset(tiny_config.data)


@pytest.mark.parametrize("changes, fragment", [
    ({"eval.every": 5}, "config.eval.every=5: expected 0 without a selection split"),
    ({"data.dev_queries": 10}, "config.data.dev_split='': expected a split name to carve"),
    ({"data.dev_split": "test"}, "config.data.dev_split='test': expected a split other"),
    ({"data.dev_split": "train"}, "config.data.dev_split='train': expected a split other"),
])
def test_selection_without_a_dev_split_is_refused(tiny_config, changes, fragment):
  for key, value in changes.items():
    section, name = key.split(".")
    tiny_config[section][name] = value
  with pytest.raises(ConfigError) as e:
    validate_config(tiny_config)
  assert any(fragment in p for p in e.value.problems), e.value.problems


def test_a_missing_dev_split_is_refused_against_the_data(tiny_config):
  tiny_config.data.dev_split = "dev"      # no such split, and none carved
  dataset = load_dataset(tiny_config.data)
  with pytest.raises(ConfigError, match="config.data.dev_split='dev': expected a split"):
    validate_config(tiny_config, dataset=dataset)


def test_run_selects_on_dev_and_reports_it_before_and_after(tiny_config, tmp_path,
                                                          monkeypatch):
  tiny_config.data.dev_split, tiny_config.data.dev_queries = "dev", 16
  tiny_config.train.steps = 4
  tiny_config.eval.every = 2
  dev_ids = set(load_dataset(tiny_config.data).split("dev").queries.ids)
  in_loop = []
  real = experiment.evaluate_index

  def recording(index, query_emb, split, *args, **kwargs):
    in_loop.append(set(split.queries.ids))
    return real(index, query_emb, split, *args, **kwargs)

  monkeypatch.setattr(experiment, "evaluate_index", recording)
  results = experiment.train_and_evaluate(tiny_config, tmp_path / "run")
  assert in_loop == [dev_ids, dev_ids]    # steps 2 and 4, on dev alone
  assert results["selection_split"] == "dev"
  dev = results["dev"]
  assert dev["split"] == "dev" and dev["count"] == len(dev_ids)
  for when in ("before", "after"):
    assert dev[when]["subsets"]["seen"]["count"] == 0   # passage-disjoint by construction
    assert dev[when]["subsets"]["unseen"]["count"] == len(dev_ids)
    assert set(dev[when]["per_query"]["query_ids"]) <= dev_ids
  assert "served" in dev["after"]
  # The test split's figures are those of the test queries, not dev's.
  assert not set(results["after"]["per_query"]["query_ids"]) & dev_ids
  assert "selection split 'dev' (16 queries)" in before_after_table(results)
  saved = json.loads((tmp_path / "run" / "results.json").read_text())
  assert saved["selection_split"] == "dev" and saved["dev"]["count"] == len(dev_ids)


def test_run_without_dev_split_records_no_selection(tiny_config, tmp_path):
  tiny_config.train.steps = 2
  results = experiment.train_and_evaluate(tiny_config, tmp_path / "run")
  assert results["selection_split"] is None and "dev" not in results
