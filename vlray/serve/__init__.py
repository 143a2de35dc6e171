"""HTTP search service over a vlray index: FastAPI app, uvicorn or Ray Serve, web page.

``create_app(ServeConfig(index="OUT/index"))`` builds the app; ``jobs/serve.py`` runs it.
"""

from vlray.serve.config import ServeConfig


def create_app(config: ServeConfig):  # noqa: ANN201 - FastAPI imported lazily
    """Builds the FastAPI app (see :mod:`vlray.serve.app`)."""
    from vlray.serve.app import create_app as _create_app

    return _create_app(config)


__all__ = ["ServeConfig", "create_app"]
