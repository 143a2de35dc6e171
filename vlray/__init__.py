"""vlray: images -> embeddings, SAM masks and a FAISS index with Ray Data; nearest-neighbour queries."""

from __future__ import annotations

try:
    from importlib.metadata import version as _version

    __version__ = _version("vlray")
except Exception:  # running from a source tree that is not installed
    __version__ = "0.0.0"
