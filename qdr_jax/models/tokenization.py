"""Tokenizes text into fixed-dtype numpy batches for `BertEncoder`."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from qdr_jax.models.loading import resolve_model_path

PASSAGE_STYLES = ('pair', 'concat')
# Padded token lengths round up to a multiple of this: few enough distinct shapes that
# jit compiles a handful of programs, little enough padding to cost little compute.
LENGTH_BUCKET = 32


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
             pad_to_max: bool = False,
             pack_rows_multiple: int = 0) -> dict[str, np.ndarray]:
  """Tokenizes a batch into int32 numpy arrays.

  Sequences are truncated to `max_length` (longest-first for pairs) and right
  padded to the longest in the batch, rounded up to `pad_to_multiple_of` but
  never past `max_length`; `pad_to_max` pads to exactly `max_length` so that
  every batch has one shape (one jit compile). With `pack_rows_multiple` > 0 they
  are packed several to a row of `max_length` tokens instead (`pack_sequences`).

  Args:
    tokenizer: A transformers tokenizer.
    texts: First segments.
    max_length: Maximum tokens per sequence, special tokens included.
    pair_texts: Optional second segments (token type 1).
    pad_to_multiple_of: Bucket size for the padded length.
    pad_to_max: Pad to `max_length` regardless of content.
    pack_rows_multiple: Pack (see `pack_sequences`) into a multiple of this many rows.

  Returns:
    {'input_ids', 'attention_mask', 'token_type_ids'}, each (B, L) int32, or packed
    rows as `pack_sequences` returns them.
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
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  if pack_rows_multiple:
    return pack_sequences(ids, types, max_length, rows_multiple=pack_rows_multiple,
                          pad_id=pad_id)
  longest = max((len(x) for x in ids), default=0)
  length = max_length if pad_to_max else min(
      _round_up(longest, pad_to_multiple_of), max(max_length, longest))
  out = {'input_ids': np.full((len(ids), length), pad_id, np.int32),
         'attention_mask': np.zeros((len(ids), length), np.int32),
         'token_type_ids': np.zeros((len(ids), length), np.int32)}
  for i, (row, row_types) in enumerate(zip(ids, types)):
    n = len(row)
    out['input_ids'][i, :n] = row
    out['attention_mask'][i, :n] = 1
    out['token_type_ids'][i, :n] = row_types
  return out


def pack_sequences(ids: Sequence[Sequence[int]], types: Sequence[Sequence[int]],
                   row_length: int, *, rows_multiple: int = 1,
                   pad_id: int = 0) -> dict[str, np.ndarray]:
  """Packs token sequences several to a row, so that padding does not cost compute.

  Short texts (training queries: 23 tokens on average on SciFact, padded to 64) waste
  most of a padded batch; packed, 32 of them fill about 12 rows of 64. Sequences are
  placed longest first into the first row with room (first-fit decreasing, which is
  deterministic, so every process packs a global batch alike); the row count is
  rounded up to `rows_multiple` (e.g. a multiple of the device count, and few distinct
  shapes to compile). The encoder keeps each sequence to itself (`segment_ids`) and
  restarts positions at each (derived from `segment_ids`), so a packed sequence encodes
  as it would alone in a row.

  Args:
    ids: token ids per sequence, each at most `row_length` long.
    types: token type ids per sequence, the same lengths.
    row_length: tokens per packed row.
    rows_multiple: the row count is a multiple of this.
    pad_id: id of padding tokens.

  Returns:
    int32 arrays: `input_ids`, `attention_mask`, `token_type_ids` and `segment_ids`
    (1 + the sequence's index in `ids`, 0 on padding), each (R, row_length);
    `sequence_lengths` (len(ids),).
  """
  lengths = np.asarray([len(x) for x in ids], np.int64)
  if lengths.size and (lengths.max() > row_length or lengths.min() < 1):
    raise ValueError(f'pack_sequences: sequences of {lengths.min()}..{lengths.max()} '
                     f'tokens do not fit rows of {row_length} (expected 1..{row_length}).')
  if rows_multiple < 1:
    raise ValueError(f'pack_sequences: rows_multiple={rows_multiple}; expected >= 1.')
  free: list[int] = []  # room left in each row
  placed: list[tuple[int, int]] = [(0, 0)] * len(ids)  # (row, offset) per sequence
  for i in sorted(range(len(ids)), key=lambda i: (-lengths[i], i)):
    row = next((r for r, room in enumerate(free) if room >= lengths[i]), len(free))
    if row == len(free):
      free.append(row_length)
    placed[i] = (row, row_length - free[row])
    free[row] -= int(lengths[i])
  num_rows = max(_round_up(len(free), rows_multiple), rows_multiple)
  out = {'input_ids': np.full((num_rows, row_length), pad_id, np.int32)}
  for name in ('attention_mask', 'token_type_ids', 'segment_ids'):
    out[name] = np.zeros((num_rows, row_length), np.int32)
  for i, (row, start) in enumerate(placed):
    span = slice(start, start + lengths[i])
    out['input_ids'][row, span] = ids[i]
    out['attention_mask'][row, span] = 1
    out['token_type_ids'][row, span] = types[i]
    out['segment_ids'][row, span] = i + 1
  out['sequence_lengths'] = lengths.astype(np.int32)
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
