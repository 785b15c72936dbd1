"""``GET /v1/events``: the live event stream as Server-Sent Events.

Authenticated here rather than by the shared middleware because a browser's
``EventSource`` cannot send headers: the key may come as ``Authorization: Bearer`` or,
for this endpoint only, as ``?key=`` (services run without access logs, so it is not
written down; see docs/events.md).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated

import anyio
import msgspec
from litestar import Request, get
from litestar.params import HeaderParameter, Parameter
from litestar.response import ServerSentEvent, ServerSentEventMessage
from nats.errors import Error as NatsError

from services.common.auth import KeyLookup
from services.common.errors import Unavailable
from services.common.http import PUBLIC
from services.common.subjects import Subjects

from ..domain.event_scope import format_cursor, parse_filter, parse_since, plan
from ..event_feed import EventFeed, start_positions

Q = Annotated[str | None, Parameter(max_length=200)]
RETRY_MS = 2000


async def _authenticate(request: Request, key: str | None):  # noqa: ANN202
    lookup: KeyLookup = request.app.state.key_lookup
    header = request.headers.get("authorization")
    return await lookup.authenticate(header if header or not key else f"Bearer {key}")


@get("/v1/events", tags=["events"], opt=PUBLIC,
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
    who = await _authenticate(request, key)
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
