"""The transactional outbox of the lease transitions (docs/lifecycle.md, "Outbox").

A lease transition is one script in Redis and its event is published after it. A broker
that dies in between (or cannot reach NATS past ``publish_durably``'s retries) would
leave Redis changed and the record (meter, failover, a rebuild) never told. So each
script, in the same atomic step, writes the event it owes into its region's outbox hash
(``Keys.lease_outbox``): field = the event id ``<lease id>.<seq>``, value = what rebuilds
that exact event. The caller removes the entry once JetStream acknowledged the event;
the sweep republishes, under the same id, whatever is older than a grace period.

A republish is harmless however often it happens (several replicas sweeping, or the
caller still retrying): within the stream's duplicate window JetStream drops it by its
``Nats-Msg-Id``; after it, the consumers are idempotent per lease and seq (the meter
skips ``seq`` at or below the account's and a ready already applied, and posts ledger
entries create-only by id; failover claims a lease's replacement once)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import msgspec
from redis.asyncio import Redis

from services.common.coalesce import Coalescer
from services.common.keys import Keys
from services.common.messages import AllocEvent, LeaseExpired, LeaseInfo, LeaseLost

log = logging.getLogger("broker")
NEVER_COMPLETED = "grant never completed"  # an expired lease its broker never confirmed
_ALLOC = msgspec.json.Decoder(AllocEvent)
_INFO = msgspec.json.Decoder(LeaseInfo)


class Entry(msgspec.Struct, frozen=True):
    """One outbox entry as the scripts write it (``cjson``; short names keep it small)."""

    k: str  # the event's type tag
    i: str  # the lease json, as the lease hash held it
    s: int  # seq
    f: int = -1  # free_after
    p: int = 0  # the lease was pending (never confirmed)
    t: str = ""  # the event's ``at`` (RFC 3339, as the caller encoded it)
    x: str = "{}"  # the event's other fields (json object: reason, by, ...)
    w: str = "0"  # when the script ran (unix s): the sweep's grace counts from here
    d: str = ""  # devices_free_after, comma-separated (a lease on a pool that shares its devices)


_ENTRY = msgspec.json.Decoder(Entry)


def tag_of(kind: type) -> str:
    return kind.__struct_config__.tag  # type: ignore[attr-defined]


def iso(at: datetime) -> str:
    return msgspec.json.encode(at).decode()[1:-1]


@dataclass(frozen=True, slots=True)
class Notice:
    """The event a transition owes: its kind, its time and its other fields. Given to the
    script (into the outbox) and to ``Core.announce`` (published): one source for both."""

    kind: type
    at: datetime
    extra: dict[str, object] = field(default_factory=dict)

    def args(self) -> list[str]:
        """The script arguments: type tag, ``at``, the other fields."""
        return [tag_of(self.kind), iso(self.at), msgspec.json.encode(self.extra).decode()]


def owed_event(tag: str, at: str, extra: str, lease: str | bytes, seq: int, free_after: int,
               pending: bool, devices_free_after: Sequence[int] = ()) -> AllocEvent:
    """The event of a transition, from what its script saw and what its caller said: the
    one builder of both the publish after the script and the sweep's republish, so the
    two are the same event. An expiry of a lease never confirmed is not an expiry: the
    client heard nothing, so it ends in the record at its grant time (billed nothing)."""
    lease_raw = lease.encode() if isinstance(lease, str) else lease
    lease_id = _INFO.decode(lease_raw).lease_id
    if pending and tag == tag_of(LeaseExpired):
        info = _INFO.decode(lease_raw)
        return LeaseLost(id=f"{lease_id}.{seq}", at=info.granted_at, lease=info, seq=seq, free_after=free_after,
                         devices_free_after=tuple(devices_free_after), reason=NEVER_COMPLETED)
    return _ALLOC.decode(msgspec.json.encode({
        **msgspec.json.decode(extra), "type": tag, "id": f"{lease_id}.{seq}", "at": at,
        "lease": msgspec.Raw(lease_raw), "seq": seq, "free_after": free_after,
        "devices_free_after": list(devices_free_after)}))


def entry_event(raw: bytes | str | Entry) -> AllocEvent:
    e = raw if isinstance(raw, Entry) else _ENTRY.decode(raw)
    return owed_event(e.k, e.t, e.x, e.i, e.s, e.f, bool(e.p), _devices(e.d))


def _devices(raw: str) -> tuple[int, ...]:
    return tuple(int(x) for x in raw.split(",") if x)


def _s(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class Outbox:
    """Reads and clears the per-region outbox hashes; the scripts write them."""

    def __init__(self, redis: Redis, keys: Keys, grace_s: float = 30.0) -> None:
        self.redis, self.keys, self.grace_s = redis, keys, grace_s
        # the removals of concurrent transitions share a pipeline
        self._removals: Coalescer[tuple[str, str], None] = Coalescer(self._remove)

    async def _remove(self, items: list[tuple[str, str]]) -> list[None]:
        pipe = self.redis.pipeline(transaction=False)
        for region, event_id in items:
            pipe.hdel(self.keys.lease_outbox(region), event_id)
        await pipe.execute()
        return [None] * len(items)

    async def published(self, region: str, event_id: str) -> None:
        """The event was acknowledged: nothing is owed any more."""
        await self._removals.submit((region, event_id))

    async def remove(self, items: Sequence[tuple[str, str]]) -> None:
        if items:
            await self._remove(list(items))

    async def owed(self, regions: Sequence[str], now: float, limit: int = 500,
                   chunk: int = 250) -> list[tuple[str, str, AllocEvent | None]]:
        """``(region, event id, event)`` of the entries written more than ``grace_s``
        ago (up to ``limit`` a region, a pipelined round trip per ``chunk`` regions);
        event None: an entry that cannot be read back (logged; the sweep drops it)."""
        out: list[tuple[str, str, AllocEvent | None]] = []
        for i in range(0, len(regions), chunk):
            part = regions[i:i + chunk]
            pipe = self.redis.pipeline(transaction=False)
            for region in part:
                pipe.hscan(self.keys.lease_outbox(region), 0, count=limit)
            for region, (_, found) in zip(part, await pipe.execute(), strict=True):
                for event_id, raw in found.items():
                    try:
                        entry = _ENTRY.decode(raw)
                        if float(entry.w) > now - self.grace_s:
                            continue
                        event: AllocEvent | None = entry_event(entry)
                    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
                        log.error("outbox entry %s of %s cannot be read back (%s): dropped", _s(event_id), region,
                                  exc)
                        event = None
                    out.append((region, _s(event_id), event))
        return out
