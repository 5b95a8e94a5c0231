"""Data readers: every supported layout is read into the shared types of `types.py`;
corpora are converted once into the memory-mapped store of `store.py`."""

from qdr_jax.data.beir import read_beir
from qdr_jax.data.dpr import (
    read_dpr_passages,
    read_dpr_train_json,
    read_qa_csv,
    squad_to_dpr,
    write_dpr_json,
    write_dpr_passages,
    write_qa_csv,
)
from qdr_jax.data.hf import read_hf_corpus, read_hf_split
from qdr_jax.data.loader import load_dataset, read_corpus, resolve_path, truncate_corpus
from qdr_jax.data.types import Corpus, DataFormatError, Queries, RetrievalDataset, Split

__all__ = [
    "Corpus",
    "DataFormatError",
    "Queries",
    "RetrievalDataset",
    "Split",
    "load_dataset",
    "read_beir",
    "read_dpr_passages",
    "read_corpus",
    "read_dpr_train_json",
    "read_hf_corpus",
    "read_hf_split",
    "read_qa_csv",
    "resolve_path",
    "squad_to_dpr",
    "truncate_corpus",
    "write_dpr_json",
    "write_dpr_passages",
    "write_qa_csv",
]
