"""vlray: images -> embeddings, SAM masks and a FAISS index with Ray Data; nearest-neighbour queries."""

from __future__ import annotations

try:
    from importlib.metadata import version as _version

    __version__ = _version("vlray")
except Exception:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = ["embed", "open_index"]


def __getattr__(name: str) -> object:
    # lazy: ``import vlray`` stays light for the read/write workers (no torch import)
    if name in __all__:
        from vlray import api

        return getattr(api, name)
    raise AttributeError(f"module 'vlray' has no attribute {name!r}")
