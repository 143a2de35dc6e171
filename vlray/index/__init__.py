"""FAISS index build and search: numpy in, numpy out; no Ray, no torch (Ray only in the
sharded build's task runner, imported when used)."""

from vlray.index.build import add_to_index, build_index, can_add, choose_factory
from vlray.index.distributed import build_index_sharded
from vlray.index.search import SearchIndex

__all__ = [
    "SearchIndex",
    "add_to_index",
    "build_index",
    "build_index_sharded",
    "can_add",
    "choose_factory",
]
