"""Shared pieces of the meter's integration tests (no tests here): allocation events built
and published the way the broker does, API keys per role, the meter app with a clock the
test moves, and a wait for the meter to have settled."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import traceback
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import msgspec
import redis.asyncio as aioredis
from litestar.testing import AsyncTestClient
from nats.js import JetStreamContext

from services.common.auth import KeyLookup
from services.common.keys import Keys
from services.common.messages import (
    AllocEvent,
    LeaseExpired,
    LeaseFailed,
    LeaseGranted,
    LeaseInfo,
    LeaseLost,
    LeasePreempted,
    LeaseProvisioning,
    LeaseReady,
    LeaseReleased,
    LeaseRenewed,
    LeaseRevoked,
)
from services.common.nats_conn import ensure_bucket, publish_event
from services.common.settings import Settings
from services.common.subjects import MeterNames, Subjects
from services.meter.app import create_app

from ..helpers import eventually

T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
ENDS = {"released": LeaseReleased, "expired": LeaseExpired, "preempted": LeasePreempted, "lost": LeaseLost,
        "revoked": LeaseRevoked, "failed": LeaseFailed}
FAST = dict(min_bill_s=60, invoice_grace_s=3 * 86400, finalize_interval_s=0.1, budget_interval_s=0.1,
            meter_ack_wait_s=5.0, meter_batch=500)


class Clock:
    """A clock the test sets; the app (on its own loop/thread) reads it."""

    def __init__(self, now: datetime = T0) -> None:
        self._now = now
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self._now

    def set(self, now: datetime) -> None:
        with self._lock:
            self._now = now

    def advance(self, **delta: float) -> datetime:
        with self._lock:
            self._now += timedelta(**delta)
            return self._now


_n = 0


def lease(**over: Any) -> LeaseInfo:
    global _n
    _n += 1
    base: dict[str, Any] = dict(
        lease_id=f"lease_{_n:06d}_{time.monotonic_ns() % 10**9}", request_id=f"req_{_n}", tenant="t1", pool_id="p1",
        provider="acme", region="cn-yrd", model="nvidia-a100-sxm-80gb", units=1, billing="on_demand",
        unit_price=Decimal("3.60"), price_basis="unit_hour", currency="USD", granted_at=T0,
        expires_at=T0 + timedelta(days=1), term_months=0, ttl_s=0)
    base.update(over)
    if base["billing"] in ("reserved_month", "reserved_year") and "price_basis" not in over:
        base["price_basis"] = "unit_month"
        base["term_months"] = 1 if base["billing"] == "reserved_month" else 12
        base["expires_at"] = base["granted_at"] + timedelta(hours=730 * base["term_months"])
    return LeaseInfo(**base)


def granted(info: LeaseInfo) -> LeaseGranted:
    return LeaseGranted(id=f"{info.lease_id}.1", at=info.granted_at, lease=info, seq=1)


def provisioning(info: LeaseInfo) -> LeaseProvisioning:
    """The grant of a lease the provider must deliver (``info.delivery`` set)."""
    return LeaseProvisioning(id=f"{info.lease_id}.1", at=info.granted_at, lease=info, seq=1)


def ready(info: LeaseInfo, at: datetime, seq: int = 2) -> LeaseReady:
    return LeaseReady(id=f"{info.lease_id}.{seq}", at=at, lease=info, seq=seq)


def renewed(info: LeaseInfo, seq: int, at: datetime, ttl_s: int = 300) -> LeaseRenewed:
    info = msgspec.structs.replace(info, expires_at=at + timedelta(seconds=ttl_s))
    return LeaseRenewed(id=f"{info.lease_id}.{seq}", at=at, lease=info, seq=seq)


def ended(info: LeaseInfo, kind: str, at: datetime, seq: int = 2, **extra: Any) -> AllocEvent:
    return ENDS[kind](id=f"{info.lease_id}.{seq}", at=at, lease=info, seq=seq, **extra)


async def publish(js: JetStreamContext, subjects: Subjects, *events: AllocEvent, msg_id: str | None = None) -> None:
    for event in events:
        subject = subjects.alloc(event.lease.region, event.lease.tenant)
        if msg_id is None:
            await publish_event(js, subject, event)
        else:  # the same event again under another Nats-Msg-Id: a replay the stream cannot de-duplicate
            await js.publish(subject, msgspec.json.encode(event), headers={"Nats-Msg-Id": msg_id + event.id})


async def publish_many(js: JetStreamContext, subjects: Subjects, events: list[AllocEvent], window: int = 500,
                       msg_ids: list[str] | None = None) -> None:
    """Pipelined: ``window`` publishes in flight at a time, every ack awaited."""
    for i in range(0, len(events), window):
        chunk = events[i:i + window]
        ids = msg_ids[i:i + window] if msg_ids else [e.id for e in chunk]
        await asyncio.gather(*(js.publish(subjects.alloc(e.lease.region, e.lease.tenant), msgspec.json.encode(e),
                                          headers={"Nats-Msg-Id": mid}) for e, mid in zip(chunk, ids, strict=True)))


async def issue_keys(settings: Settings, nc, roles: dict[str, tuple[str, str]]) -> dict[str, dict[str, str]]:
    """Keys written to the durable key bucket and Redis the way the registry does."""
    subjects = Subjects(settings.prefix)
    kv = await ensure_bucket(nc.jetstream(), subjects.bucket("keys"))
    redis = aioredis.Redis.from_url(settings.redis_url)
    try:
        lookup = KeyLookup(redis, kv, Keys(settings.prefix), None)
        out = {}
        for name, (role, subject) in roles.items():
            _, key = await lookup.issue(role, subject, name, datetime.now(UTC))  # type: ignore[arg-type]
            out[name] = {"Authorization": f"Bearer {key}"}
        return out
    finally:
        await redis.aclose()


ROLES = {"t1": ("tenant", "t1"), "t2": ("tenant", "t2"), "acme": ("provider", "acme"),
         "other": ("provider", "other"), "ops": ("ops", "")}


@dataclass
class MeterWorld:
    client: AsyncTestClient
    js: JetStreamContext
    subjects: Subjects
    names: MeterNames
    clock: Any
    keys: dict[str, dict[str, str]]
    admin: dict[str, str]
    extra: dict[str, Any] = field(default_factory=dict)

    def h(self, who: str) -> dict[str, str]:
        return self.admin if who == "admin" else self.keys[who]

    async def get(self, path: str, who: str = "admin", **params: Any):
        return await self.client.get(path, headers=self.h(who), params={k: v for k, v in params.items()
                                                                         if v is not None})

    async def publish(self, *events: AllocEvent, msg_id: str | None = None) -> None:
        await publish(self.js, self.subjects, *events, msg_id=msg_id)

    async def settled(self, timeout: float = 20.0) -> dict:
        """Every published event consumed and acked, and every ledger entry folded."""
        async def status_if_settled() -> dict | None:
            status = (await self.get("/v1/meter/status")).json()
            info = await self.js.stream_info(self.names.ledger_stream)
            if (status.get("ready") and status["pending"] == 0 and status["ack_pending"] == 0
                    and status["ledger_seq"] >= info.state.last_seq):
                return status
            return None

        return await eventually(status_if_settled, timeout=timeout, what="meter settled")

    async def usage(self, who: str = "admin", **params: Any) -> dict:
        r = await self.get("/v1/usage", who, **params)
        assert r.status_code == 200, r.text
        return r.json()


@contextlib.asynccontextmanager
async def meter_world(settings: Settings, nc, clock: Any = None, ms: dict | None = None,
                      keys: dict[str, dict[str, str]] | None = None) -> AsyncIterator[MeterWorld]:
    """The meter app; ``clock`` a ``Clock`` the test moves (default: T0) or any callable
    (e.g. ``services.meter.service.utcnow`` next to a real broker)."""
    clock = clock or Clock()
    keys = keys or await issue_keys(settings, nc, ROLES)
    settings = msgspec.structs.replace(settings, **{**FAST, **(ms or {})})
    async with AsyncTestClient(app=create_app(settings, clock)) as client:
        try:
            yield MeterWorld(client=client, js=nc.jetstream(), subjects=Subjects(settings.prefix),
                             names=MeterNames.of(settings), clock=clock, keys=keys,
                             admin={"Authorization": f"Bearer {settings.admin_key}"})
        except BaseException:
            traceback.print_exc()  # shown even if the app's shutdown then hangs
            raise


def money(value: Any) -> Decimal:
    return Decimal(str(value))
