"""Who may watch which events, and where a watcher is in the streams. Pure code.

The four event kinds live in four JetStream streams, each with its own sequence, so a
position in "all events" is a vector: one stream sequence per kind, written as the SSE
event id ``<capacity>-<alloc>-<request>-<billing>`` (e.g. ``12-40-38-0``). Each number
is the last sequence of that stream the watcher has been sent; resuming starts every
stream one past it, so nothing is missed and nothing is repeated even though the
streams are merged in arrival order.

A filter becomes one NATS filter subject per stream (so the server does the
filtering), plus at most one check the subject cannot express: a provider's view of
allocation events (the alloc subject is ``<region>.<tenant>``, the provider is inside
the lease).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from services.common.auth import Principal
from services.common.errors import BadRequest, Forbidden, Unprocessable
from services.common.ids import is_valid_id
from services.common.subjects import ALLOC, BILLING, CAPACITY, EVENT_KINDS, REQUEST

# the kinds each role may watch at all
ROLE_KINDS: dict[str, tuple[str, ...]] = {
    "admin": EVENT_KINDS, "ops": EVENT_KINDS,
    "provider": (CAPACITY, ALLOC),  # its pools' capacity, and the leases on its pools
    "tenant": (ALLOC, REQUEST, BILLING),  # its own requests, leases and billing
}
# which filters each kind's events carry (request and billing events have no region or provider)
KIND_FILTERS: dict[str, frozenset[str]] = {
    CAPACITY: frozenset({"region", "provider"}),
    ALLOC: frozenset({"region", "provider", "tenant"}),
    REQUEST: frozenset({"tenant"}),
    BILLING: frozenset({"tenant"}),
}


# the first word of an event type names its kind (docs/events.md)
TYPE_KINDS = {"pool": CAPACITY, "lease": ALLOC, "request": REQUEST, "budget": BILLING, "invoice": BILLING}


@dataclass(frozen=True)
class EventFilter:
    kinds: tuple[str, ...] = ()  # empty: every kind the role may watch
    types: tuple[str, ...] = ()  # event type tags, e.g. lease.granted; empty: all
    region: str | None = None
    provider: str | None = None
    tenant: str | None = None


@dataclass(frozen=True)
class StreamPlan:
    kind: str
    filter_subject: str
    provider: str | None = None  # alloc only: keep leases on this provider's pools


@dataclass(frozen=True)
class Plan:
    streams: tuple[StreamPlan, ...]
    types: frozenset[str] = field(default_factory=frozenset)


def _csv(raw: str | None) -> tuple[str, ...]:
    if raw is None:
        return ()
    return tuple(dict.fromkeys(p.strip() for p in raw.split(",") if p.strip()))


def parse_filter(kind: str | None, type_: str | None, region: str | None, provider: str | None,
                 tenant: str | None) -> EventFilter:
    kinds = _csv(kind)
    for k in kinds:
        if k not in EVENT_KINDS:
            raise BadRequest(f"unknown event kind {k!r}; kinds are {', '.join(EVENT_KINDS)}")
    types = _csv(type_)
    for t in types:
        if not re.fullmatch(r"[a-z]+\.[a-z_]+", t):
            raise BadRequest(f"bad event type {t!r}; types look like lease.granted (see docs/events.md)")
    for name, value in (("region", region), ("provider", provider), ("tenant", tenant)):
        if value is not None and not is_valid_id(value):
            raise BadRequest(f"{name} must be an id (a-z 0-9 _ -), got {value!r}")
    return EventFilter(kinds=kinds, types=types, region=region, provider=provider, tenant=tenant)


def plan(who: Principal, f: EventFilter, prefix: str) -> Plan:
    """The filter, narrowed to what ``who`` may see, as one subject per stream."""
    allowed = ROLE_KINDS[who.role]
    provider, tenant = f.provider, f.tenant
    if who.role == "provider":
        if provider is not None and provider != who.subject:
            raise Forbidden("a provider key sees only its own provider's events")
        provider = who.subject
    if who.role == "tenant":
        if tenant is not None and tenant != who.subject:
            raise Forbidden("a tenant key sees only its own tenant's events")
        tenant = who.subject
    for k in f.kinds:
        if k not in allowed:
            raise Forbidden(f"role {who.role} may not watch {k} events (may watch {', '.join(allowed)})")
    given = {n for n, v in (("region", f.region), ("provider", f.provider), ("tenant", f.tenant)) if v is not None}
    # types imply their kinds: no consumer on a stream that cannot hold a wanted type
    implied = {TYPE_KINDS[t.split(".")[0]] for t in f.types if t.split(".")[0] in TYPE_KINDS}
    kinds = f.kinds or tuple(k for k in allowed if not f.types or k in implied)
    streams = []
    for kind in kinds:
        if not given <= KIND_FILTERS[kind]:
            if f.kinds:  # asked for this kind explicitly: say why it cannot match
                raise BadRequest(f"{kind} events carry no {', '.join(sorted(given - KIND_FILTERS[kind]))}")
            continue
        base = f"{prefix}.events.{kind}"
        if kind == CAPACITY:
            streams.append(StreamPlan(kind, f"{base}.{f.region or '*'}.{provider or '*'}"))
        elif kind == ALLOC:
            streams.append(StreamPlan(kind, f"{base}.{f.region or '*'}.{tenant or '*'}", provider))
        else:
            streams.append(StreamPlan(kind, f"{base}.{tenant or '*'}"))
    if not streams:
        if not kinds:
            raise BadRequest(f"none of the kinds role {who.role} may watch ({', '.join(allowed)}) has these types")
        raise BadRequest("no event kind carries all of these filters: " + ", ".join(sorted(given)))
    return Plan(tuple(streams), frozenset(f.types))


# --- positions ---------------------------------------------------------------------------
Cursor = dict[str, int]  # kind -> last stream sequence sent


def format_cursor(cursor: Cursor) -> str:
    return "-".join(str(cursor.get(k, 0)) for k in EVENT_KINDS)


def parse_cursor(raw: str) -> Cursor:
    parts = raw.strip().split("-")
    if len(parts) != len(EVENT_KINDS) or not all(p.isdigit() and len(p) <= 19 for p in parts):
        raise BadRequest(f"bad event id {raw!r}: expected {'-'.join('<' + k + ' seq>' for k in EVENT_KINDS)}")
    return {k: int(p) for k, p in zip(EVENT_KINDS, parts, strict=True)}


_DURATION = re.compile(r"^(\d{1,9})([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Since:
    """Where to start: a cursor, a time, the beginning (``all``) or now (neither)."""

    cursor: Cursor | None = None
    time: datetime | None = None
    beginning: bool = False


def parse_since(last_event_id: str | None, since: str | None, now: datetime) -> Since:
    """``Last-Event-ID`` (an EventSource reconnecting) wins over ``?since=``: the URL
    still carries the first connection's ``since``."""
    if last_event_id:
        return Since(cursor=parse_cursor(last_event_id))
    if not since:
        return Since()
    raw = since.strip()
    if raw == "all":
        return Since(beginning=True)
    if m := _DURATION.match(raw):
        try:
            return Since(time=now - timedelta(seconds=int(m.group(1)) * _UNIT_S[m.group(2)]))
        except OverflowError:  # before year 1: say so rather than fail
            raise Unprocessable(f"since {since!r} reaches back before year 1; use since=all for every event") from None
    if raw.count("-") == len(EVENT_KINDS) - 1 and all(p.isdigit() for p in raw.split("-")):
        return Since(cursor=parse_cursor(raw))
    try:
        at = datetime.fromisoformat(raw)
    except ValueError:
        raise BadRequest(f"bad since {since!r}: an event id, a duration such as 15m, an ISO time, or all") from None
    return Since(time=at if at.tzinfo else at.replace(tzinfo=UTC))
