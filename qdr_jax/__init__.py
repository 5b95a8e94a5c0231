"""qdr_jax: dense retrievers trained in JAX to stay accurate on quantized FAISS indexes."""

import os

# FAISS's OpenMP threads spin after each call by default (OMP_WAIT_POLICY=ACTIVE
# behaviour) and take the cores XLA's thread pool needs for the next step: on a
# small shared CPU that slowed encoder passes and index builds 2-15x. Passive
# waiting costs nothing measurable to FAISS itself. It only takes effect if set
# before the OpenMP runtime starts, i.e. before faiss (or torch) is imported, so it
# lives here; an explicit user setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
