"""Negatives for the training step: the source that searches the index for a batch's
queries (``source``) and the cross-batch pool built from what it returns (``pool``)."""
