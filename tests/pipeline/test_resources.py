"""The Ray resource plan never asks for more than the cluster has (Ray Data would hang)."""

from __future__ import annotations

import pytest

from vlray.config import ComputeConfig
from vlray.pipeline.resources import plan_resources


@pytest.mark.parametrize("fuse", ["auto", "on", "off"])
@pytest.mark.parametrize("cpus", [1, 2, 3, 4, 8, 16, 64, 65, 200])
@pytest.mark.parametrize("gpus", [0, 1, 4])
@pytest.mark.parametrize("models", [1, 2])
def test_plan_fits_the_cluster(cpus, gpus, models, fuse):
    plan = plan_resources(ComputeConfig(fuse=fuse), {"CPU": cpus, "GPU": gpus}, models)
    reserved = (
        plan.decode_actors * plan.decode_cpus
        + models * plan.encode_actors * plan.encode_cpus
        + (1 + plan.write_actors) * plan.io_cpus  # read tasks + writer actors
    )
    assert reserved <= cpus + 1e-9 or cpus < 1.5  # a 1-CPU box oversubscribes a sliver only
    gpu_actors = plan.decode_actors if plan.fused else models * plan.encode_actors
    assert gpu_actors * plan.encode_gpus <= gpus + 1e-9
    assert plan.device == ("cuda" if gpus else "cpu")
    # auto fuses decode and encode exactly when one model encodes on CPU
    expected = models == 1 and (fuse == "on" or (fuse == "auto" and not gpus))
    assert plan.fused == expected
    # SAM alone is one model too, but has no embedding encoder to fuse
    assert not plan_resources(
        ComputeConfig(fuse=fuse), {"CPU": cpus, "GPU": gpus}, 1, fusable=False
    ).fused
    if plan.fused:
        assert plan.encode_actors == 0 and plan.encode_threads == (2 if gpus else 1)


def test_two_cores_get_two_decode_actors():
    for fuse in ("auto", "off"):
        plan = plan_resources(ComputeConfig(fuse=fuse), {"CPU": 2})
        assert plan.decode_actors == 2 and plan.device == "cpu"


def test_fused_actors_fit_in_memory():
    """Every fused actor holds the model: big models on many-core CPU nodes get fewer actors,
    each with more torch threads, so the copies stay within half the memory."""
    gib = 1 << 30
    small = plan_resources(ComputeConfig(), {"CPU": 64, "memory": 256 * gib}, 1, 100 << 20)
    assert small.fused and small.decode_actors == 64 and small.encode_threads == 1
    big = plan_resources(ComputeConfig(), {"CPU": 64, "memory": 64 * gib}, 1, 2 * gib)
    assert big.fused and big.decode_actors == 8
    assert big.decode_actors * 2 * 2 * gib <= 0.5 * 64 * gib
    assert big.encode_threads == 8  # the CPUs are still all used
    assert big.decode_actors * big.decode_cpus + 2 * big.io_cpus <= 64 + 1e-9


def test_writers_are_few_long_lived_actors():
    assert plan_resources(ComputeConfig(), {"CPU": 2}).write_actors == 1
    assert plan_resources(ComputeConfig(), {"CPU": 64}).write_actors == 1
    assert plan_resources(ComputeConfig(fuse="off"), {"CPU": 200}).write_actors == 4


@pytest.mark.parametrize("fuse", ["auto", "off"])
def test_small_jobs_start_fewer_actors(fuse):
    """Each actor costs seconds of start-up (torch, the model): a 300-row increment on 2 CPUs
    starts one decode actor, a 2000-row job one per CPU; compute.decode_actors still rules."""
    compute = ComputeConfig(fuse=fuse)
    small = plan_resources(compute, {"CPU": 2}, rows=300)
    assert small.decode_actors == 1
    assert small.decode_cpus <= 1.8 + 1e-9  # the lone actor may use both cores
    assert plan_resources(compute, {"CPU": 2}, rows=2000).decode_actors == 2
    assert plan_resources(compute, {"CPU": 16}, rows=1100).decode_actors == 3
    full = plan_resources(compute, {"CPU": 16}).decode_actors
    assert full >= 15 and plan_resources(compute, {"CPU": 16}, rows=10**6).decode_actors == full
    forced = ComputeConfig(fuse=fuse, decode_actors=2)
    assert plan_resources(forced, {"CPU": 2}, rows=10).decode_actors == 2
    if fuse == "auto":
        assert small.fused and small.encode_threads == 2


def test_commit_rows_per_device():
    """Parts are rows_per_file rows on an accelerator; on the CPU one encoder batch (8 SAM
    batches with SAM), never more than rows_per_file."""
    from vlray.pipeline.resources import commit_rows

    assert commit_rows(2048, "cuda", 128, None) == 2048
    assert commit_rows(2048, "cuda", 128, 4) == 2048
    assert commit_rows(2048, "cpu", 128, None) == 128
    assert commit_rows(2048, "cpu", 128, 4) == 32
    assert commit_rows(8, "cpu", 128, None) == 8
    assert commit_rows(8, "cpu", 128, 4) == 8
