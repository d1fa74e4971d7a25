"""Row-sharded embedding index with exact distributed MIPS, corpus encoding, ScaNN export."""

from jaxret.index.sharded import IndexMismatchError, ShardedIndex

__all__ = ["IndexMismatchError", "ShardedIndex"]
