"""FAISS indexes over the target-embedding table: build, tune, search, save, describe."""

from qdr_jax.index.faiss_index import (
    build_index,
    check_index_for_mode,
    bytes_per_vector,
    compression_ratio,
    describe_index,
    factory_string,
    load_index,
    num_threads,
    rebuild_index,
    reconstruct_all,
    save_index,
    search,
    set_num_threads,
    set_search_params,
)
from qdr_jax.index.refresh import (
    ChangedRows,
    emptied_copy,
    incremental_refresh,
    refresh_kind,
    supports_incremental_refresh,
)

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
