r"""Searches a serving bundle: top-k passage ids and scores for each query.

  python experiments/search.py --bundle=bundles/demo --k=5 "what causes fever" "..."

Prints one line per hit: query number, rank, passage id, score (and the passage title and
the start of its text when the bundle stores passages).
"""

from absl import app, flags

from qdr_jax.cli import run_main
from qdr_jax.serving import load_bundle

_BUNDLE = flags.DEFINE_string("bundle", None, "Bundle directory (experiments/export.py).")
_K = flags.DEFINE_integer("k", 10, "Hits per query.")
flags.mark_flags_as_required(["bundle"])


def main(argv):
  queries = argv[1:]
  # Before the bundle is loaded and anything is encoded.
  if not queries:
    raise app.UsageError("give at least one query text")
  if _K.value < 1:
    raise app.UsageError(f"--k={_K.value}: expected a number of hits >= 1")
  empty = [q for q, text in enumerate(queries) if not text.strip()]
  if empty:
    raise app.UsageError(f"query {empty[0]} is empty: give the text to search for")
  bundle = load_bundle(_BUNDLE.value)
  for q, (query, hits) in enumerate(zip(queries, bundle.search(queries, _K.value))):
    print(f"# query {q}: {query}")
    for hit in hits:
      line = f"{q}\t{hit['rank']}\t{hit['id']}\t{hit['score']:.4f}"
      if "text" in hit:
        line += f"\t{hit['title']}\t{hit['text'][:120]}"
      print(line)


if __name__ == "__main__":
  run_main(main)
