"""Freed host memory kept mapped between calls (`qdr_jax.host_memory`)."""

import subprocess
import sys
import textwrap

import pytest

from qdr_jax import host_memory

# A fresh process per setting: the malloc settings are process-wide and applied by
# `platform.tune_process` (never by an import). It frees and reallocates a 256 MB
# block, as XLA:CPU does with an executable's buffers on every call, and counts the page
# faults of the second touch.
_PROBE = textwrap.dedent("""
    import ctypes, ctypes.util, resource, threading
    import qdr_jax, qdr_jax.host_memory
    from qdr_jax import platform
    assert not qdr_jax.host_memory.applied  # importing sets nothing
    platform.tune_process(restart=False)
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, faults = 1 << 28, []
    def touched_and_freed():  # plain malloc, as XLA's buffers (numpy asks for huge pages)
      block = libc.malloc(size)
      ctypes.memset(block, 1, size)
      libc.free(block)
    def call():  # on a worker thread, where XLA runs executables
      touched_and_freed()
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      touched_and_freed()
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    worker = threading.Thread(target=call)
    worker.start()
    worker.join()
    print(qdr_jax.host_memory.applied, faults[0])
""")


def _second_touch_faults(setting: str) -> int:
  """Page faults of the second touch; also checks `host_memory.applied` says the same."""
  env = {"QDR_JAX_RETAIN_HEAP": setting, "PATH": "/usr/bin:/bin"}
  done = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                        text=True, timeout=120, check=True)
  applied, faults = done.stdout.split()[-2:]
  assert applied == str(setting == "1")
  return int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_freed_block_is_reused_without_page_faults():
  pages = (1 << 28) // 4096
  assert _second_touch_faults("0") > pages // 2  # glibc's default: unmapped and mapped again
  assert _second_touch_faults("1") < pages // 20


def test_setting_is_read_from_the_environment():
  assert not host_memory.wanted({"QDR_JAX_RETAIN_HEAP": "0"})
  assert host_memory.wanted({"QDR_JAX_RETAIN_HEAP": "1"})
  with pytest.raises(ValueError, match="QDR_JAX_RETAIN_HEAP='maybe'"):
    host_memory.wanted({"QDR_JAX_RETAIN_HEAP": "maybe"})
