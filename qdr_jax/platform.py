"""Which backend the computation runs on, and the process-wide settings made for it.

Every module that takes a different path on CPU than on an accelerator asks `backend()`
here instead of reading JAX's default backend itself, so that one fixture
(`forced`) can make a CPU run take the GPU or TPU path and test it.

Importing any module of qdr_jax sets nothing process-wide. The experiment scripts call
`tune_process()` once (through `qdr_jax.cli.run_main`), which applies the CPU settings
on a CPU process and nothing elsewhere, and logs one line saying what it set:

* ``OMP_WAIT_POLICY=PASSIVE``: OpenMP threads (FAISS, OpenBLAS, torch) that spin after
  each parallel region take the cores XLA's thread pool needs for the next step; on a
  small shared CPU that slowed encoder passes and index builds 2-15x (docs/cpu-performance.md).
  The OpenMP runtime reads it once, when it is loaded; where it is already loaded (the
  scripts import FAISS), `tune_process` restarts the script once with the setting in
  its environment (`os.execve`, before anything ran).
* ``--xla_cpu_experimental_ynn_fusion_type=`` appended to ``XLA_FLAGS``: XLA:CPU's
  YNNPACK library fusions ran the encoder's GEMMs at 15-20 GFLOP/s on the training
  shapes where XLA's own dot kernels reach ~100 (the MiniLM forward at 32x256 27-34%
  less time without them; benchmarks/bench_encoder.py). XLA reads its flags when JAX
  creates its first backend, so this takes effect only before the first computation.
* glibc's malloc keeping freed memory mapped (`qdr_jax.host_memory`).

A user's own setting of any of them wins (and ``QDR_JAX_RETAIN_HEAP=0`` turns the
malloc one off).

"Is this a CPU process?" is decided without starting a backend (which would fix the
XLA flags before they are set), in this order:

1. a backend already started: the one JAX uses (its flags are then fixed; the log says so);
2. ``JAX_PLATFORMS`` (or ``jax.config.jax_platforms``): CPU iff its first entry is ``cpu``;
3. otherwise CPU iff no accelerator plugin is installed (a ``jax_plugins`` entry point or
   module, the CUDA/ROCm plugins, ``libtpu``): JAX prefers an installed accelerator, and
   a plugin with no device behind it is rare enough that such a host is left untuned
   rather than an accelerator host tuned for CPU.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import logging
import os
import sys
from collections.abc import Iterator, Mapping

import jax
from jax._src import xla_bridge

BACKENDS = ("cpu", "gpu", "tpu")
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
OMP_POLICY = "PASSIVE"
# Set in the environment of the one restart `tune_process` may do, so it never loops.
_RESTARTED = "QDR_JAX_TUNED_RESTART"
_ACCELERATOR_MODULES = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin",
                        "jax_rocm60_plugin", "libtpu", "jax_plugins")
_OPENMP_LIBRARIES = ("libgomp", "libomp", "libiomp")

_forced: str | None = None
# What the last `tune_process` set (benchmarks record it): name -> value.
tuned: dict[str, str] = {}


def backend() -> str:
  """'cpu', 'gpu' or 'tpu': the platform JAX computes on (or the one `forced` names)."""
  if _forced is not None:
    return _forced
  name = jax.default_backend()
  return "gpu" if name in ("cuda", "rocm") else name


def is_cpu() -> bool:
  return backend() == "cpu"


@contextlib.contextmanager
def forced(name: str) -> Iterator[None]:
  """Makes `backend()` answer ``name`` (tests run the accelerator branches on CPU)."""
  if name not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}.")
  global _forced
  old, _forced = _forced, name
  try:
    yield
  finally:
    _forced = old


def attention_implementation(dtype, head_dim: int, q_len: int, kv_len: int) -> str | None:
  """How `jax.nn.dot_product_attention` should run attention, or None for the explicit
  einsum-softmax-einsum form (CPU, where JAX has no fused kernel either).

  'cudnn' on a GPU when cuDNN's flash attention takes the shapes and dtype (fp16/bf16,
  head dim a multiple of 8 up to 128, even lengths: the bias's backward needs them),
  else 'xla'. cuDNN checks more than this (its version, the GPU's compute capability),
  so a caller falls back to 'xla' where the 'cudnn' call raises.
  """
  name = backend()
  if name == "cpu":
    return None
  if (name == "gpu" and jax.numpy.dtype(dtype) in (jax.numpy.float16, jax.numpy.bfloat16)
      and head_dim % 8 == 0 and head_dim <= 128 and q_len % 2 == 0 and kv_len % 2 == 0):
    return "cudnn"
  return "xla"


def _accelerator_installed() -> bool:
  if any(True for _ in importlib.metadata.entry_points(group="jax_plugins")):
    return True
  return any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_MODULES)


def process_is_cpu(environ: Mapping[str, str] | None = None) -> bool:
  """Whether this process computes on CPU, decided without starting a backend (the
  rule in the module docstring)."""
  environ = os.environ if environ is None else environ
  if jax._src.xla_bridge.backends_are_initialized():  # pylint: disable=protected-access
    return backend() == "cpu"
  platforms = environ.get("JAX_PLATFORMS") or ""
  if environ is os.environ:
    platforms = platforms or jax.config.jax_platforms or ""
  first = platforms.split(",")[0].strip().lower()
  if first:
    return first == "cpu"
  return not _accelerator_installed()


def _openmp_loaded() -> bool:
  try:
    with open("/proc/self/maps", encoding="utf-8") as f:
      maps = f.read()
  except OSError:  # not Linux: assume loaded (FAISS is imported by then)
    return True
  return any(name in maps for name in _OPENMP_LIBRARIES)


def tune_process(environ: dict[str, str] | None = None, restart: bool = True) -> dict[str, str]:
  """Applies the CPU settings (module docstring) on a CPU process, none elsewhere.

  Call it once, first thing in a script's main. Returns what it set (also in `tuned`)
  and logs one line saying so.

  Args:
    environ: the environment to change (default ``os.environ``).
    restart: where ``OMP_WAIT_POLICY`` is unset but an OpenMP runtime is already loaded,
      restart the script with it set (only with ``os.environ``, and at most once).
  """
  from qdr_jax import host_memory  # pylint: disable=import-outside-toplevel
  env = os.environ if environ is None else environ
  done: dict[str, str] = {}
  if not process_is_cpu(env):
    tuned.clear()
    logging.info("tune_process: backend %s, no process-wide settings", _label(env))
    return done
  started = xla_bridge.backends_are_initialized()
  if env.pop(_RESTARTED, None) is not None:
    done["OMP_WAIT_POLICY"] = f"{OMP_POLICY} (restarted)"
  elif "OMP_WAIT_POLICY" not in env:
    env["OMP_WAIT_POLICY"] = done["OMP_WAIT_POLICY"] = OMP_POLICY
    if (restart and env is os.environ and _RESTARTED not in env and _openmp_loaded()
        and sys.argv and sys.argv[0] and os.path.exists(sys.argv[0])):
      env[_RESTARTED] = "1"
      logging.info("tune_process: restarting with OMP_WAIT_POLICY=%s (OpenMP already loaded)",
                   OMP_POLICY)
      sys.stdout.flush()
      sys.stderr.flush()
      os.execve(sys.executable, [sys.executable, *sys.argv], dict(env))
  if YNN_FLAG not in env.get("XLA_FLAGS", ""):
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {YNN_FLAG}=".strip()
    done["XLA_FLAGS"] = f"+{YNN_FLAG}=" + (" (too late: backend started)" if started else "")
  if host_memory.wanted(env) and host_memory.retain_freed_memory():
    done["malloc"] = "retain freed memory"
  tuned.clear()
  tuned.update(done)
  logging.info("tune_process: backend cpu, set %s",
               ", ".join(f"{k}={v}" for k, v in done.items()) or "nothing (all set already)")
  return done


def _label(environ: Mapping[str, str]) -> str:
  if jax._src.xla_bridge.backends_are_initialized():  # pylint: disable=protected-access
    return backend()
  return environ.get("JAX_PLATFORMS") or "accelerator plugin installed"


def cpu_model() -> str:
  """The CPU's model name (``/proc/cpuinfo``), or the platform's processor string."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  import platform as _std_platform  # pylint: disable=import-outside-toplevel
  return _std_platform.processor() or _std_platform.machine()


def device_kind() -> str:
  """The first device's kind ('cpu', 'NVIDIA H100 80GB HBM3', 'TPU v5 lite', ...)."""
  return jax.devices()[0].device_kind
