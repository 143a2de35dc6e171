"""FAISS index build and search: numpy in, numpy out; no Ray, no torch."""

from vlray.index.build import build_index, choose_factory
from vlray.index.search import SearchIndex

__all__ = ["SearchIndex", "build_index", "choose_factory"]
