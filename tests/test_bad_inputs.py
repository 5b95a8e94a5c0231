"""Every experiment script ends a user error in one ``error: ...`` line, exit status 2,
no traceback: a table of bad inputs (file system, flags, config, data, checkpoint,
bundle), each run as a subprocess. Each fails before any model is loaded or anything
embedded, so the whole table costs a few interpreter starts."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from test_validation import _CONFIG_FILE

REPO = pathlib.Path(__file__).resolve().parent.parent
# absl's log lines, and the progress bar of the corpus store's first conversion.
_NOT_AN_ERROR = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d|^Generating \w+ split: ")


@pytest.fixture(scope="module")
def inputs(tiny_beir, tiny_encoder_dir, tmp_path_factory):
  """The files the table refers to as {name}."""
  root = tmp_path_factory.mktemp("bad_inputs")
  config = root / "tiny_config.py"
  config.write_text(_CONFIG_FILE.format(root=str(tiny_beir), encoder=tiny_encoder_dir,
                                        cache=str(root / "cache")))
  (root / "a_file").write_text("not a directory\n")
  checkpointed = root / "checkpointed"
  (checkpointed / "checkpoints" / "4").mkdir(parents=True)
  (root / "existing_bundle").mkdir()
  (root / "bad_squad.json").write_text(json.dumps({"data": [{"title": "t", "paragraphs": [
      {"qas": []}]}]}))
  surrogate = root / "surrogate_beir"
  shutil.copytree(tiny_beir, surrogate)
  with open(surrogate / "queries.jsonl", "a", encoding="utf-8") as f:
    f.write('{"_id": "q999", "text": "broken \\ud800 escape"}\n')
  both = root / "both_beir"
  shutil.copytree(tiny_beir, both)
  (both / "corpus.jsonl").write_text('{"_id": "d0", "text": "x"}\n')
  bundle = root / "bundle"  # passages.jsonl truncated after export
  bundle.mkdir()
  (bundle / "passages.jsonl").write_text('{"id": "d0", "title": "", "text": "x"}\n')
  (bundle / "bundle.json").write_text(json.dumps({
      "format": 1, "model": {}, "index": {},
      "files": {"encoder": "query_encoder", "index": "index.faiss", "ids": "ids.json",
                "passages": "passages.jsonl"},
      "fingerprints": {"passages.jsonl": "0" * 32}}))
  (root / "empty_run").mkdir()
  return {"config": str(config), "file": str(root / "a_file"), "root": str(root),
          "checkpointed": str(checkpointed), "beir": str(tiny_beir),
          "surrogate": str(surrogate), "both": str(both), "bundle": str(bundle)}


def _read_only_dir() -> str | None:
  for candidate in ("/proc/sys",):
    if os.path.isdir(candidate) and not os.access(candidate, os.W_OK):
      return candidate
  return None


CONFIG = ("--config={config}",)
WORKDIR = ("--workdir={root}/run",)
# (case, script, arguments, expected text of the one error line)
CASES = [
    ("workdir_is_a_file", "train.py", CONFIG + ("--workdir={file}",),
     "{file}: exists and is not a directory"),
    ("workdir_read_only", "train.py", CONFIG + ("--workdir=READ_ONLY/run",),
     "READ_ONLY: not writable"),
    ("evaluate_workdir_is_a_file", "evaluate.py", CONFIG + ("--workdir={file}",),
     "{file}: exists and is not a directory"),
    ("misspelt_key", "train.py", CONFIG + WORKDIR + ("--config.train.stepz=3",),
     "--config.train.stepz: no such config key (did you mean 'steps'?)"),
    ("unknown_flag", "evaluate.py", CONFIG + WORKDIR + ("--no_such_flag",),
     "Unknown command line flag 'no_such_flag'"),
    ("missing_step", "evaluate.py", ("--workdir={checkpointed}", "--step=99"),
     "no checkpoint for step 99"),
    ("evaluate_without_config", "evaluate.py", WORKDIR, "has no checkpoint: give --config"),
    ("export_into_existing", "export.py", ("--workdir={checkpointed}",
                                           "--out={root}/existing_bundle"),
     "existing_bundle exists; choose a new bundle directory"),
    ("export_without_checkpoint", "export.py", ("--workdir={root}/empty_run",
                                                "--out={root}/new_bundle"),
     "no checkpoint"),
    ("format_squad_on_a_directory", "train.py", CONFIG + WORKDIR + (
        "--config.data.format=squad",), "config.data.format='squad' reads a SQuAD v1.1 JSON"),
    ("format_beir_on_a_file", "train.py", CONFIG + WORKDIR + (
        "--config.data.root={root}/bad_squad.json",), "config.data.format='beir' reads a "
     "directory"),
    ("malformed_squad", "train.py", CONFIG + WORKDIR + (
        "--config.data.format=squad", "--config.data.root={root}/bad_squad.json"),
     "bad_squad.json: not a SQuAD v1.1 file"),
    ("malformed_squad_convert", "convert_squad.py", ("--input={root}/bad_squad.json",
                                                     "--output_dir={root}/dpr"),
     "bad_squad.json: not a SQuAD v1.1 file"),
    ("lone_surrogate", "train.py", CONFIG + WORKDIR + ("--config.data.root={surrogate}",),
     "queries.jsonl:161: a \\u escape of a lone surrogate (\\ud800) is not a character"),
    ("corpus_twice", "train.py", CONFIG + WORKDIR + ("--config.data.root={both}",),
     "holds both corpus.jsonl and corpus.jsonl.gz"),
    ("depth_below_cutoff", "evaluate.py", CONFIG + WORKDIR + ("--config.eval.depth=5",),
     "config.eval.depth=5: expected >= 1000, the cut-offs of config.eval.measures 'nDCG@10', "
     "'MRR@10', 'R@10', 'R@100', 'R@1000'"),
    ("passage_length_over_positions", "train.py", CONFIG + WORKDIR + (
        "--config.model.max_passage_length=1024",),
     "config.model.max_passage_length=1024: expected <= 128"),
    ("truncated_bundle_file", "search.py", ("--bundle={bundle}", "fever"),
     "bundle/passages.jsonl: {bundle}/bundle.json records fingerprint"),
    ("not_a_bundle", "search.py", ("--bundle={root}", "fever"), "bundle.json: missing"),
    ("search_k_zero", "search.py", ("--bundle={bundle}", "--k=0", "fever"),
     "--k=0: expected a number of hits >= 1"),
    ("search_empty_query", "search.py", ("--bundle={bundle}", " "), "query 0 is empty"),
    ("plot_without_metrics", "plot.py", ("{root}/empty_run",), "nothing to plot"),
]


def _run(script, args, env_extra=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1",
             PYTHONPATH=str(REPO), **(env_extra or {}))
  env.pop("QDR_JAX_VERBOSE", None)
  return subprocess.run([sys.executable, str(REPO / "experiments" / script), *args],
                        capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("script,args,expected", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line(inputs, script, args, expected):
  read_only = _read_only_dir()
  if any("READ_ONLY" in a for a in args):
    if read_only is None:
      pytest.skip("no read-only directory on this machine")
    args = [a.replace("READ_ONLY", read_only) for a in args]
    expected = expected.replace("READ_ONLY", read_only)
  args = [a.format(**inputs) for a in args]
  result = _run(script, args)
  assert result.returncode == 2, result.stderr
  assert "Traceback" not in result.stderr
  lines = [l for l in result.stderr.splitlines() if l.strip() and not _NOT_AN_ERROR.match(l)]
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
  assert expected.format(**inputs) in lines[0], result.stderr
  assert not pathlib.Path(inputs["root"], "run").exists()  # nothing written


def test_verbose_adds_the_traceback(inputs):
  result = _run("plot.py", [f"{inputs['root']}/empty_run", "--verbose"])
  assert result.returncode == 2 and "Traceback" in result.stderr
  assert result.stderr.rstrip().splitlines()[-1].startswith("error: ")
