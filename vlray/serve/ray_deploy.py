"""The same app as a Ray Serve deployment (``jobs/serve.py --ray-serve``)."""

from __future__ import annotations

from typing import Any

from ray import serve

from vlray.serve.config import ServeConfig

DEPLOYMENT_NAME = "vlray-search"


@serve.ingress()
class SearchDeployment:
    """One replica: builds the FastAPI app (index + lazily loaded models) in its own process."""

    def __init__(self, config: dict[str, Any]) -> None:
        self._config = ServeConfig.from_dict(config)

    def __serve_build_asgi_app__(self) -> Any:
        from vlray.serve.app import create_app

        return create_app(self._config)


def build_deployment(
    config: ServeConfig, replicas: int = 1, cpus_per_replica: float = 1.0
) -> serve.Application:
    """A bound Ray Serve application serving ``create_app(config)`` on ``replicas`` replicas.

    Run it with ``serve.run(build_deployment(...), route_prefix="/")``.
    """
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    deployment = serve.deployment(
        SearchDeployment,
        name=DEPLOYMENT_NAME,
        num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus_per_replica},
    )
    return deployment.bind(config.to_dict())
