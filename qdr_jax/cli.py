"""The experiment scripts' main wrapper: user errors as one line and exit status 2.

A mistake in the config or the input files (`user_errors()`) is reported as
``error: <message>`` on stderr, one line per problem, without a traceback; ``--verbose``
or ``QDR_JAX_VERBOSE=1`` shows the traceback too. Anything else is a bug and keeps its
traceback (exit status 1).
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

from absl import app, flags

_VERBOSE = flags.DEFINE_bool("verbose", False,
                             "Show the traceback of input and config errors too.")
USER_ERROR_STATUS = 2


def user_errors() -> tuple[type[BaseException], ...]:
  """What a user can fix: the config, the data files, the checkpoint they point at.

  Imported when an error is raised, not with this module, so that a script importing it
  can still set up JAX (XLA_FLAGS, platforms) before JAX is first imported.
  """
  # pylint: disable=import-outside-toplevel
  from qdr_jax.data.types import DataFormatError
  from qdr_jax.fingerprint import FingerprintMismatchError
  from qdr_jax.io_utils import WorkdirLockedError
  from qdr_jax.train.checkpoint import MetadataMismatchError
  from qdr_jax.train.loop import NonFiniteError
  from qdr_jax.validation import ConfigError
  return (ConfigError, DataFormatError, MetadataMismatchError, FingerprintMismatchError,
          WorkdirLockedError, NonFiniteError, FileNotFoundError, NotADirectoryError,
          IsADirectoryError, PermissionError)


def verbose() -> bool:
  env = os.environ.get("QDR_JAX_VERBOSE", "").strip().lower()
  return env not in ("", "0", "false", "no") or (flags.FLAGS.is_parsed() and _VERBOSE.value)


def error_lines(error: BaseException) -> list[str]:
  """``error: ...`` lines for a user error; an OSError names its file."""
  if isinstance(error, OSError) and error.filename is not None:
    text = f"{error.filename}: {error.strerror or error}"
  else:
    text = str(error) or type(error).__name__
  return [f"error: {line}" for line in text.splitlines() if line.strip()]


def guarded(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
  """``main`` reporting `user_errors()` as one-line messages and exiting with status 2."""

  def wrapped(argv: list[str]) -> Any:
    try:
      return main(argv)
    except user_errors() as e:  # evaluated only once something is raised
      if verbose():
        traceback.print_exc()
      print("\n".join(error_lines(e)), file=sys.stderr)
      sys.exit(USER_ERROR_STATUS)

  return wrapped


def tuned(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
  """``main`` preceded by `qdr_jax.platform.tune_process` (the CPU settings on a CPU
  process; it may restart the script once to set OpenMP's wait policy)."""

  def wrapped(argv: list[str]) -> Any:
    from qdr_jax import platform  # pylint: disable=import-outside-toplevel
    platform.tune_process()
    return main(argv)

  return wrapped


def run_main(main: Callable[[list[str]], Any]) -> None:
  """`absl.app.run` for an experiment script's ``main``: the process tuned for its
  backend first (`tuned`), user errors reported as one line (`guarded`)."""
  app.run(guarded(tuned(main)))
