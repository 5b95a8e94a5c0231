"""Tokenizes text into fixed-dtype numpy batches for `BertEncoder`."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from qdr_jax.models.loading import resolve_model_path

PASSAGE_STYLES = ('pair', 'concat')


def load_tokenizer(name_or_path: str) -> Any:
  """A transformers fast tokenizer, resolved like `load_encoder` names.

  Local dirs and the MiniLM aliases never touch the network.
  """
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  return AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))


def _round_up(n: int, multiple: int | None) -> int:
  if not multiple:
    return n
  return -(-n // multiple) * multiple


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int, *,
             pair_texts: Sequence[str] | None = None,
             pad_to_multiple_of: int | None = None,
             pad_to_max: bool = False) -> dict[str, np.ndarray]:
  """Tokenizes a batch into int32 numpy arrays.

  Sequences are truncated to `max_length` (longest-first for pairs) and right
  padded to the longest in the batch, rounded up to `pad_to_multiple_of` but
  never past `max_length`; `pad_to_max` pads to exactly `max_length` so that
  every batch has one shape (one jit compile).

  Args:
    tokenizer: A transformers tokenizer.
    texts: First segments.
    max_length: Maximum tokens per sequence, special tokens included.
    pair_texts: Optional second segments (token type 1).
    pad_to_multiple_of: Bucket size for the padded length.
    pad_to_max: Pad to `max_length` regardless of content.

  Returns:
    {'input_ids', 'attention_mask', 'token_type_ids'}, each (B, L) int32.
  """
  texts = list(texts)
  if pair_texts is not None:
    pair_texts = list(pair_texts)
    if len(pair_texts) != len(texts):
      raise ValueError(f'{len(texts)} texts but {len(pair_texts)} pair texts.')
  # Pad ourselves: the tokenizer's own padding can overshoot max_length when
  # rounding to a multiple, and returning lists avoids any torch dependency.
  enc = tokenizer(texts, pair_texts, truncation=True, max_length=max_length,
                  padding=False, return_token_type_ids=True,
                  return_attention_mask=False) if texts else {'input_ids': []}
  ids = enc['input_ids']
  types = enc.get('token_type_ids') or [[0] * len(x) for x in ids]
  longest = max((len(x) for x in ids), default=0)
  length = max_length if pad_to_max else min(
      _round_up(longest, pad_to_multiple_of), max(max_length, longest))
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  out = {'input_ids': np.full((len(ids), length), pad_id, np.int32),
         'attention_mask': np.zeros((len(ids), length), np.int32),
         'token_type_ids': np.zeros((len(ids), length), np.int32)}
  for i, (row, row_types) in enumerate(zip(ids, types)):
    n = len(row)
    out['input_ids'][i, :n] = row
    out['attention_mask'][i, :n] = 1
    out['token_type_ids'][i, :n] = row_types
  return out


def passage_inputs(titles: Sequence[str] | None, texts: Sequence[str],
                   style: str = 'concat'
                   ) -> tuple[list[str], list[str] | None]:
  """(texts, pair_texts) for `tokenize` from passage titles and bodies.

  Args:
    titles: Passage titles (None or empty strings for untitled corpora).
    texts: Passage bodies.
    style: 'pair' encodes (title, text) as a sentence pair, as DPR does;
      'concat' encodes `title + ' ' + text` as one segment, as BEIR /
      sentence-transformers do.

  Returns:
    Arguments `texts` and `pair_texts` for `tokenize`.
  """
  texts = list(texts)
  titles = [''] * len(texts) if titles is None else list(titles)
  if len(titles) != len(texts):
    raise ValueError(f'{len(titles)} titles but {len(texts)} texts.')
  if style == 'pair':
    return titles, texts
  if style == 'concat':
    return [f'{t} {x}'.strip() for t, x in zip(titles, texts)], None
  raise ValueError(f'Unknown passage style {style!r}; expected {PASSAGE_STYLES}.')
