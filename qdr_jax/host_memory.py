"""Keep freed host memory mapped between XLA:CPU calls (glibc's malloc settings).

XLA:CPU allocates an executable's temporary buffers afresh on every call (about 490 MB
for the encoder's 32 x 64 forward+backward) and glibc hands blocks that large to the
kernel with `mmap` and back with `munmap`, so every call touches ~125,000 new pages. On
a 2-core CPU those page faults cost 0.15-0.6 s of a 1.3-1.9 s
training pass, varying from run to run. Serving such blocks from the heap and keeping
the freed heap instead (no mmap threshold below 1 GiB, no trimming below 2 GiB, one
arena so that XLA's worker threads use the main heap too; a thread arena cannot grow
past 64 MB and falls back to `mmap`) removes the faults (docs/cpu-performance.md).

The cost is a process that keeps up to the settings' sizes of freed memory it could
have returned; it applies only to CPU processes (`qdr_jax.platform.process_is_cpu`),
where host memory is what the computation runs in. ``QDR_JAX_RETAIN_HEAP=0`` turns it
off, ``=1`` forces it on. Process-wide, so nothing applies it on import:
`qdr_jax.platform.tune_process` does, before JAX starts its threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

ENV = "QDR_JAX_RETAIN_HEAP"
# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
SETTINGS = {_M_MMAP_THRESHOLD: 1 << 30, _M_TRIM_THRESHOLD: (1 << 31) - 1, _M_ARENA_MAX: 1}
# Whether `retain_freed_memory` took effect in this process (benchmarks record it).
applied = False


def wanted(environ: dict[str, str] | None = None) -> bool:
  """Whether to retain freed memory: the env setting, else on for CPU processes."""
  environ = os.environ if environ is None else environ
  setting = environ.get(ENV, "").strip().lower()
  if setting in ("0", "false", "no", "off"):
    return False
  if setting in ("1", "true", "yes", "on"):
    return True
  if setting:
    raise ValueError(f"{ENV}={environ[ENV]!r}: expected 0 or 1 (or unset: on for CPU "
                     "processes).")
  from qdr_jax import platform  # pylint: disable=import-outside-toplevel
  return platform.process_is_cpu(environ)


def retain_freed_memory() -> bool:
  """Applies `SETTINGS` through glibc's `mallopt`; False where there is no glibc."""
  name = ctypes.util.find_library("c")
  try:
    libc = ctypes.CDLL(name)
    mallopt = libc.mallopt
  except (OSError, AttributeError, TypeError):  # musl, macOS, Windows: nothing to set
    return False
  global applied
  results = [mallopt(param, value) for param, value in SETTINGS.items()]  # all, no short cut
  applied = all(result == 1 for result in results)
  return applied
