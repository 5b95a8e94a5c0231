r"""Host memory of placing a memory-mapped table on the devices and updating its rows.

On CPU the devices' buffers live in the process's memory, so whatever the placement or
the update copies beyond the state shows up in its RSS. Prints RSS (and its file-backed
and anonymous parts) after placing the table, after creating the per-row Adam state,
and the peak over three donated row updates, next to the state's bytes.

  python experiments/bench_placement.py --rows=2000000 --dim=64 --devices=2
"""

from __future__ import annotations

import os
import pathlib
import re
import sys
import tempfile

from absl import app, flags

_ROWS = flags.DEFINE_integer("rows", 2_000_000, "Table rows.")
_DIM = flags.DEFINE_integer("dim", 64, "Table width.")
_DEVICES = flags.DEFINE_integer("devices", 2, "CPU devices to split the rows over.")
_POOL = flags.DEFINE_integer("pool", 16_000, "Rows each update touches.")


def rss(tag: str) -> None:
  status = pathlib.Path("/proc/self/status").read_text()
  values = {k: int(re.search(k + r":\s+(\d+) kB", status).group(1)) >> 10
            for k in ("VmRSS", "VmHWM", "RssFile", "RssAnon")}
  print(f"{tag:30s} " + "  ".join(f"{k} {v:,} MiB" for k, v in values.items()), flush=True)


def reset_peak() -> None:
  pathlib.Path("/proc/self/clear_refs").write_text("5")


def main(argv):
  del argv
  os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} "
                             f"--xla_force_host_platform_device_count={_DEVICES.value}")
  import jax
  import jax.numpy as jnp
  import numpy as np

  from qdr_jax import sharding
  from qdr_jax.config import base_config
  from qdr_jax.train import optim

  config = base_config()
  config.sharding.num_devices = _DEVICES.value
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "table.npy"
    rng = np.random.default_rng(0)
    writer = np.lib.format.open_memmap(path, "w+", np.float32, (_ROWS.value, _DIM.value))
    for start in range(0, _ROWS.value, 1 << 18):
      stop = min(start + (1 << 18), _ROWS.value)
      writer[start:stop] = rng.standard_normal((stop - start, _DIM.value), np.float32)
    writer.flush()
    del writer
    table = np.load(path, mmap_mode="r", allow_pickle=False)
    mesh = sharding.make_mesh(config.sharding)
    rows = sharding.padded_rows(_ROWS.value, mesh)
    row_tx = optim.make_row_transform(config.optim)
    rss("start")
    reset_peak()
    placed = sharding.put_rows(table, mesh, True, rows).block_until_ready()
    rss("placed (peak since start)")
    state = jax.jit(lambda t: optim.init_row_state(row_tx, t, False),
                    out_shardings=sharding.row_sharding(mesh, True))(placed)
    jax.block_until_ready(state)
    state_bytes = placed.nbytes + sum(x.nbytes for x in jax.tree.leaves(state))
    rss("per-row Adam state")

    def update(table, state, ids):
      pooled = table[ids]
      direction, new = jax.vmap(row_tx.update)(pooled * 0.01,
                                               jax.tree.map(lambda s: s[ids], state), pooled)
      return (table.at[ids].set(pooled - 1e-3 * direction),
              jax.tree.map(lambda s, n: s.at[ids].set(n), state, new))

    step = jax.jit(update, donate_argnums=(0, 1))
    reset_peak()
    for i in range(3):
      ids = jnp.asarray(np.random.default_rng(i).choice(_ROWS.value, _POOL.value,
                                                        replace=False).astype(np.int32))
      placed, state = step(placed, state, ids)
      jax.block_until_ready(placed)
    rss("3 donated updates (peak)")
    print(f"state: {state_bytes >> 20:,} MiB over {_DEVICES.value} devices", file=sys.stdout)


if __name__ == "__main__":
  app.run(main)
