"""What a share becomes on each backend, without running it: the process backend's
variables (MPS / HAMi-core), Slurm's gres/shard count and the batch script's exports
(the process and Slurm backends are run for real in tests/integration)."""

from __future__ import annotations

import pytest

from services.agent.backends.base import Assignment, share_limits, share_percent
from services.agent.backends.slurm import SlurmSettings, gres_for, shards, wrap_command
from services.common.delivery import ProcessWorkload


def lease(milli: int = 250, sharing: str = "time_slice", vendor: str = "nvidia", units: int = 1) -> Assignment:
    return Assignment(lease_id="lease-x", pool_id="pool-x", tenant="ten-x", units=units, devices=(5,), vendor=vendor,
                      model="nvidia-l4", milli=milli, sharing=sharing, memory_mib=24576,
                      workload=ProcessWorkload(command=["true"], env={"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "100"}))


@pytest.mark.parametrize("milli, percent", [(1, 1), (5, 1), (100, 10), (101, 11), (250, 25), (999, 100)])
def test_the_percentage_is_rounded_up_and_at_least_one(milli, percent):
    assert share_percent(milli) == percent


def test_time_slice_sets_the_compute_share_only():
    assert share_limits(lease(250)) == {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "25", "CUDA_DEVICE_SM_LIMIT": "25"}


def test_memory_sets_the_memory_limit_of_the_one_visible_device_in_mib():
    assert share_limits(lease(250, "memory")) == {
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "25", "CUDA_DEVICE_SM_LIMIT": "25", "CUDA_DEVICE_MEMORY_LIMIT_0": "6144m"}


@pytest.mark.parametrize("changed", [{"milli": 1000}, {"sharing": "none"}, {"vendor": "amd"}])
def test_whole_devices_and_other_vendors_get_no_share_variables(changed):
    args = {"milli": 250, "sharing": "time_slice", "vendor": "nvidia"} | changed
    assert share_limits(lease(**args)) == {}


def test_slurm_shards_round_down_so_what_fits_a_device_fits_its_shards():
    assert [shards(m, 1000) for m in (1, 250, 999)] == [1, 250, 999]
    assert [shards(m, 8) for m in (125, 250, 400, 999)] == [1, 2, 3, 7]
    # three shares the broker fits on one device (400 + 350 + 250 = 1000) fit its 8 shards
    assert sum(shards(m, 8) for m in (400, 350, 250)) <= 8


def test_slurm_gres_for_whole_and_shared():
    settings = SlurmSettings(work_dir="/w", state_dir="/s", gres="gpu:h100", shards_per_gpu=1000)
    assert gres_for(lease(1000, units=2), settings) == "gpu:h100:2"
    assert gres_for(lease(250), settings) == "shard:250"


def test_the_wrapped_script_exports_the_share_after_the_tenants_env():
    script = wrap_command(lease().workload, "nvidia", share_limits(lease(300)))
    lines = script.splitlines()
    tenant = lines.index("export CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=100")
    ours = lines.index("export CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=30")
    assert tenant < ours < lines.index("exec true")
