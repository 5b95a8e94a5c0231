"""DPR-style answer matching: does a retrieved passage contain one of a question's answers?

The rules follow DPR's evaluation (its `SimpleTokenizer` and string `has_answer`), re-written
here:
  * text is Unicode NFD-normalised, then split into tokens that are either runs of letters,
    digits and combining marks (`[\\p{L}\\p{N}\\p{M}]+`) or single characters that are neither
    separators nor control/format characters (`[^\\p{Z}\\p{C}]`), so punctuation is its own
    token and "1,000" is the three tokens "1", ",", "000";
  * tokens are lower-cased;
  * an answer hits a passage when its token sequence occurs contiguously in the passage's.
One deliberate difference: an answer with no tokens (empty or blank) never hits, where DPR's
loop would count it as a hit everywhere. Only the passage text is matched, not its title, as in
DPR.

Speed: the same passages come back for many questions, so a passage's tokens and an index of
where each token occurs are built once and kept in an LRU cache keyed by table row (or by the
text itself when texts are passed); each question's first hit rank is found once and every
top-k accuracy derives from it.
"""

from __future__ import annotations

import collections
import unicodedata
from collections.abc import Sequence

import numpy as np
import regex

_TOKEN_RE = regex.compile(
    r"[\p{L}\p{N}\p{M}]+|[^\p{Z}\p{C}]",
    flags=regex.IGNORECASE | regex.UNICODE | regex.MULTILINE)

DEFAULT_KS = (1, 5, 20, 100)


def tokenize(text: str) -> list[str]:
  """NFD-normalised, lower-cased DPR SimpleTokenizer tokens of `text`."""
  # Lower-case per token after splitting, as DPR does: lowering first could change the split.
  return [t.lower() for t in _TOKEN_RE.findall(unicodedata.normalize("NFD", text))]


def _answer_tokens(answers: Sequence[str]) -> list[tuple[str, ...]]:
  """Token tuples of the answers, without empty ones and duplicates (order kept)."""
  if isinstance(answers, str):
    raise TypeError("answers must be a sequence of strings, not a single string.")
  out = dict.fromkeys(tuple(tokenize(a)) for a in answers)
  return [a for a in out if a]


class _IndexedPassage:
  """A passage's tokens, where each distinct token occurs and, given a vocabulary (token
  -> id, grown as passages arrive), the ids of its distinct tokens."""

  __slots__ = ("tokens", "positions", "token_ids")

  def __init__(self, text: str, vocab: dict[str, int] | None = None):
    self.tokens = tokenize(text)
    positions: dict[str, list[int]] = {}
    for i, tok in enumerate(self.tokens):
      positions.setdefault(tok, []).append(i)
    self.positions = positions
    self.token_ids = None
    if vocab is not None:
      self.token_ids = np.fromiter((vocab.setdefault(t, len(vocab)) for t in positions),
                                   dtype=np.int32, count=len(positions))

  def contains(self, answer_tokens: list[tuple[str, ...]]) -> bool:
    tokens = self.tokens
    for ans in answer_tokens:
      n = len(ans)
      # Only positions where the answer's first token occurs can start a match.
      for i in self.positions.get(ans[0], ()):
        if tuple(tokens[i:i + n]) == ans:
          return True
    return False


def has_answer(answers: Sequence[str], passage_text: str) -> bool:
  """True when any answer's tokens occur contiguously in the passage's tokens."""
  answer_tokens = _answer_tokens(answers)
  return bool(answer_tokens) and _IndexedPassage(passage_text).contains(answer_tokens)


