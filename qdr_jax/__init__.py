"""qdr_jax: dense retrievers trained in JAX to stay accurate on quantized FAISS indexes."""

import os

# OpenMP threads (FAISS, OpenBLAS, torch) spin after each parallel region and take
# the cores XLA's thread pool needs for the next step: on a small shared CPU that
# slowed encoder passes and index builds 2-15x (STACK.md). The OpenMP runtime reads
# this once, when it is loaded, so it must be set before faiss (or torch) is
# imported, hence here; an explicit user setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
