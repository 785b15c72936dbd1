"""``GET /v1/events``: the live event stream as Server-Sent Events.

Authenticated here rather than by the shared middleware because a browser's
``EventSource`` cannot send headers: the key may come as ``Authorization: Bearer`` or,
for this endpoint only, as ``?key=`` (services run without access logs, so it is not
written down; see docs/events.md).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated

import anyio
import msgspec
from litestar import Request, get
from litestar.openapi import ResponseSpec
from litestar.params import HeaderParameter, Parameter
from litestar.response import ServerSentEvent, ServerSentEventMessage
from nats.errors import Error as NatsError

from services.common.auth import KeyLookup
from services.common.errors import Unauthorized, Unavailable
from services.common.http import PUBLIC
from services.common.problem_docs import problem_responses
from services.common.subjects import Subjects

from ..domain.event_scope import format_cursor, parse_filter, parse_since, plan
from ..event_feed import EventFeed, start_positions

Q = Annotated[str | None, Parameter(max_length=200)]
RETRY_MS = 2000


class StreamEvent(msgspec.Struct, kw_only=True):
    """One Server-Sent Event as the schema describes it (each is sent as ``field: value`` lines)."""

    event: str | None = None  # ready, a message type such as lease.granted, or end
    id: str | None = None  # the cursor to resume from (Last-Event-ID)
    data: str  # a JSON document
    retry: int | None = None
RECHECK_S = 1.0


def _authorization(request: Request, key: str | None) -> str | None:
    header = request.headers.get("authorization")
    return header if header or not key else f"Bearer {key}"


class KeyWatch:
    """A stream outlives the request that opened it, so its key is checked again while it
    runs (at most every ``RECHECK_S``, on events and keep-alive ticks): a revoked key's
    stream ends within seconds. A Redis blip does not end streams; only a refusal does."""

    def __init__(self, lookup: KeyLookup, authorization: str | None) -> None:
        self.lookup, self.authorization = lookup, authorization
        self._checked = time.monotonic()

    async def still_valid(self) -> bool:
        if time.monotonic() - self._checked < RECHECK_S:
            return True
        self._checked = time.monotonic()
        try:
            await self.lookup.authenticate(self.authorization)
        except Unauthorized:
            return False
        except Exception:  # noqa: BLE001 - cannot tell now; ask again next time
            return True
        return True


@get("/v1/events", tags=["events"], opt=PUBLIC, media_type="text/event-stream",
     responses={200: ResponseSpec(StreamEvent, media_type="text/event-stream", generate_examples=False,
                                  description="Server-Sent Events: a `ready` event, then one per message"),
                **problem_responses(401, 403, 422, 429)},
     summary="Live events as Server-Sent Events (ops/admin: all; provider, tenant: their own)",
     description="Filters: kind (capacity, alloc, request, billing; comma-separated), type (e.g. lease.granted), "
                 "region, provider, tenant. Resume: the Last-Event-ID header or ?since= (an event id, a duration "
                 "such as 15m, an ISO time, or all). follow=false replays up to now and ends. The key may be "
                 "given as ?key= (EventSource cannot send headers).")
async def events(request: Request, kind: Q = None, type: Q = None, region: Q = None,  # noqa: A002
                 provider: Q = None, tenant: Q = None, since: Q = None, follow: bool = True,
                 key: Annotated[str | None, Parameter(max_length=200)] = None,
                 last_event_id: Annotated[str | None, HeaderParameter(name="last-event-id", max_length=200)] = None,
                 ) -> ServerSentEvent:
    watch = KeyWatch(request.app.state.key_lookup, _authorization(request, key))
    who = await watch.lookup.authenticate(watch.authorization)
    limiter = getattr(request.app.state, "rate_limiter", None)
    # opening a stream counts like any request of this key (a reconnect storm too); a key
    # revoked a moment ago is refused here even if this replica has not heard it yet
    if limiter is not None and not await limiter.hit(who):
        who = await watch.lookup.confirm(who)
    subjects: Subjects = request.app.state.subjects
    the_plan = plan(who, parse_filter(kind, type, region, provider, tenant), subjects.prefix)
    start = parse_since(last_event_id, since, datetime.now(UTC))
    js = request.app.state.js
    try:
        cursor, last = await start_positions(js, subjects, the_plan, start)
    except (NatsError, TimeoutError) as exc:  # NATS away: say so, the client retries
        raise Unavailable(f"event streams unreachable ({exc.__class__.__name__}); retry shortly") from None
    feed = EventFeed(js, subjects, the_plan, cursor, last, follow=follow,
                     idle_s=request.app.state.events_idle_s)

    async def stream() -> AsyncIterator[ServerSentEventMessage]:
        try:
            await feed.open()  # consumers exist before "ready": a watcher told ready misses nothing
            ready = {"cursor": format_cursor(cursor), "kinds": [s.kind for s in the_plan.streams],
                     "subjects": [s.filter_subject for s in the_plan.streams], "follow": follow}
            yield ServerSentEventMessage(event="ready", id=format_cursor(cursor),
                                         data=msgspec.json.encode(ready).decode(), retry=RETRY_MS)
            async for item in feed.items():
                if not await watch.still_valid():
                    yield ServerSentEventMessage(event="revoked", data=msgspec.json.encode(
                        {"status": 401, "title": "unauthorized", "detail": "the API key was revoked"}).decode())
                    return
                if item is None:
                    yield ServerSentEventMessage(comment="keep-alive", data=None)
                    continue
                yield ServerSentEventMessage(id=format_cursor(item.cursor), data=item.envelope().decode())
            yield ServerSentEventMessage(event="end", id=format_cursor(feed.cursor),
                                         data=msgspec.json.encode({"cursor": format_cursor(feed.cursor)}).decode())
        finally:  # the client went away (cancellation) or the replay ended
            with anyio.CancelScope(shield=True):
                await feed.close()

    return ServerSentEvent(stream())
