"""SIGTERM and SIGINT during training: a request to save and stop after the current step."""

from __future__ import annotations

import signal
import threading
from typing import Any, Sequence

from absl import logging


class StopSignal:
  """Turns SIGTERM and SIGINT (Ctrl-C) into a request the training loop honours after the
  current step.

  Installed only while the ``with`` block runs and only in the main thread (where
  Python delivers signals); the previous handlers are restored on exit, so the signals
  act as usual outside the loop. A second Ctrl-C while the step finishes interrupts at
  once (``KeyboardInterrupt``), as a user pressing it again expects.
  """

  def __init__(self, enabled: bool = True,
               signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)):
    self.enabled = enabled and threading.current_thread() is threading.main_thread()
    self.signals = tuple(signals)
    self.requested = False
    self._previous: dict[int, Any] = {}

  def _handle(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    logging.warning("received signal %d: saving a checkpoint after this step (Ctrl-C again "
                    "stops at once, without saving)", signum)
    self.requested = True
    self._signum = signum

  def __enter__(self) -> "StopSignal":
    self._acknowledged, self._signum = False, None
    if self.enabled:
      for s in self.signals:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def release(self) -> None:
    """Restores the previous handlers (the loop is over); idempotent."""
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()

  def acknowledge(self) -> None:
    """The loop saved and is stopping because of the signal."""
    self._acknowledged = True

  def __exit__(self, *exc) -> None:
    self.release()
    if self.requested and not self._acknowledged and self._signum is not None:
      # The signal came too late for the loop to act on it: deliver it as if we had
      # never caught it (by default, SIGTERM terminates).
      signal.raise_signal(self._signum)
