r"""FAISS's OpenMP waiting policy against XLA on a shared CPU: index builds and interleaving.

  python experiments/bench_omp_wait.py --out=runs/bench_omp_wait.json

The OpenMP runtime reads its waiting policy once, when FAISS loads it, so each setting
runs in a child process of its own, which imports FAISS before `platform.tune_process`
(whose defaults would otherwise fill in unset variables) applies the other CPU settings (``--settings``: ``name=VAR=value;VAR=value``, an empty
value unsets the variable). Each child times, on a table (``--table``, a ``.npy``; default
random unit vectors of SciFact's size):
- build: training ``--factory`` (the demo's IVF64,PQ48x8: 48 k-means of 25 iterations,
  thousands of short OpenMP regions) and adding the table, ``--repeats`` times;
- interleaved: ``--steps`` rounds of a FAISS search of 32 queries followed by a jitted
  XLA computation of about the demo step's size (4 GEMMs of 1024x384x1536), the pattern of
  a training loop. Spinning OpenMP threads steal the cores XLA's pool needs here.
Medians are printed and written as JSON, one entry per setting.
"""

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

_SETTINGS = flags.DEFINE_list(
    "settings",
    ["passive=OMP_WAIT_POLICY=PASSIVE;GOMP_SPINCOUNT=",
     "passive_spin10k=OMP_WAIT_POLICY=PASSIVE;GOMP_SPINCOUNT=10000",
     "libgomp_default=OMP_WAIT_POLICY=;GOMP_SPINCOUNT="],
    "name=VAR=value;VAR=value per setting (an empty value unsets VAR).")
_TABLE = flags.DEFINE_string("table", "", "Table .npy to index ('' = random 5183 x 384).")
_FACTORY = flags.DEFINE_string("factory", "IVF64,PQ48x8", "FAISS index_factory string.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Index builds per setting.")
_STEPS = flags.DEFINE_integer("steps", 20, "Interleaved search + XLA rounds per setting.")
_OUT = flags.DEFINE_string("out", "bench_omp_wait.json", "Result JSON path.")

_CHILD = r"""
import json, sys, time
import numpy as np
import faiss  # first: its OpenMP runtime sees exactly the setting's environment
from qdr_jax import platform
platform.tune_process(restart=False)  # the XLA flag and malloc; OpenMP already read its policy
import jax, jax.numpy as jnp
from qdr_jax.index.faiss_index import add_vectors, search, train_index
table_path, factory, repeats, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if table_path:
  table = np.load(table_path, allow_pickle=False).astype(np.float32)
else:
  table = np.random.default_rng(0).standard_normal((5183, 384)).astype(np.float32)
  table /= np.linalg.norm(table, axis=1, keepdims=True)
builds = []
for _ in range(repeats):
  start = time.perf_counter()
  index = train_index(table, factory, seed=0, nprobe=16)
  add_vectors(index, table)
  builds.append(time.perf_counter() - start)
x = jnp.ones((1024, 384), jnp.float32) / 384
w1, w2 = jnp.ones((384, 1536), jnp.float32) / 384, jnp.ones((1536, 384), jnp.float32) / 1536
xla = jax.jit(lambda x: ((x @ w1) @ w2 @ w1) @ w2)
jax.block_until_ready(xla(x))
queries = table[:32]
rounds, xla_only = [], []
for _ in range(steps):
  start = time.perf_counter()
  search(index, queries, 100)
  mid = time.perf_counter()
  jax.block_until_ready(xla(x))
  rounds.append(time.perf_counter() - start)
  xla_only.append(time.perf_counter() - mid)
print(json.dumps({"build_s": builds, "round_s": rounds, "xla_s": xla_only}))
"""


def _parse(setting: str) -> tuple[str, dict[str, str]]:
  name, _, assignments = setting.partition("=")
  env = {}
  for item in filter(None, assignments.split(";")):
    var, sep, value = item.partition("=")
    if not sep or not var:
      raise SystemExit(f"--settings: {setting!r} has {item!r}; expected VAR=value.")
    env[var] = value
  if not name or not env:
    raise SystemExit(f"--settings: {setting!r}; expected name=VAR=value[;VAR=value].")
  return name, env


def main(argv):
  del argv
  results = {}
  for name, env_changes in map(_parse, _SETTINGS.value):
    env = dict(os.environ)
    for var, value in env_changes.items():
      if value:
        env[var] = value
      else:
        env.pop(var, None)
    out = subprocess.run([sys.executable, "-c", _CHILD, _TABLE.value, _FACTORY.value,
                          str(_REPEATS.value), str(_STEPS.value)],
                         env=env, capture_output=True, text=True, check=True).stdout
    raw = json.loads(out.strip().splitlines()[-1])
    results[name] = {"env": env_changes,
                     **{f"{k}_median": statistics.median(v) for k, v in raw.items()}, **raw}
    print(name, {k: round(v, 4) for k, v in results[name].items() if k.endswith("median")},
          flush=True)
  results["load_average"] = os.getloadavg()
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)