class AnswerMatcher:
  """Finds the first retrieved passage holding an answer, caching tokenised passages.

  Args:
    passages: passage text of each table row; when given, retrieved items are row ids
      (FAISS's -1 padding is skipped). Without it, retrieved items are passage texts.
    cache_size: most passages kept tokenised (least recently used are dropped).
  """

  def __init__(self, passages: Sequence[str] | None = None, cache_size: int = 200_000):
    if cache_size < 1:
      raise ValueError(f"cache_size must be >= 1, got {cache_size}.")
    self._passages = passages
    self._cache: collections.OrderedDict = collections.OrderedDict()
    self._cache_size = cache_size
    self._vocab: dict[str, int] = {}  # ids of the tokens seen, for contains_answer_matrix

  def _passage(self, item) -> _IndexedPassage:
    key = int(item) if self._passages is not None else item
    entry = self._cache.get(key)
    if entry is not None:
      self._cache.move_to_end(key)
      return entry
    text = self._passages[key] if self._passages is not None else item
    entry = _IndexedPassage(text, self._vocab)
    self._cache[key] = entry
    if len(self._cache) > self._cache_size:
      self._cache.popitem(last=False)
    return entry

  def first_hit_rank(self, answers: Sequence[str], retrieved: Sequence) -> int:
    """0-based rank of the first retrieved passage holding an answer, or -1 if none does.

    Ranks count every slot of `retrieved`, padding included, so they line up with top-k.
    """
    answer_tokens = _answer_tokens(answers)
    if not answer_tokens:
      return -1
    for rank, item in enumerate(retrieved):
      if self._passages is not None and int(item) < 0:
        continue
      if self._passage(item).contains(answer_tokens):
        return rank
    return -1

  def contains_answer(self, answers: Sequence[str], rows: Sequence[int]) -> np.ndarray:
    """(len(rows),) bool: which of the given table rows hold one of the answers."""
    answer_tokens = _answer_tokens(answers)
    if not answer_tokens:
      return np.zeros(len(rows), dtype=bool)
    return np.fromiter((self._passage(r).contains(answer_tokens) for r in rows), dtype=bool,
                       count=len(rows))

  def contains_answer_matrix(self, answers_per_query: Sequence[Sequence[str]],
                             rows: Sequence[int]) -> np.ndarray:
    """(Q, len(rows)) bool: which rows hold one of each query's answers.

    Vectorised over the rows: the distinct token ids of all the rows are tested at once
    against the first tokens of the batch's answers (``np.isin``), and only the (row,
    answer) pairs sharing a first token are matched in full, so a batch against a pool
    of thousands of rows costs a few array operations plus one Python check per such
    pair (rare: mostly the real hits).
    """
    by_first: dict[str, list[tuple[int, tuple[str, ...]]]] = {}
    for q, answers in enumerate(answers_per_query):
      for tokens in _answer_tokens(answers):
        by_first.setdefault(tokens[0], []).append((q, tokens))
    out = np.zeros((len(answers_per_query), len(rows)), dtype=bool)
    passages = [self._passage(r) for r in rows]  # tokenises (and grows the vocabulary)
    first_of_id = {self._vocab[t]: t for t in by_first if t in self._vocab}
    if not first_of_id or not passages:
      return out
    ids = np.concatenate([p.token_ids for p in passages])
    column = np.repeat(np.arange(len(passages)), [p.token_ids.size for p in passages])
    hit = np.isin(ids, np.fromiter(first_of_id, dtype=np.int32, count=len(first_of_id)))
    for j, token_id in zip(column[hit].tolist(), ids[hit].tolist()):
      for q, tokens in by_first[first_of_id[token_id]]:
        if not out[q, j] and passages[j].contains([tokens]):
          out[q, j] = True
    return out

  def first_hit_ranks(
      self, answers_per_query: Sequence[Sequence[str]], retrieved_per_query: Sequence[Sequence]
  ) -> np.ndarray:
    """(Q,) int64 first hit ranks (-1: no hit), one per query."""
    if len(answers_per_query) != len(retrieved_per_query):
      raise ValueError(
          f"{len(answers_per_query)} answer lists but {len(retrieved_per_query)} retrieved lists.")
    return np.fromiter(
        (self.first_hit_rank(a, r) for a, r in zip(answers_per_query, retrieved_per_query)),
        dtype=np.int64, count=len(answers_per_query))


def accuracy_from_ranks(first_hit_ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict:
  """{'top{k}': fraction of queries whose first hit rank is < k} from first hit ranks."""
  ranks = np.asarray(first_hit_ranks, dtype=np.int64)
  if ranks.size == 0:
    raise ValueError("No queries to score.")
  if any(k < 1 for k in ks):
    raise ValueError(f"ks must be >= 1, got {tuple(ks)}.")
  # A miss (-1) becomes the largest int64 so it lies beyond every cutoff.
  hit = np.where(ranks >= 0, ranks, np.iinfo(np.int64).max)
  acc = (hit[:, None] < np.asarray(ks, dtype=np.int64)[None, :]).mean(axis=0)
  return {f"top{k}": float(a) for k, a in zip(ks, acc)}


def answer_accuracy(
    answers_per_query: Sequence[Sequence[str]],
    retrieved_per_query: Sequence[Sequence],
    ks: Sequence[int] = DEFAULT_KS,
    *,
    passages: Sequence[str] | None = None,
    matcher: AnswerMatcher | None = None,
) -> dict[str, float]:
  """DPR top-k retrieval accuracy: fraction of questions with an answer in their top k.

  Args:
    answers_per_query: answer strings of each question (an empty list never hits).
    retrieved_per_query: ranked passages of each question: texts, or row ids (e.g. a (Q, k)
      FAISS id array) when `passages` (or a `matcher` built with them) is given.
    ks: cutoffs; a list shorter than k is scored on what it has.
    passages: passage text of each table row, to look row ids up.
    matcher: a reusable AnswerMatcher (keeps its cache across calls); overrides `passages`.

  Returns:
    {'top1': ..., 'top5': ..., ...} in the order of `ks`.
  """
  matcher = matcher if matcher is not None else AnswerMatcher(passages)
  ranks = matcher.first_hit_ranks(answers_per_query, retrieved_per_query)
  return accuracy_from_ranks(ranks, ks)
