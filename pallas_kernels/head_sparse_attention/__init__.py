"""Reuse-phase head-centric sparse paged attention (see ops.py for layout and semantics)."""

from pallas_kernels.head_sparse_attention.ops import (
    head_sparse_attention,
    pack_queries,
    query_rows,
    unpack_outputs,
)
from pallas_kernels.head_sparse_attention.reference import head_sparse_attention_reference

__all__ = [
    "head_sparse_attention",
    "head_sparse_attention_reference",
    "pack_queries",
    "query_rows",
    "unpack_outputs",
]
