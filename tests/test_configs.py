"""Every shipped config builds, locks, and rejects misspelt keys."""

import importlib.util
import pathlib

import pytest

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


def _module(stem: str):
  path = next(p for p in CONFIGS if p.stem == stem)
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _load(path):
  return _module(path.stem).get_config()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_builds_and_is_locked(path):
  config = _load(path)
  config.lock()
  assert config.data.name and config.index.factory and config.model.query_encoder
  assert config.train.batch_size > 0 and config.negatives.k > 0
  with pytest.raises(AttributeError):
    config.train.stepz = 1  # a typo must fail, not add a key


def test_dpr_configs_differ_only_where_the_paper_does():
  nq, trivia = (_load(p) for p in CONFIGS if p.stem in ("nq", "trivia"))
  assert (nq.loss.temperature, trivia.loss.temperature) == (8.0, 16.0)
  assert (nq.index.rebuild_every, trivia.index.rebuild_every) == (800, 1600)
  assert nq.index.factory == trivia.index.factory == "IVF4096_HNSW128,PQ128x8"
  assert nq.model.passage_encoder.startswith("facebook/dpr-ctx_encoder")


def test_demo_mode_argument_names_the_learned_index_parameters():
  from qdr_jax.train.modes import mode_from_config
  module = _module("demo")
  learned = module.get_config("mode=dback+codebooks+centroids")
  assert learned.train.mode == "dback" and tuple(learned.quant.learn) == ("codebooks", "centroids")
  assert set(mode_from_config(learned).learn) == {"codebooks", "centroids"}
  plain = module.get_config("mode=query_only")
  assert plain.train.mode == "query_only" and tuple(plain.quant.learn) == ()
  # Overrides in the spec apply after the config's own settings, so they win.
  variant = module.get_config("mode=dback+centroids@train.steps=7@loss.distill_weight=0.5,steps=50")
  assert variant.train.steps == 7 and variant.loss.distill_weight == 0.5
  assert tuple(variant.quant.learn) == ("centroids",)
  with pytest.raises(ValueError, match="no config key 'loss.nope'"):
    module.get_config("mode=dback@loss.nope=1")
  with pytest.raises(ValueError, match="config argument 'steps=ten'"):
    module.get_config("steps=ten")


def test_demo_runs_plain_dback_by_default_and_the_learned_index_one_argument_away():
  from qdr_jax.config import split_mode_spec
  module = _module("demo")
  plain = module.get_config()
  learned = module.get_config(f"mode={module.LEARNED_INDEX_MODE}")
  name, learn, overrides = split_mode_spec(module.LEARNED_INDEX_MODE)
  assert plain.train.mode == learned.train.mode == name == "dback"
  assert tuple(plain.quant.learn) == () and tuple(learned.quant.learn) == learn == (
      "codebooks", "centroids")
  # The rates chosen on the dev split, and the dev split they were chosen on.
  assert (plain.optim.encoder_lr, plain.optim.row_lr) == (5e-6, 1e-5)
  assert (plain.data.dev_split, plain.data.dev_queries) == ("dev", 150)
  # The learned-index mode differs from plain dback in exactly the spec's overrides.
  flat_learned, flat_plain = _flatten(learned.to_dict()), _flatten(plain.to_dict())
  differing = {k for k in flat_learned if flat_learned[k] != flat_plain[k]}
  assert differing == {"quant.learn", *overrides}
  assert (learned.loss.balance_weight, learned.optim.codebook_lr,
          learned.optim.centroid_lr) == (1.0, 3e-4, 3e-4)


def _flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def test_base_config_stays_small_and_every_key_is_documented():
  """At most 90 leaves, each documented in config.py (the config reference): a comment
  on its line, or a comment block right above it."""
  from qdr_jax import config as config_module
  from qdr_jax.config import base_config, flat_items
  leaves = flat_items(base_config())
  assert len(leaves) <= 90, len(leaves)
  assert leaves["train.profile_steps"] == (0, 0) and leaves["data.splits"].to_dict() == {}
  source = pathlib.Path(config_module.__file__).read_text().splitlines()
  undocumented = []
  for key in leaves:
    line = next(i for i, text in enumerate(source) if f"c.{key} = " in text)
    if "#" not in source[line] and not source[line - 1].lstrip().startswith("#"):
      undocumented.append(key)
  assert not undocumented, undocumented
