"""Carves a passage-disjoint dev split out of a training split.

Selection (defaults, learning rates, the best checkpoint) needs queries that training
never sees, and the regime that matters most for a trained *table* is the one where the
relevant passages were never training positives either: rows that no training query
names stay as the passage encoder left them, while trained rows move. A dev split
carved by query alone would share positives with training (SciFact's queries often
share abstracts) and reward exactly the drift that costs unseen passages.

`carve_dev_split` therefore holds out whole groups of training queries linked by a
shared positive: no positive of a dev query is a positive of any remaining training
query, and every remaining training query keeps all its labels.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from qdr_jax.data.types import Queries, Split


def _positive_groups(split: Split) -> list[list[int]]:
  """Indexes of the split's labelled queries, grouped so that two queries sharing a
  positive fall in one group (connected components over shared positives)."""
  parent: dict[int, int] = {}

  def find(i: int) -> int:
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  owner: dict[str, int] = {}
  for i, query_id in enumerate(split.queries.ids):
    positives = split.positives(str(query_id))
    if not positives:
      continue
    parent[i] = i
    for doc in positives:
      if doc in owner:
        a, b = find(i), find(owner[doc])
        if a != b:
          parent[max(a, b)] = min(a, b)
      else:
        owner[doc] = i
  groups: dict[int, list[int]] = {}
  for i in parent:
    groups.setdefault(find(i), []).append(i)
  return list(groups.values())


def _order_key(seed: int, query_id: str) -> bytes:
  """A seeded, platform-independent shuffle key (Python's hash() is salted per process)."""
  return hashlib.blake2b(f"{seed}:{query_id}".encode(), digest_size=8).digest()


def _subset(split: Split, rows: Sequence[int]) -> Split:
  ids = [split.queries.ids[i] for i in rows]
  texts = [split.queries.texts[i] for i in rows]
  keep = {str(q) for q in ids}
  qrels = {q: judged for q, judged in split.qrels.items() if q in keep}
  answers = (None if split.answers is None
             else {q: a for q, a in split.answers.items() if q in keep})
  return Split(queries=Queries(ids=ids, texts=texts), qrels=qrels, answers=answers)


def carve_dev_split(train: Split, num_queries: int, seed: int) -> tuple[Split, Split]:
  """Splits ``train`` into (remaining training split, dev split) with no shared positive.

  Groups of queries linked by shared positives (`_positive_groups`) are taken in a
  seeded order until the dev split holds at least ``num_queries`` queries; a group larger
  than what is still wanted is skipped, so one hub passage cannot swallow the budget.
  The carve depends only on the split's query ids, qrels and ``seed``.

  Raises:
    ValueError: ``num_queries`` is not positive, or the labelled queries are too few to
      leave both splits non-empty.
  """
  if num_queries <= 0:
    raise ValueError(f"dev split size must be positive, got {num_queries}")
  groups = _positive_groups(train)
  labelled = sum(len(g) for g in groups)
  if labelled <= num_queries:
    raise ValueError(f"the training split has {labelled} labelled queries; a dev split of "
                     f"{num_queries} would leave none to train on")
  ids = train.queries.ids
  groups.sort(key=lambda g: min(_order_key(seed, str(ids[i])) for i in g))
  dev_rows: list[int] = []
  for group in groups:
    wanted = num_queries - len(dev_rows)
    if wanted <= 0:
      break
    if len(group) <= wanted:
      dev_rows += group
  dev = set(dev_rows)
  train_rows = [i for i in range(len(ids)) if i not in dev]
  return _subset(train, train_rows), _subset(train, sorted(dev_rows))


def shared_positives(a: Split, b: Split) -> set[str]:
  """Passages that are positives of some query in both splits."""
  def positives(split: Split) -> set[str]:
    return {d for judged in split.qrels.values() for d, rel in judged.items() if rel > 0}
  return positives(a) & positives(b)


def with_dev_split(splits: Mapping[str, Split], *, train_split: str, dev_split: str,
                   num_queries: int, seed: int) -> dict[str, Split]:
  """``splits`` with a selection split named ``dev_split``: the data set's own when it has
  one, else carved from ``train_split`` (which loses those queries) when ``num_queries``
  is positive; unchanged when ``dev_split`` is empty or nothing is to be carved."""
  out = dict(splits)
  if not dev_split or dev_split in out or num_queries <= 0 or train_split not in out:
    return out
  out[train_split], out[dev_split] = carve_dev_split(out[train_split], num_queries, seed)
  return out
