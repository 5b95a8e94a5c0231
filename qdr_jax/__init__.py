"""qdr_jax: dense retrievers trained in JAX to stay accurate on quantized FAISS indexes."""

import os

# OpenMP threads (FAISS, OpenBLAS, torch) spin after each parallel region and take
# the cores XLA's thread pool needs for the next step: on a small shared CPU that
# slowed encoder passes and index builds 2-15x (STACK.md). The OpenMP runtime reads
# this once, when it is loaded, so it must be set before faiss (or torch) is
# imported, hence here; an explicit user setting wins. A short spin before sleeping
# (GOMP_SPINCOUNT=10000, about 0.1 ms) was measured against it: the demo's index build
# 7.3-6.8 s instead of 7.8-7.7 s, XLA steps between FAISS searches 0-5% slower, i.e. no
# net gain (experiments/bench_omp_wait.py, BENCHMARKS.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# XLA:CPU's YNNPACK library fusions run the encoder's GEMMs together with their
# bias/GELU/reduce neighbours at 15-20 GFLOP/s on the (2048, 384) training shapes,
# where XLA's own dot kernels reach ~100. With them off, the MiniLM forward at 32x256
# took 6.2-8.9 s instead of 9.3-12.4 s (27-34% less; PyTorch 6.0-8.4 s) and
# forward+backward at 32x64 0-7% less, in three runs timing both side by side in one
# process (experiments/bench_encoder.py --variants=default,ynn_xla_default, issue
# 12); outputs unchanged to 3e-7. The flag is read when JAX first creates a backend,
# so it is appended here, before any computation; it is CPU-only (GPU/TPU compilers
# ignore it). A user's own setting of it wins.
_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
if _YNN_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_YNN_FLAG}=".strip()

# XLA:CPU maps its per-call buffers afresh and glibc unmaps them after each call: ~0.2-0.6
# s of page faults per encoder training pass here. Set before JAX starts its threads.
from qdr_jax import host_memory as _host_memory  # pylint: disable=wrong-import-position

if _host_memory.wanted():
  _host_memory.retain_freed_memory()
