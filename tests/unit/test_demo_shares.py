"""The demo world shares (issue 14): some demo pools share their devices — an Ascend pool
by memory and NVIDIA pools by time — within the registry's limits, and the demo tenants
ask for shares those pools can hold. Pure: the specs and bodies are checked against the
services' own schemas."""

from __future__ import annotations

import msgspec

from services.broker.domain.requests import ComputeRequest
from services.cli.demo import WORKLOAD, demo_pools
from services.common.messages import MAX_SHARED_UNITS, PoolSpec


def test_demo_pools_share_by_memory_and_by_time() -> None:
    specs = {pool_id: msgspec.convert(spec, PoolSpec) for _, pool_id, spec in demo_pools()}
    sharing = {pool_id: s for pool_id, s in specs.items() if s.sharing.mode != "none"}
    modes = {(s.sharing.mode, s.model.split("-")[0]) for s in sharing.values()}
    assert ("memory", "huawei") in modes and ("time_slice", "nvidia") in modes
    assert all(s.units <= MAX_SHARED_UNITS for s in sharing.values())
    assert len(sharing) < len(specs)  # most of the world leases whole devices, as before


def test_every_demo_share_request_fits_a_sharing_demo_pool() -> None:
    specs = [msgspec.convert(spec, PoolSpec) for _, _, spec in demo_pools()]
    shares = [msgspec.convert(body, ComputeRequest) for _, body, _ in WORKLOAD if "share" in body]
    assert shares
    for req in shares:
        assert req.share is not None
        fits = [s for s in specs if s.sharing.mode != "none" and s.sharing.min_milli <= req.share.milli
                and (not req.accelerators.models or s.model in req.accelerators.models)
                and (not req.accelerators.vendors or s.model.split("-")[0] in req.accelerators.vendors)]
        assert fits, req
