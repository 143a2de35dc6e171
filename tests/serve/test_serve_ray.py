"""The same app as a Ray Serve deployment."""

from __future__ import annotations

import os
import time

import httpx
import pytest

pytest.importorskip("ray.serve")


def test_deployment_builds(out_dir):
    from ray.serve import Application

    from vlray.serve import ServeConfig
    from vlray.serve.ray_deploy import DEPLOYMENT_NAME, build_deployment

    config = ServeConfig(index=str(out_dir / "index"), api_key="k")
    app = build_deployment(config, replicas=2, cpus_per_replica=0.5)
    assert isinstance(app, Application)
    deployment = app._bound_deployment
    assert deployment.name == DEPLOYMENT_NAME and deployment.num_replicas == 2
    assert deployment.ray_actor_options["num_cpus"] == 0.5
    with pytest.raises(ValueError):
        build_deployment(config, replicas=0)


@pytest.mark.slow
def test_ray_serve_for_real(out_dir, embedded, request):
    """~25 s once Ray is up; starting Ray itself costs another ~25 s on 2 cores, so this runs
    when an earlier test already started it (the full suite) or with VLRAY_TEST_RAY_SERVE=1."""
    import ray
    from ray import serve

    if not (ray.is_initialized() or os.environ.get("VLRAY_TEST_RAY_SERVE")):
        pytest.skip("Ray not started yet; set VLRAY_TEST_RAY_SERVE=1 to start it for this test")
    request.getfixturevalue("ray_local")

    from serve_helpers import free_port

    from vlray.serve import ServeConfig
    from vlray.serve.ray_deploy import build_deployment

    port = free_port()
    start = time.perf_counter()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(
            build_deployment(ServeConfig(index=str(out_dir / "index")), 1, 0.5),
            name="vlray-test",
            route_prefix="/",
        )
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            assert c.get("/readyz").status_code == 200
            r = c.get("/api/search/id", params={"id": embedded[0][0], "k": 3})
            assert r.status_code == 200 and r.json()["hits"][0]["id"] == embedded[0][0]
            assert c.get("/api/search/id", params={"id": "nope"}).status_code == 404
            assert c.get("/api/search/text", params={"q": "a cat"}).status_code == 200
            assert "vlray_serve_requests_total" in c.get("/metrics").text
        print(f"\nray serve: up and queried in {time.perf_counter() - start:.1f}s")
    finally:
        serve.shutdown()
