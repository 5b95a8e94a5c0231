"""Training modes: which parts of the retriever a mode trains and what the loss sees."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Mode:
  """What a training mode updates.

  Attributes:
    update_encoder: train the query encoder.
    update_rows: train the target-table rows of the pool.
    quantize: the loss scores reconstructions (straight-through to the rows).
    learn_codebooks: the PQ codebooks are trained (JPQ-style) and written into FAISS.
    trains: False for 'posthoc' (plain FAISS over the initial table).
  """
  update_encoder: bool
  update_rows: bool
  quantize: bool
  learn_codebooks: bool
  trains: bool = True


MODES: dict[str, Mode] = {
    "dback": Mode(update_encoder=True, update_rows=True, quantize=True, learn_codebooks=False),
    "dback_no_ste": Mode(update_encoder=True, update_rows=True, quantize=False,
                         learn_codebooks=False),
    "jpq": Mode(update_encoder=True, update_rows=False, quantize=True, learn_codebooks=True),
    "query_only": Mode(update_encoder=True, update_rows=False, quantize=False,
                       learn_codebooks=False),
    "posthoc": Mode(update_encoder=False, update_rows=False, quantize=False,
                    learn_codebooks=False, trains=False),
}


def get_mode(name: str, learn_codebooks: bool = False) -> Mode:
  """The mode called ``name``; ``learn_codebooks`` adds codebook training to a quantizing mode."""
  if name not in MODES:
    raise ValueError(f"config.train.mode must be one of {sorted(MODES)}; got {name!r}")
  mode = MODES[name]
  if learn_codebooks and not mode.learn_codebooks:
    if not mode.quantize:
      raise ValueError(f"config.quant.learn_codebooks needs a quantizing mode, not {name!r}")
    mode = dataclasses.replace(mode, learn_codebooks=True)
  return mode
