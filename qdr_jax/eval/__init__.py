"""Retrieval evaluation: ranking metrics, DPR answer accuracy, TREC run files, index evaluation."""

from qdr_jax.data.answers import (
    AnswerMatcher,
    accuracy_from_ranks,
    answer_accuracy,
    has_answer,
    tokenize,
)
from qdr_jax.eval.evaluator import IndexScores, evaluate_index, score_index
from qdr_jax.eval.metrics import (DEFAULT_MEASURES, ranking_metrics, run_from_search,
                                  split_seen, subset_means)
from qdr_jax.eval.trec import read_trec_run, write_trec_run

__all__ = [
    "AnswerMatcher",
    "DEFAULT_MEASURES",
    "IndexScores",
    "accuracy_from_ranks",
    "answer_accuracy",
    "evaluate_index",
    "has_answer",
    "ranking_metrics",
    "read_trec_run",
    "run_from_search",
    "score_index",
    "split_seen",
    "subset_means",
    "tokenize",
    "write_trec_run",
]
