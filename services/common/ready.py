"""``GET /health`` and ``GET /ready``, the probes of every service.

``/health`` says the process is alive (its ``pid`` tells a restarted one apart), and
nothing more: a liveness probe that failed on a NATS or Redis outage would have the
orchestrator restart replicas that are only waiting for it to pass.

``/ready``: can this replica do its work right now? A load balancer or an orchestrator
sends traffic to a replica only while it answers 200; a 503 lists every reason, so an
operator sees what is wrong.

Ready means: NATS connected, Redis answers a ping, and the event streams exist (a
service publishing into a missing stream would get no acknowledgement). A service may
add its own checks (``extra``: async callables returning a reason or ``None``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec
from litestar import Response, get
from litestar.datastructures import State
from litestar.openapi import ResponseSpec

from .subjects import EVENT_KINDS, Subjects

CHECK_TIMEOUT_S = 2.0


class Readiness(msgspec.Struct, frozen=True, kw_only=True):
    status: str  # "ready" or "not ready"
    service: str
    reasons: list[str]

Check = Callable[[State], Awaitable[str | None]]
Fact = Callable[[State], object]


async def _timed(what: str, aw: Awaitable[Any]) -> str | None:
    try:
        await asyncio.wait_for(aw, CHECK_TIMEOUT_S)
    except TimeoutError:
        return f"{what}: no answer within {CHECK_TIMEOUT_S:g}s"
    except Exception as exc:  # noqa: BLE001 - any failure is a reason to report
        return f"{what}: {type(exc).__name__}: {exc}"
    return None


async def reasons_not_ready(state: State, extra: Sequence[Check] = ()) -> list[str]:
    nc, redis = getattr(state, "nc", None), getattr(state, "redis", None)
    subjects: Subjects | None = getattr(state, "subjects", None)
    if nc is None or redis is None or subjects is None:
        return ["starting: connections not open yet"]
    reasons = []
    if not nc.is_connected:
        reasons.append("nats: not connected" + (" (reconnecting)" if nc.is_reconnecting else ""))
    if r := await _timed("redis", redis.ping()):
        reasons.append(r)
    if nc.is_connected:
        js = nc.jetstream()
        for kind in EVENT_KINDS:
            if r := await _timed(f"stream {subjects.stream(kind)}", js.stream_info(subjects.stream(kind))):
                reasons.append(r)
    for check in extra:
        if r := await check(state):
            reasons.append(r)
    return reasons


def health_route(service: str, **facts: Fact):  # noqa: ANN201 - a litestar route handler
    """``facts``: what else a service says there, each read from the app's state (the
    meter's ``ledger_ready``, which its benchmark waits on)."""

    @get("/health", tags=["ops"], summary="The process is alive", opt={"exclude_from_auth": True})
    async def health(state: State) -> dict[str, object]:
        return {"status": "ok", "service": service, "pid": os.getpid(),
                **{name: fact(state) for name, fact in facts.items()}}

    return health


def ready_route(service: str, extra: Sequence[Check] = ()):  # noqa: ANN201 - a litestar route handler
    @get("/ready", tags=["ops"], summary="Ready for traffic: NATS connected, Redis answers, streams exist",
         opt={"exclude_from_auth": True}, include_in_schema=True,
         responses={503: ResponseSpec(Readiness, description="Not ready: every reason", generate_examples=False)})
    async def ready(state: State) -> Response[Readiness]:
        reasons = await reasons_not_ready(state, extra)
        body = Readiness(status="ready" if not reasons else "not ready", service=service, reasons=reasons)
        return Response(body, status_code=200 if not reasons else 503,
                        headers={"Retry-After": "1"} if reasons else None)

    return ready
