"""Subprocess body of the corpus-embedding tests: embeds the tiny corpus on a chosen layout.

It runs as a script, not under pytest, because the CPU device count (``XLA_FLAGS``) and
JAX's distributed runtime must be set up before JAX starts:

  python tests/embed_worker.py OUT.json --beir=DIR --encoder=DIR --cache=DIR \
      [--devices=D] [--die-after=J] [--process-id=I --num-processes=N --port=P]

``--die-after=J`` ends the process with ``os._exit(DIE_CODE)`` (no cleanup, like a crash)
right after its J-th chunk is recorded. OUT.json gets the ``embed_corpus`` statistics and
a digest of the table that ``build_or_load_table`` returned.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

DIE_CODE = 17
CHUNK_ROWS = 128  # 600 passages: 5 chunks, the last one short


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("out")
  parser.add_argument("--beir", required=True)
  parser.add_argument("--encoder", required=True)
  parser.add_argument("--cache", required=True)
  parser.add_argument("--devices", type=int, default=2)
  parser.add_argument("--die-after", type=int, default=0)
  parser.add_argument("--process-id", type=int, default=0)
  parser.add_argument("--num-processes", type=int, default=1)
  parser.add_argument("--port", type=int, default=0)
  args = parser.parse_args(argv)

  flags = os.environ.get("XLA_FLAGS", "")
  flags = " ".join(f for f in flags.split() if "xla_force_host_platform_device_count" not in f)
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}"
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from conftest import make_tiny_config

  from qdr_jax import distributed

  config = make_tiny_config(args.beir, args.encoder, args.cache)
  config.table.embed_chunk_rows = CHUNK_ROWS
  if args.num_processes > 1:  # the environment route of initialize_distributed
    os.environ.update({distributed.ENV_COORDINATOR: f"localhost:{args.port}",
                       distributed.ENV_NUM_PROCESSES: str(args.num_processes),
                       distributed.ENV_PROCESS_ID: str(args.process_id)})
    config.distributed.cpu_collectives = "gloo"
  info = distributed.initialize_distributed(config)

  import pathlib

  import jax
  import numpy as np

  from qdr_jax.data.loader import load_dataset
  from qdr_jax.targets.encoders import embed_passages, load_encoders
  from qdr_jax.targets.table import build_or_load_table

  embedder = embed_passages(load_encoders(config.model), config)
  stats = {}

  class Recording:
    """The embedder, recording its statistics and dying after ``--die-after`` chunks."""

    def embed_corpus(self, corpus, path):
      recorded = []

      def on_chunk(chunk: int) -> None:
        recorded.append(chunk)
        if len(recorded) == args.die_after:
          os._exit(DIE_CODE)  # pylint: disable=protected-access

      stats.update(embedder.embed_corpus(corpus, path, progress=False, on_chunk=on_chunk))
      stats["recorded"] = recorded
      return stats

  table = build_or_load_table(config, load_dataset(config.data).corpus,
                              pathlib.Path(args.cache), Recording())
  stats.update(process_count=info.process_count, local_devices=jax.local_device_count(),
               memmap=isinstance(table, np.memmap),
               sha1=hashlib.sha1(np.ascontiguousarray(table).tobytes()).hexdigest())
  pathlib.Path(args.out).write_text(json.dumps(stats))
  if info.process_count > 1:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv[1:])
