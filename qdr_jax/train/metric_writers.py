"""A run's metric logs: ``metrics.jsonl`` and TensorBoard event files side by side.

Every record the loop writes goes to both: one JSON object a line in ``metrics.jsonl``
(what the repository's scripts read) and, for each number in it, a TensorBoard scalar at
the record's step (nested dictionaries become ``outer/inner`` tags). The config goes in
once as hyperparameters (TensorBoard's HParams tab) and as text. ``tensorboard
--logdir=WORKDIR`` reads the event files. Only process 0 writes.
"""

from __future__ import annotations

import json
import pathlib
import re
import time
from typing import Any, Iterator, Mapping

import ml_collections
import numpy as np

from qdr_jax.config import flat_items
from qdr_jax.io_utils import write_text_atomic


def tensorboard_tag(name: str) -> str:
  """``name`` in the characters TensorBoard keeps in a tag (others become ``_``, as
  tensorboardX would make them anyway): ``eval_quantized/nDCG@10`` -> ``.../nDCG_10``."""
  return re.sub(r"[^-/\w.]", "_", name)


def flat_scalars(record: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
  """(tag, value) of every real number in ``record``, nested mappings as ``outer/inner``
  tags (`tensorboard_tag`); strings, lists and None are left out (``step`` too, at the
  top level)."""
  for key, value in record.items():
    tag = tensorboard_tag(f"{prefix}{key}")
    if isinstance(value, Mapping):
      yield from flat_scalars(value, tag + "/")
    elif (isinstance(value, (int, float, np.integer, np.floating))
          and not (not prefix and key == "step")):
      yield tag, float(value)


def config_hparams(config: ml_collections.ConfigDict) -> dict[str, bool | int | float | str]:
  """The config's leaves as ``section.key`` -> value, in the types TensorBoard's HParams
  take (tuples as their JSON text; unset placeholders left out)."""
  out = {}
  for name, value in flat_items(config).items():
    if isinstance(value, (bool, int, float, str)):
      out[name] = value
    elif value is not None:
      out[name] = json.dumps(value.to_dict() if isinstance(value, ml_collections.ConfigDict)
                             else value)
  return out


class MetricsWriter:
  """Appends records to ``metrics.jsonl`` and TensorBoard event files in its folder
  (process 0 only: ``enabled`` False makes every call a no-op)."""

  def __init__(self, path: pathlib.Path, enabled: bool):
    self.path = pathlib.Path(path)
    self.enabled = enabled
    self._tensorboard = None
    self._purge_step: int | None = None

  def _events(self):
    """The TensorBoard writer, opened on first use (after a resume's truncation, so that
    TensorBoard drops the steps past the checkpoint from the earlier event files)."""
    if self._tensorboard is None:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      # The file name has the time in seconds only: without a suffix of its own, a second
      # writer opened within the same second (the final evaluation's, a resume's) would
      # replace it. The suffix counts the files already there, so that names sort in the
      # order the files were written, as TensorBoard reads them.
      count = len(list(self.path.parent.glob("events.out.tfevents.*")))
      self._tensorboard = SummaryWriter(logdir=str(self.path.parent),
                                        purge_step=self._purge_step, flush_secs=30,
                                        filename_suffix=f".{count:04d}")
      if count == 0 and self._purge_step is None:
        # TensorBoard takes a run's first SessionLog.START for its start and purges only at
        # a later one (the START a resume's purge_step writes): mark the start, or the
        # steps a resume drops would still show.
        from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
        start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
        self._tensorboard.file_writer.add_event(event_pb2.Event(
            wall_time=time.time(), step=0, session_log=start))
    return self._tensorboard

  def write(self, record: dict) -> None:
    """One record (with its ``step``) to both logs."""
    if not self.enabled:
      return
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    self.write_scalars(int(record.get("step", 0)), record)

  def write_scalars(self, step: int, values: Mapping[str, Any]) -> None:
    """The numbers of ``values`` as TensorBoard scalars only (`flat_scalars`' tags)."""
    if not self.enabled:
      return
    events = self._events()
    for tag, value in flat_scalars(values):
      events.add_scalar(tag, value, step)

  def write_config(self, config: ml_collections.ConfigDict, metric_tags: tuple[str, ...]
                   ) -> None:
    """The config as TensorBoard hyperparameters (compared against ``metric_tags``, the
    scalars the HParams tab shows) and as text."""
    if not self.enabled:
      return
    from tensorboardX.summary import hparams  # pylint: disable=import-outside-toplevel
    events = self._events()
    tags = dict.fromkeys(map(tensorboard_tag, metric_tags), 0.0)
    for summary in hparams(config_hparams(config), tags):
      events.file_writer.add_summary(summary)
    events.add_text("config", "```\n" + config.to_json_best_effort(indent=2) + "\n```", 0)

  def truncate_after(self, step: int) -> None:
    """Drops records of steps after ``step``, so a resumed log has no duplicates; the
    JSONL log is replaced atomically (a full disk keeps the old one), and TensorBoard
    purges those steps when the next event file opens."""
    if not self.enabled:
      return
    self._purge_step = step + 1
    if not self.path.exists():
      return
    lines = [line for line in self.path.read_text().splitlines() if line.strip()]
    keep = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(keep) != len(lines):
      write_text_atomic(self.path, "".join(line + "\n" for line in keep))

  def close(self) -> None:
    """Flushes and closes the event file (the JSONL log is written through)."""
    if self._tensorboard is not None:
      self._tensorboard.close()
      self._tensorboard = None
