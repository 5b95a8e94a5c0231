"""TensorBoard event files beside metrics.jsonl, read back with the event protobuf, and
the profiler switch."""

import json
import pathlib
import struct

import pytest

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
  assert scalars(events)["loss"] == {1: 1.0, 2: 20.0, 3: 3.0}  # TensorBoard drops 3
  tags = {v.tag for e in events for v in e.summary.value}
  assert {"_hparams_/experiment", "_hparams_/session_start_info", "config/text_summary"} <= tags


def test_disabled_writer_writes_nothing(tmp_path):
  writer = MetricsWriter(tmp_path / "metrics.jsonl", enabled=False)
  writer.write_config(base_config(), metric_tags=("loss",))
  writer.write({"step": 1, "loss": 1.0})
  writer.close()
  assert list(tmp_path.iterdir()) == []


def test_tiny_run_writes_event_files_and_a_profile(tiny_config, tmp_path):
  tiny_config.train.steps = 4
  tiny_config.index.rebuild_every = 2
  tiny_config.eval.every = 2
  tiny_config.data.dev_split, tiny_config.data.dev_queries = "dev", 16  # what eval.every reads
  tiny_config.train.profile_steps = (1, 3)
  workdir = tmp_path / "run"
  train_and_evaluate(tiny_config, workdir)
  found = scalars(read_events(workdir))
  assert set(found["loss"]) == {1, 2, 3, 4}
  assert set(found["eval_quantized/nDCG_10"]) == {2, 4}
  assert set(found["eval/flat/nDCG_10"]) == set(found["eval/quantized/R_100"]) == {0, 4}
  assert {"pool_accuracy", "encoder_lr", "steps_per_second"} <= set(found)
  assert list((workdir / "profile").rglob("*.xplane.pb"))


@pytest.mark.parametrize("steps", [(2, 1), (0, 9), (-1, 1), (1,)])
def test_profile_steps_outside_the_run_are_refused(steps):
  from qdr_jax.validation import ConfigError, validate_config
  c = base_config()
  c.train.steps = 8
  c.train.profile_steps = steps
  with pytest.raises(ConfigError, match="train.profile_steps"):
    validate_config(c)
