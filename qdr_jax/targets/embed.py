"""Batched, length-bucketed encoding of many texts into an (N, d) float32 array.

Texts are tokenized in chunks, sorted by length inside a chunk and padded only to the
next multiple of ``bucket``, so a corpus of short and long passages costs what its
tokens cost; the number of distinct shapes (and so of compilations) stays at
``max_length / bucket``. Every batch is padded to ``batch_size`` rows for the same reason.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from qdr_jax.models.tokenization import tokenize

ApplyFn = Callable[..., jax.Array]


def make_apply(module) -> ApplyFn:
  """``(params, input_ids, attention_mask, token_type_ids) -> (B, d)`` for a Flax encoder."""

  def apply(params, input_ids, attention_mask, token_type_ids):
    return module.apply({"params": params}, input_ids, attention_mask, token_type_ids)

  return apply


def _token_lengths(tokenizer, texts: Sequence[str], pair_texts: Sequence[str] | None,
                   max_length: int) -> np.ndarray:
  enc = tokenizer(list(texts), list(pair_texts) if pair_texts is not None else None,
                  truncation=True, max_length=max_length, padding=False,
                  return_attention_mask=False, return_token_type_ids=False)
  return np.asarray([len(ids) for ids in enc["input_ids"]])


def pad_rows(tokens: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
  """Pads a token batch with empty rows up to ``rows`` so every call has one shape."""
  missing = rows - next(iter(tokens.values())).shape[0]
  return {k: np.pad(v, ((0, missing), (0, 0))) for k, v in tokens.items()}


def embed_texts(apply_fn: ApplyFn, params: Any, tokenizer, texts: Sequence[str], *,
                pair_texts: Sequence[str] | None = None, max_length: int, batch_size: int,
                bucket: int = 32, chunk_size: int = 4096, desc: str = "embed",
                progress: bool = True, jitted: Callable | None = None) -> np.ndarray:
  """Encodes ``texts`` (optionally as sentence pairs) into a float32 (N, d) array.

  Args:
    apply_fn: encoder apply function (see ``make_apply``); jitted here unless ``jitted``
      (an already-jitted version, to share compilations between calls) is given.
    params: encoder parameters.
    tokenizer: a Hugging Face (fast) tokenizer.
    texts: first segments; ``pair_texts`` second segments or None.
    max_length: truncation length in tokens.
    batch_size: sequences per device call.
    bucket: padded lengths are multiples of this (and at most ``max_length``).
    chunk_size: texts tokenized and length-sorted together.
  """
  encode = jitted or jax.jit(apply_fn)
  n = len(texts)
  out: np.ndarray | None = None
  bar = tqdm(total=n, desc=desc, unit="text", disable=not progress, leave=False)
  for start in range(0, n, chunk_size):
    stop = min(start + chunk_size, n)
    chunk_pairs = pair_texts[start:stop] if pair_texts is not None else None
    order = np.argsort(_token_lengths(tokenizer, texts[start:stop], chunk_pairs, max_length),
                       kind="stable")
    for b in range(0, order.size, batch_size):
      idx = order[b:b + batch_size]
      tokens = pad_rows(tokenize(
          tokenizer, [texts[start + i] for i in idx], max_length,
          pair_texts=[chunk_pairs[i] for i in idx] if chunk_pairs is not None else None,
          pad_to_multiple_of=bucket), batch_size)
      emb = np.asarray(jax.device_get(encode(params, *(jnp.asarray(tokens[k]) for k in (
          "input_ids", "attention_mask", "token_type_ids")))))
      if out is None:
        out = np.empty((n, emb.shape[1]), dtype=np.float32)
      out[start + idx] = emb[:idx.size]
      bar.update(idx.size)
  bar.close()
  if out is None:
    raise ValueError("embed_texts got no texts.")
  return out
