"""The experiment scripts' main wrapper: user errors as one line and exit status 2.

A mistake in the flags, the config or the input files (`user_errors()`, a file-system
error, a flag or config override that does not parse) is reported as ``error: <message>``
on stderr, one line per problem, without a traceback; ``--verbose`` or
``QDR_JAX_VERBOSE=1`` shows the traceback too. A failure of process 0's host work in a
multi-process job (``qdr_jax.distributed.LeadProcessError``) is reported the same way on
every process, with exit status 1. Anything else is a bug and keeps its traceback (exit
status 1).
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from collections.abc import Callable
from typing import Any

from absl import app, flags

_VERBOSE = flags.DEFINE_bool("verbose", False,
                             "Show the traceback of input and config errors too.")
USER_ERROR_STATUS = 2
INTERRUPTED_STATUS = 130  # the shell's status for a process stopped by SIGINT
FAILURE_STATUS = 1  # an internal failure reported in one line (not the user's to fix)


# (module, class) of the errors a user can fix: the config, the data files, the
# checkpoint or the bundle they point at.
_USER_ERRORS = (
    ("qdr_jax.validation", "ConfigError"), ("qdr_jax.data.types", "DataFormatError"),
    ("qdr_jax.train.checkpoint", "MetadataMismatchError"),
    ("qdr_jax.train.checkpoint", "CheckpointError"),
    ("qdr_jax.fingerprint", "FingerprintMismatchError"), ("qdr_jax.serving", "BundleError"),
    ("qdr_jax.io_utils", "WorkdirLockedError"), ("qdr_jax.train.loop", "NonFiniteError"))


# Internal failures that every process of a job reports alike, in one line.
_ONE_LINE_FAILURES = (("qdr_jax.distributed", "LeadProcessError"),)


def _loaded(names: tuple[tuple[str, str], ...]) -> list[type[BaseException]]:
  return [getattr(sys.modules[module], name) for module, name in names
          if module in sys.modules]


def user_errors() -> tuple[type[BaseException], ...]:
  """What a user can fix: the config, the data files, the checkpoint or bundle they point
  at, the file system (a workdir that is a file, a read-only mount, a full disk, a missing
  file), text that is not Unicode, a script's own flag checks (``UsageError``).

  Looked up among the modules already imported, not imported here: an error can only
  have been raised by a module that was loaded, and importing the others (JAX, FAISS)
  would slow the report down and print their own log lines; it also lets a script import
  this module before it sets up JAX (XLA_FLAGS, platforms).
  """
  return (*_loaded(_USER_ERRORS), OSError, UnicodeError, app.UsageError)


def verbose(argv: list[str] | None = None) -> bool:
  """``--verbose`` or ``QDR_JAX_VERBOSE``; ``argv`` is read when the flags failed to parse."""
  env = os.environ.get("QDR_JAX_VERBOSE", "").strip().lower()
  if env not in ("", "0", "false", "no"):
    return True
  if flags.FLAGS.is_parsed():
    return _VERBOSE.value
  return any(a in ("--verbose", "--verbose=true", "--verbose=1") for a in argv or ())


def error_lines(error: BaseException) -> list[str]:
  """``error: ...`` lines for a user error; an OSError names its file."""
  if isinstance(error, OSError) and error.filename is not None:
    text = f"{error.filename}: {error.strerror or error}"
  elif isinstance(error, UnicodeError):
    text = f"text that is not valid Unicode ({error}); fix or re-encode the input file"
  else:
    text = str(error) or type(error).__name__
  return [f"error: {line}" for line in text.splitlines() if line.strip()]


def _flag_error_line(error: BaseException, argv: list[str]) -> str:
  r"""One line for a flag or config override that does not parse: ml_collections reports
  a misspelt key as ``'stepz'\nDid you mean "steps" instead of "stepz"?``."""
  text = str(error.args[0] if isinstance(error, (AttributeError, KeyError)) and error.args
             else error)
  suggestion = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
  if suggestion:
    wrong, right = suggestion.group(2), suggestion.group(1)
    given = next((a.split("=")[0] for a in argv[1:]
                  if re.search(rf"\.{re.escape(wrong)}(=|$)", a.split("=")[0])), wrong)
    return f"error: {given}: no such config key (did you mean {right!r}?)"
  return "error: " + " ".join(line.strip() for line in text.splitlines() if line.strip())


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a flag or config error as one line and exit status 2."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  # a flag, a config file, an override
    if verbose(argv):
      traceback.print_exc()
    print(_flag_error_line(e, argv), file=sys.stderr)
    sys.exit(USER_ERROR_STATUS)


def guarded(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
  """``main`` reporting `user_errors()` as one-line messages and exiting with status 2
  (process 0's failures in a multi-process job: the same, with status 1)."""

  def wrapped(argv: list[str]) -> Any:
    try:
      return main(argv)
    # Evaluated only once something is raised.
    except (*user_errors(), *_loaded(_ONE_LINE_FAILURES)) as e:
      if verbose():
        traceback.print_exc()
      print("\n".join(error_lines(e)), file=sys.stderr)
      sys.exit(USER_ERROR_STATUS if isinstance(e, user_errors()) else FAILURE_STATUS)
    except KeyboardInterrupt:
      # Training saves and returns on the first Ctrl-C when it checkpoints; anything else
      # stops where it is (atomic writes leave no half-written file).
      if verbose():
        traceback.print_exc()
      print("interrupted", file=sys.stderr)
      sys.exit(INTERRUPTED_STATUS)

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
  app.run(guarded(tuned(main)), flags_parser=parse_flags)
