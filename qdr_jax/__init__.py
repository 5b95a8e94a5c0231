"""qdr_jax: dense retrievers trained in JAX to stay accurate on quantized FAISS indexes.

Importing it (or any of its modules) changes nothing process-wide: the CPU tuning
(OpenMP wait policy, an XLA:CPU flag, glibc's malloc) is applied by
`qdr_jax.platform.tune_process`, which the experiment scripts call.
"""
