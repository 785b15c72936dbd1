"""The three services as real processes against clustered engines, and what the tests
read back: the allocation stream, the meter's ledger and the pools' live state.

Nothing here knows the services are clustered: they get ``Settings`` and run unchanged.
The checks read Redis with redis-py's cluster client and JetStream with nats-py.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import httpx
import msgspec
import nats.errors
import nats.js.errors
from redis.cluster import RedisCluster

from services.cli.supervisor import ServiceProcess
from services.common.keys import Keys
from services.common.messages import ENDING_EVENTS, AllocEvent, CapacityEvent, LeaseGranted
from services.common.nats_conn import connect, read_stream
from services.common.settings import Settings
from services.common.subjects import MeterNames, Subjects
from services.meter.accounts import event_kind
from services.meter.model import LedgerEntry, LedgerRecord
from services.meter.pricing import ending_charges

from ..helpers import eventually
from ..procs import service_process

MODEL = "nvidia-a100-sxm-80gb"
PROVIDER = "acme"
# one region per Redis Cluster master: CRC16 of "{cn-yrd}", "{cn-nmg}", "{cn-jjj}" falls in the
# first, second and last third of the slots (the fixture splits the slots evenly)
REGIONS = ("cn-yrd", "cn-nmg", "cn-jjj")

_alloc = msgspec.json.Decoder(AllocEvent)
_capacity = msgspec.json.Decoder(CapacityEvent)
_record = msgspec.json.Decoder(LedgerRecord)


def pool_body(region: str, units: int, price: str = "2.00") -> dict:
    return {"region": region, "zone": "a", "model": MODEL, "units": units, "units_per_node": 8,
            "prices": {"currency": "USD", "on_demand": price, "interruptible": "0.80"}}


@dataclass
class Stack:
    settings: Settings
    registry: httpx.AsyncClient
    broker: httpx.AsyncClient
    meter: httpx.AsyncClient
    procs: dict[str, ServiceProcess]
    admin: dict[str, str] = field(default_factory=dict)
    provider: dict[str, str] = field(default_factory=dict)
    tenants: dict[str, dict[str, str]] = field(default_factory=dict)

    async def key(self, role: str, subject: str = "") -> dict[str, str]:
        r = await self.registry.post("/v1/keys", json={"role": role, "subject": subject}, headers=self.admin)
        assert r.status_code == 201, r.text
        return {"Authorization": f"Bearer {r.json()['key']}"}

    async def pool(self, pool_id: str, region: str, units: int, price: str = "2.00") -> None:
        r = await self.registry.put(f"/v1/pools/{pool_id}", json=pool_body(region, units, price),
                                    headers=self.provider)
        assert r.status_code in (200, 201), r.text

    async def request(self, tenant: str, body: dict) -> httpx.Response:
        return await self.broker.post("/v1/requests", json={"queue": False, **body}, headers=self.tenants[tenant])

    async def lease_op(self, tenant: str, lease_id: str, op: str) -> httpx.Response:
        return await self.broker.post(f"/v1/leases/{lease_id}/{op}", headers=self.tenants[tenant])

    async def quotes_everywhere(self) -> bool:
        """The broker sees a pool in every region (its world followed the registry)."""
        for region in REGIONS:
            r = await self.broker.post("/v1/quotes", json={"units": 1, "placement": {"regions": [region]}},
                                       headers=self.admin)
            if r.status_code != 200 or not r.json()["options"]:
                return False
        return True

    # --- what the engines hold ---------------------------------------------------------
    def redis(self) -> RedisCluster:
        return RedisCluster.from_url(self.settings.redis_url, decode_responses=True)

    def pool_states(self, pools: dict[str, str]) -> dict[str, dict[str, int]]:
        """``pool id -> {capacity, leased, live}`` straight from Redis (``pools``: id -> region);
        ``live`` sums the units of the live leases on the pool."""
        keys = Keys(self.settings.prefix)
        out = {}
        with contextlib.closing(self.redis()) as rc:
            for pool_id, region in pools.items():
                capacity, leased = rc.hmget(keys.pool(region, pool_id), "capacity", "leased")
                live = 0
                for lease_id in rc.smembers(keys.pool_leases(region, pool_id)):
                    live += int(rc.hget(keys.lease(region, lease_id), "units") or 0)
                out[pool_id] = {"capacity": int(capacity), "leased": int(leased or 0), "live": live}
        return out

    async def _read(self, stream: str, subject: str) -> list[bytes]:
        """A whole stream, read again from the start if JetStream is unavailable meanwhile
        (right after a node died, a stream may still be electing its leader)."""
        async def read() -> tuple[list[bytes]] | None:  # a tuple: an empty stream is an answer too
            nc = await connect(self.settings.nats_url, "test-reader")
            try:
                return ([data async for _, data in read_stream(nc.jetstream(), stream, subject)],)
            except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError):
                return None
            finally:
                await nc.close()

        (data,) = await eventually(read, timeout=60, every=0.5, what=f"{stream} readable")
        return data

    async def alloc_events(self) -> list[AllocEvent]:
        subjects = Subjects(self.settings.prefix)
        return [_alloc.decode(data) for data in await self._read(subjects.stream("alloc"), subjects.events("alloc"))]

    async def capacity_events(self) -> list[CapacityEvent]:
        subjects = Subjects(self.settings.prefix)
        return [_capacity.decode(data) for data in
                await self._read(subjects.stream("capacity"), subjects.events("capacity"))]

    async def ledger(self) -> list[LedgerEntry]:
        names = MeterNames.of(self.settings)
        records = [_record.decode(data) for data in await self._read(names.ledger_stream, names.ledger_subjects)]
        return [r for r in records if isinstance(r, LedgerEntry)]

    async def meter_settled(self, events: list[AllocEvent]) -> bool:
        """The meter has posted an entry for every ending event of the stream that bills
        something (a grant rolled back ends at its grant time: nothing to bill, no entry)."""
        ended = set(expected_charges(events, self.settings.min_bill_s))
        return ended <= {e.lease_id for e in await self.ledger()}


def expected_charges(events: list[AllocEvent], min_bill_s: int) -> dict[str, Decimal]:
    """What the meter must have posted per lease, computed from the stream with the pure
    pricing functions: the first ending event of each per-second lease. An ending that
    bills nothing (lost at its grant time: a grant rolled back) posts no entry."""
    out: dict[str, list] = {}
    for e in events:
        if isinstance(e, ENDING_EVENTS) and e.lease.lease_id not in out:
            out[e.lease.lease_id] = ending_charges(event_kind(e), e.at, e.lease, min_bill_s=min_bill_s)
    return {lease_id: sum((c.amount for c in charges), Decimal(0)) for lease_id, charges in out.items() if charges}


def granted_ids(events: list[AllocEvent]) -> set[str]:
    return {e.lease.lease_id for e in events if isinstance(e, LeaseGranted)}


@contextlib.asynccontextmanager
async def stack(settings: Settings, log_dir: Path, tenants: tuple[str, ...] = ("t1", "t2")) -> AsyncIterator[Stack]:
    """Registry, broker and meter processes (in that order: the broker loads the world the
    registry holds); keys for a provider and ``tenants``."""
    with contextlib.ExitStack() as procs:
        registry = procs.enter_context(service_process("registry", settings, log_dir))
        async with httpx.AsyncClient(base_url=registry.url, timeout=30) as reg:
            s = Stack(settings, reg, None, None, {"registry": registry},  # type: ignore[arg-type]
                      admin={"Authorization": f"Bearer {settings.admin_key}"})
            s.provider = await s.key("provider", PROVIDER)
            s.tenants = {t: await s.key("tenant", t) for t in tenants}
            s.procs["broker"] = procs.enter_context(service_process("broker", settings, log_dir))
            s.procs["meter"] = procs.enter_context(service_process("meter", settings, log_dir))
            async with httpx.AsyncClient(base_url=s.procs["broker"].url, timeout=30) as broker, \
                    httpx.AsyncClient(base_url=s.procs["meter"].url, timeout=30) as meter:
                s.broker, s.meter = broker, meter
                yield s


def slot_owner(settings: Settings, key: str) -> str:
    """``host:port`` of the Redis Cluster master that holds ``key``."""
    with contextlib.closing(RedisCluster.from_url(settings.redis_url)) as rc:
        node = rc.get_node_from_key(key)
        return f"{node.host}:{node.port}"


__all__ = ["REGIONS", "Stack", "expected_charges", "granted_ids", "pool_body", "slot_owner", "stack"]
