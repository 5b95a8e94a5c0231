"""Label-free pseudo-queries from the corpus itself: a passage's title or first sentence.

A title names what its passage is about in a few words, much as a query does, so the
query encoder can encode it as one; with no title, the passage's first sentence stands in.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from qdr_jax.data.types import Corpus

FIELDS = ("title", "first_sentence")
# What the passage a pseudo-query came from is to it in training (config.negatives.
# pseudo_query_source): hidden from it, its positive, or an ordinary candidate.
PSEUDO_QUERY_SOURCES = ("hide", "positive", "candidate")
# A sentence ends at . ! or ? followed by white space (abbreviations may cut it short,
# which only shortens the pseudo-query).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def first_sentence(text: str) -> str:
  """The text up to its first sentence end (the whole text without one), stripped."""
  return _SENTENCE_END.split(text.strip(), maxsplit=1)[0]


def pseudo_query_texts(corpus: Corpus, rows: Sequence[int] | np.ndarray,
                       field: str = "title") -> list[str]:
  """The pseudo-query of each of ``rows``.

  Args:
    corpus: the corpus.
    rows: corpus rows.
    field: 'title' (the first sentence of the text when the title is empty) or
      'first_sentence'.
  """
  if field not in FIELDS:
    raise ValueError(f"pseudo-query field must be one of {FIELDS}; "
                     f"got {field!r}")
  texts = corpus.texts.take(rows)
  if field == "first_sentence":
    return [first_sentence(t) for t in texts]
  titles = corpus.titles.take(rows)
  return [title.strip() or first_sentence(text) for title, text in zip(titles, texts)]
