"""Training modes: which parts of the retriever a mode trains and what the loss sees."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import ml_collections

from qdr_jax.quant import INDEX_PARAMS


@dataclasses.dataclass(frozen=True)
class Mode:
  """What a training mode updates.

  Attributes:
    update_encoder: train the query encoder.
    update_rows: train the target-table rows of the pool.
    quantize: the loss scores reconstructions (straight-through to the rows).
    learn: index parameters trained jointly (names from `qdr_jax.quant.INDEX_PARAMS`, in
      that order), written into FAISS at every refresh with the whole table re-encoded.
    trains: False for 'posthoc' (plain FAISS over the initial table).
  """
  update_encoder: bool
  update_rows: bool
  quantize: bool
  learn: tuple[str, ...] = ()
  trains: bool = True

  @property
  def learns_index(self) -> bool:
    """Any index parameter is learned (refreshes then write them and re-encode all)."""
    return bool(self.learn)

  @property
  def learn_codebooks(self) -> bool:
    return "codebooks" in self.learn


MODES: dict[str, Mode] = {
    "dback": Mode(update_encoder=True, update_rows=True, quantize=True),
    "dback_no_ste": Mode(update_encoder=True, update_rows=True, quantize=False),
    "jpq": Mode(update_encoder=True, update_rows=False, quantize=True, learn=("codebooks",)),
    "query_only": Mode(update_encoder=True, update_rows=False, quantize=False),
    "posthoc": Mode(update_encoder=False, update_rows=False, quantize=False, trains=False),
    # The rows alone on the float loss, the query encoder frozen: the reference recipe's
    # MS MARCO script encodes its training queries without a gradient.
    "rows_only": Mode(update_encoder=False, update_rows=True, quantize=False),
}


def get_mode(name: str, learn: bool | Sequence[str] = ()) -> Mode:
  """The mode called ``name`` with the index parameters ``learn`` trained as well.

  ``learn`` is ``config.quant.learn`` (True stands for ("codebooks",)). Learning needs the quantized forward: a mode that
  does not quantize (query_only) is switched to scoring quantized rows, which leaves its
  rows fixed; dback_no_ste and rows_only, whose point is an unquantized loss, and
  posthoc, which does not train, are refused.
  """
  if name not in MODES:
    raise ValueError(f"config.train.mode must be one of {sorted(MODES)}; got {name!r}")
  mode = MODES[name]
  wanted = ("codebooks",) if learn is True else tuple(learn or ())
  unknown = [p for p in wanted if p not in INDEX_PARAMS]
  if unknown:
    raise ValueError(f"config.quant.learn holds {unknown}; expected some of {INDEX_PARAMS}")
  learned = tuple(p for p in INDEX_PARAMS if p in wanted or p in mode.learn)
  if learned == mode.learn:
    return mode
  if not mode.trains:
    raise ValueError(f"config.quant.learn={learned} needs a training mode, not {name!r}")
  if name in ("dback_no_ste", "rows_only"):
    raise ValueError(f"config.quant.learn={learned} needs the quantized forward that "
                     f"{name} leaves out by definition: use mode dback (or query_only)")
  return dataclasses.replace(mode, quantize=True, learn=learned)


def configured_learn(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The index parameters ``config.quant.learn`` names (not those a mode implies, as jpq
  its codebooks)."""
  return tuple(config.quant.learn)


def mode_from_config(config: ml_collections.ConfigDict) -> Mode:
  """``config.train.mode`` with ``config.quant.learn``."""
  return get_mode(config.train.mode, configured_learn(config))
