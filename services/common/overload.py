"""Load shedding: a service works on at most ``max_in_flight`` requests at once and
refuses the rest at once with a 503 and ``Retry-After`` (docs/overload.md).

Without a bound, every request past what Redis' connection pool can serve waited for
a connection (10 s) and then failed with a message blaming the store; admitted and
excess requests alike got slow. A request holds its slot until its answer starts, so
an event stream (open for hours) is counted while it is set up, not while it runs.
Probes and scrapes (``/health``, ``/ready``, ``/metrics``) are never shed: an
orchestrator must still see a busy replica as alive.
"""

from __future__ import annotations

import msgspec
from prometheus_client import Counter

from litestar import Litestar
from litestar.types import ASGIApp, Message, Receive, Scope, Send

SHED = Counter("cb_http_shed", "Requests refused with a 503 because the service was at its in-flight limit")
NEVER_SHED = ("/health", "/ready", "/metrics")
RETRY_AFTER_S = 1  # admitted requests take milliseconds: a slot frees well within a second
RETRY_AFTER_SCOPE_KEY = "cb.retry_after"  # set on a refused request: its connection pauses (http_protocol.py)


def _refusal(limit: int) -> bytes:
    return msgspec.json.encode({
        "type": "about:blank", "title": "busy", "status": 503,
        "detail": f"the service is working on its limit of {limit} requests; retry after {RETRY_AFTER_S}s",
        "retry_after": RETRY_AFTER_S,
    })


class Slots:
    """The service's requests in flight, counted without a lock: one event loop runs
    them all (a worker process has its own)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.in_flight = limit, 0
        self.body = _refusal(limit)
        self.headers = [(b"content-type", b"application/problem+json"), (b"retry-after", str(RETRY_AFTER_S).encode()),
                        (b"content-length", str(len(self.body)).encode())]

    async def refuse(self, send: Send) -> None:
        SHED.inc()
        # a fresh header list each time: what runs before sending (the request id) appends to it
        await send({"type": "http.response.start", "status": 503, "headers": list(self.headers)})
        await send({"type": "http.response.body", "body": self.body})


class LoadShedder:
    """Raw ASGI around the app's router: nothing else spends time on a request that
    will be refused."""

    def __init__(self, app: ASGIApp, slots: Slots) -> None:
        self.app, self.slots = app, slots

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        slots = self.slots
        if scope["type"] != "http" or scope["path"].startswith(NEVER_SHED):
            await self.app(scope, receive, send)
            return
        if slots.in_flight >= slots.limit:
            scope[RETRY_AFTER_SCOPE_KEY] = RETRY_AFTER_S  # type: ignore[literal-required]
            await slots.refuse(send)
            return
        slots.in_flight += 1
        held = True

        async def send_and_release(message: Message) -> None:
            nonlocal held
            if held and message["type"] == "http.response.start":
                held = False
                slots.in_flight -= 1
            await send(message)

        try:
            await self.app(scope, receive, send_and_release)
        finally:
            if held:
                slots.in_flight -= 1


def shed_load(app: Litestar, limit: int) -> Litestar:
    """Put the shedder in front of ``app``'s routing (``limit`` 0: no shedding): a
    refusal costs no routing and no middleware. litestar's route middleware would be
    built per route, after routing; its request-id header still comes (``before_send``)."""
    if limit > 0:
        app.asgi_handler = LoadShedder(app.asgi_handler, Slots(limit))
    return app


def slots_of(app: Litestar) -> Slots | None:
    return app.asgi_handler.slots if isinstance(app.asgi_handler, LoadShedder) else None
