"""FAISS index build and search: numpy in, numpy out; no Ray, no torch."""

from vlray.index.build import add_to_index, build_index, can_add, choose_factory
from vlray.index.search import SearchIndex

__all__ = ["SearchIndex", "add_to_index", "build_index", "can_add", "choose_factory"]
