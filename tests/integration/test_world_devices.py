"""The broker's world keeps the engine's per-device state of sharing pools (issue 14):
all free when a pool is first seen, the per-device hash in Redis when it is read (start,
recovery), and each allocation event's ``devices_free_after``; shares place on it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import msgspec

from services.broker.matching import Ask
from services.broker.world import World
from services.common.keys import Keys
from services.common.messages import LeaseGranted, LeaseInfo
from services.common.settings import Settings
from services.common.startup import close_connections, open_connections
from services.common.subjects import Subjects

from ..helpers import eventually
from .conftest import REGION, Api


def lease(pool_id: str, devices: tuple[int, ...], milli: int) -> LeaseInfo:
    now = datetime.now(UTC)
    return LeaseInfo(lease_id="l-1", request_id="r-1", tenant="t1", pool_id=pool_id, provider="acme",
                     region=REGION, model="nvidia-a100-sxm-80gb", units=1, billing="on_demand",
                     unit_price=Decimal("2.10"), granted_at=now, expires_at=now + timedelta(hours=1),
                     milli=milli, devices=devices)


async def test_world_follows_device_state_from_redis_and_allocation_events(
        settings: Settings, registry_api: Api) -> None:
    keys, subjects = Keys(settings.prefix), Subjects(settings.prefix)
    provider = await registry_api.key("provider", "acme")
    r = await registry_api.put_pool("sh", provider, units=16, units_per_node=8,
                                    sharing={"mode": "time_slice", "min_milli": 100})
    assert r.status_code in (200, 201), r.text
    nc, redis, js = await open_connections(settings, subjects, "world-devices", no_echo=False)
    try:
        world = World(nc, js, redis, keys, subjects)
        await world.load()
        await world.start()
        state = world.engine.get("sh")
        assert state is not None and state.sharing == "time_slice" and state.min_milli == 100
        assert world.engine.devices("sh") == dict.fromkeys(range(16), 1000)  # nothing in Redis yet: all free

        # what the reservation script leaves in Redis (device 3: 250 taken, device 9: 100), read on resync
        await redis.hset(keys.pool_devices(REGION, "sh"), mapping={"3": 750, "9": 900})
        await world.resync()
        assert (world.engine.device_free("sh", 3), world.engine.device_free("sh", 9)) == (750, 900)

        # a grant by another replica: its devices_free_after, absolute
        event = LeaseGranted(id="e-1", at=datetime.now(UTC), lease=lease("sh", (3,), 500), free_after=14,
                             devices_free_after=(250,))
        await nc.publish(subjects.alloc(REGION, "t1"), msgspec.json.encode(event))
        await eventually(lambda: world.engine.device_free("sh", 3) == 250, timeout=10,
                         what="the engine follows devices_free_after")
        await nc.publish(subjects.alloc(REGION, "t1"), msgspec.json.encode(event))  # redelivered: same
        d = world.engine.match(Ask(units=1, milli=250))
        assert d.options[0].allocations[0].devices == (3,)  # the 250 slice left is filled exactly

        # a share held by this replica is not offered twice, and comes back when settled
        held = ("sh", 1, 250, (3,))  # (pool, units, milli, devices), or the engine's Allocation (below)
        assert world.hold([held])
        assert world.engine.device_free("sh", 3) == 0 and not world.hold([held])
        world.settle([held], {})
        assert world.engine.device_free("sh", 3) == 250
        assert world.hold([held])
        world.settle([held], {"sh": 14}, {"sh": {3: 0}})  # the script took it: Redis says 0 left
        assert world.engine.device_free("sh", 3) == 0

        # the script took another device than the hint (the hint no longer fitted in Redis):
        # the hinted device gets its held milli back, the one taken says what Redis said
        before = world.engine.device_free("sh", 9)
        assert world.hold([("sh", 1, 100, (9,))])
        world.settle([("sh", 1, 100, (9,))], {"sh": 14}, {"sh": {10: 900}})
        assert (world.engine.device_free("sh", 9), world.engine.device_free("sh", 10)) == (before, 900)

        option = world.engine.match(Ask(units=1, milli=300)).options[0]  # the engine's allocation, held as it is
        [a] = option.allocations
        before = world.engine.device_free("sh", a.devices[0])
        assert world.hold(option.allocations)
        assert world.engine.device_free("sh", a.devices[0]) == before - 300
        world.settle(option.allocations, {})
        assert world.engine.device_free("sh", a.devices[0]) == before
    finally:
        await close_connections(nc, redis)
