"""TensorBoard event files beside metrics.jsonl, read back with the event protobuf and with
TensorBoard's own reader, and the profiler switch."""

import json
import pathlib
import struct

import pytest
from conftest import make_tiny_config

from qdr_jax.config import base_config
from qdr_jax.experiment import train_and_evaluate
from qdr_jax.train.metric_writers import MetricsWriter, config_hparams, flat_scalars


def read_events(logdir: pathlib.Path) -> list:
  """Every Event of the TFRecord event files under ``logdir`` (length, its CRC, the
  record, its CRC: the CRCs are not checked here)."""
  from tensorboardX.proto.event_pb2 import Event  # pylint: disable=import-outside-toplevel
  events = []
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      events.append(Event.FromString(data[offset + 12:offset + 12 + length]))
      offset += 12 + length + 4
  return events


def scalars(events) -> dict[str, dict[int, float]]:
  """tag -> {step: value} of the scalar summaries (the last value of a step wins)."""
  out = {}
  for event in events:
    for value in event.summary.value:
      if value.HasField("simple_value"):
        out.setdefault(value.tag, {})[event.step] = value.simple_value
  return out


def tensorboard_run(logdir: pathlib.Path):
  """(multiplexer, run) of what ``tensorboard --logdir=logdir`` shows: the server's reader,
  which also drops the steps a resume purges."""
  # pylint: disable=import-outside-toplevel
  from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
  multiplexer = EventMultiplexer()
  multiplexer.AddRunsFromDirectory(str(logdir))
  multiplexer.Reload()
  (run,) = multiplexer.Runs()
  return multiplexer, run


def tensorboard_scalars(logdir: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
  """tag -> [(step, value)] of the scalars TensorBoard shows, in the order it keeps them."""
  from tensorboard.util.tensor_util import make_ndarray  # pylint: disable=import-outside-toplevel
  multiplexer, run = tensorboard_run(logdir)
  return {tag: [(event.step, float(make_ndarray(event.tensor_proto)))
                for event in multiplexer.Tensors(run, tag)]
          for tag in multiplexer.PluginRunToTagToContent("scalars")[run]}


def tensorboard_hparams(logdir: pathlib.Path) -> tuple[dict, list[str]]:
  """(hyperparameter -> value, metric tags) of TensorBoard's HParams tab."""
  from tensorboard.plugins.hparams import metadata  # pylint: disable=import-outside-toplevel
  multiplexer, run = tensorboard_run(logdir)
  content = multiplexer.PluginRunToTagToContent(metadata.PLUGIN_NAME)[run]
  start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
  experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
  hparams = {name: getattr(value, value.WhichOneof("kind"))
             for name, value in start.hparams.items()}
  return hparams, [info.name.tag for info in experiment.metric_infos]


def test_flat_scalars_nests_tags_and_skips_non_numbers():
  record = {"step": 3, "loss": 1.5, "eval_quantized": {"nDCG@10": 0.25}, "name": "x",
            "flag": True, "list": [1]}
  assert dict(flat_scalars(record)) == {"loss": 1.5, "eval_quantized/nDCG_10": 0.25,
                                        "flag": 1.0}


def test_config_hparams_are_tensorboard_types():
  hparams = config_hparams(base_config())
  assert hparams["loss.temperature"] == 0.05 and hparams["train.mode"] == "dback"
  assert hparams["eval.index_seeds"] == "[0, 1, 2]"
  assert all(isinstance(v, (bool, int, float, str)) for v in hparams.values())


def test_writer_writes_both_logs_and_a_resume_purges_later_steps(tmp_path):
  writer = MetricsWriter(tmp_path / "metrics.jsonl", enabled=True)
  writer.write_config(base_config(), metric_tags=("loss",))
  for step in (1, 2, 3):
    writer.write({"step": step, "loss": float(step)})
  writer.close()
  resumed = MetricsWriter(tmp_path / "metrics.jsonl", enabled=True)
  resumed.truncate_after(1)
  resumed.write({"step": 2, "loss": 20.0})
  resumed.close()
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in lines] == [1, 2]
  events = read_events(tmp_path)
  # The resumed file starts with a purge mark at the checkpoint's next step.
  assert any(e.HasField("session_log") and e.step == 2 for e in events)
  assert scalars(events)["loss"] == {1: 1.0, 2: 20.0, 3: 3.0}
  # TensorBoard drops the purged steps: the first run's 2 and 3.
  assert tensorboard_scalars(tmp_path)["loss"] == [(1, 1.0), (2, 20.0)]
  tags = {v.tag for e in events for v in e.summary.value}
  assert {"_hparams_/experiment", "_hparams_/session_start_info", "config/text_summary"} <= tags


