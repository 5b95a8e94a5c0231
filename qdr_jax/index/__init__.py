"""FAISS indexes over the target-embedding table: build, tune, search, save, describe."""

from qdr_jax.index.build import build_index, rebuild_index
from qdr_jax.index.files import load_index, save_index
from qdr_jax.index.layout import (bytes_per_vector, compression_ratio, describe_index,
                                  factory_string, reconstruct_all)
from qdr_jax.index.refresh import (
    ChangedRows,
    emptied_copy,
    incremental_refresh,
    refresh_kind,
    supports_incremental_refresh,
)
from qdr_jax.index.rules import check_index_for_mode
from qdr_jax.index.searching import num_threads, search, set_num_threads, set_search_params

__all__ = [
    "ChangedRows",
    "build_index",
    "check_index_for_mode",
    "bytes_per_vector",
    "compression_ratio",
    "describe_index",
    "emptied_copy",
    "factory_string",
    "incremental_refresh",
    "load_index",
    "num_threads",
    "rebuild_index",
    "reconstruct_all",
    "refresh_kind",
    "save_index",
    "search",
    "set_num_threads",
    "set_search_params",
    "supports_incremental_refresh",
]
