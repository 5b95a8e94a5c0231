r"""Exports a training checkpoint as a serving bundle (query encoder + quantized index).

  python experiments/export.py --workdir=runs/demo --out=bundles/demo
  python experiments/export.py --workdir=runs/demo --out=bundles/demo --step=200 \
      --store_passages

The bundle holds the query encoder as a Hugging Face model directory, the FAISS index
over the trained table, the row -> passage id map and bundle.json; see qdr_jax.serving.
"""

from absl import flags

from qdr_jax.cli import run_main
from qdr_jax.serving import export_bundle

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir with checkpoints.")
_OUT = flags.DEFINE_string("out", None, "Bundle directory to create (must not exist).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.")
_PASSAGES = flags.DEFINE_bool("store_passages", False,
                              "Also store passage titles and texts (passages.jsonl).")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  del argv
  out = export_bundle(_WORKDIR.value, _OUT.value, step=_STEP.value,
                      store_passages=_PASSAGES.value)
  print(f"wrote {out}")


if __name__ == "__main__":
  run_main(main)