def test_disabled_writer_writes_nothing(tmp_path):
  writer = MetricsWriter(tmp_path / "metrics.jsonl", enabled=False)
  writer.write_config(base_config(), metric_tags=("loss",))
  writer.write({"step": 1, "loss": 1.0})
  writer.close()
  assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def tiny_run(tiny_beir, tiny_encoder_dir, tmp_path_factory) -> pathlib.Path:
  """The workdir of a 4-step run that evaluates at steps 2 and 4 and profiles steps 1-2."""
  root = tmp_path_factory.mktemp("tiny_run")
  config = make_tiny_config(tiny_beir, tiny_encoder_dir, root / "cache")
  config.train.steps = 4
  config.index.rebuild_every = 2
  config.eval.every = 2
  config.data.dev_split, config.data.dev_queries = "dev", 16  # what eval.every reads
  config.train.profile_steps = (1, 3)
  train_and_evaluate(config, root / "run")
  return root / "run"


def test_tiny_run_writes_event_files_and_a_profile(tiny_run):
  found = scalars(read_events(tiny_run))
  assert set(found["loss"]) == {1, 2, 3, 4}
  assert set(found["eval_quantized/nDCG_10"]) == {2, 4}
  assert set(found["eval/flat/nDCG_10"]) == set(found["eval/quantized/R_100"]) == {0, 4}
  assert {"pool_accuracy", "encoder_lr", "steps_per_second"} <= set(found)
  assert list((tiny_run / "profile").rglob("*.xplane.pb"))


def test_tensorboard_reads_the_tiny_runs_scalars_and_hparams(tiny_run):
  records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
  logged = {"loss": {r["step"]: r["loss"] for r in records if "loss" in r},
            "eval_quantized/nDCG_10": {r["step"]: r["eval_quantized"]["nDCG@10"]
                                       for r in records if "eval_quantized" in r}}
  assert sorted(logged["loss"]) == [1, 2, 3, 4]
  assert sorted(logged["eval_quantized/nDCG_10"]) == [2, 4]
  found = tensorboard_scalars(tiny_run)
  for tag, by_step in logged.items():
    steps, values = zip(*found[tag])
    assert list(steps) == sorted(by_step)  # each logged step once, in order
    assert list(values) == pytest.approx([by_step[step] for step in steps], rel=1e-6)
  assert [step for step, _ in found["eval/flat/nDCG_10"]] == [0, 4]
  hparams, metrics = tensorboard_hparams(tiny_run)
  assert hparams["train.steps"] == 4 and hparams["index.factory"] == "IVF4,PQ4x8"
  assert hparams["train.mode"] == "dback" and hparams["eval.index_seeds"] == "[0]"
  assert metrics == ["loss", "eval_quantized/nDCG_10"]


@pytest.mark.parametrize("steps", [(2, 1), (0, 9), (-1, 1), (1,)])
def test_profile_steps_outside_the_run_are_refused(steps):
  from qdr_jax.validation import ConfigError, validate_config
  c = base_config()
  c.train.steps = 8
  c.train.profile_steps = steps
  with pytest.raises(ConfigError, match="train.profile_steps"):
    validate_config(c)
