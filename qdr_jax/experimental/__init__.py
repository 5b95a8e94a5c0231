"""Research options outside the paper's method, behind small interfaces.

``loss_terms``: optional terms added to the paper's loss (distillation of the flat
ranking into the quantized one, a codeword/list usage balance penalty, a contrastive
term for pseudo-queries labelled with their own passage). What each measured is in
docs/research/index-learning.md.
"""

from qdr_jax.experimental.loss_terms import (Balance, Distillation, LabelledPseudoQueries,
                                             LossTerm, TermInputs, balance_penalty,
                                             distillation_loss, kl_divergence, loss_terms)

__all__ = ["Balance", "Distillation", "LabelledPseudoQueries", "LossTerm", "TermInputs",
           "balance_penalty", "distillation_loss", "kl_divergence", "loss_terms"]
