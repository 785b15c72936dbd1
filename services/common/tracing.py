"""Request ids: one id follows a request through HTTP, NATS and every service's logs.

The id comes from the caller's ``X-Request-ID`` (if it is a sane token) or is made
here; it is returned on the response, kept in a context variable while the request is
handled (so every log line and every message published on its behalf carries it), and
put in the ``X-Request-ID`` header of those NATS messages. Consumers read it back from
the message headers into their log lines. A context variable, not an argument, because
the id must reach code (publishers, loggers) that has no reason to know about HTTP.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import secrets
import time
from collections.abc import Iterator, Mapping
from contextvars import ContextVar

from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("http")
HEADER = "X-Request-ID"
_HEADER_BYTES = HEADER.lower().encode()
_VALID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)


_rng = random.Random(secrets.randbits(64))


def new_request_id() -> str:
    """128 random bits as hex. Request ids correlate logs, they guard nothing, so a
    seeded generator serves: ``secrets`` reads the OS's entropy on every call, a system
    call per request."""
    return f"{_rng.getrandbits(128):032x}"


def accept(raw: str | None) -> str:
    """The caller's id if it is a plain token (it ends up in logs and headers), else a new one."""
    return raw if raw and _VALID.fullmatch(raw) else new_request_id()


def current() -> str | None:
    return request_id.get()


def nats_headers(headers: dict[str, str] | None = None) -> dict[str, str] | None:
    """``headers`` plus the current request id, for a message published on a request's behalf."""
    rid = request_id.get()
    if rid is None:
        return headers
    return {**(headers or {}), HEADER: rid}


def from_headers(headers: Mapping[str, str] | None) -> str | None:
    """The request id a NATS message carries, if any."""
    if not headers:
        return None
    rid = headers.get(HEADER)
    return rid if rid and _VALID.fullmatch(rid) else None


@contextlib.contextmanager
def bound(rid: str | None) -> Iterator[None]:
    """Handle one consumed message under the request id it carries."""
    token = request_id.set(rid)
    try:
        yield
    finally:
        request_id.reset(token)


def _from_scope(scope: Scope) -> str:
    rid = scope.get("request_id")  # type: ignore[typeddict-item]
    if rid is None:
        raw = next((v for k, v in scope.get("headers", ()) if k == _HEADER_BYTES), None)
        rid = accept(raw.decode("latin-1") if raw else None)
        scope["request_id"] = rid  # type: ignore[typeddict-unknown-key]
    return rid


class RequestIdMiddleware(ASGIMiddleware):
    """Binds the request id while the request is handled (and unbinds it after, for
    servers and test clients that run several requests in one task)."""

    scopes = (ScopeType.HTTP,)

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        token = request_id.set(_from_scope(scope))
        scope["started"] = time.perf_counter()  # type: ignore[typeddict-unknown-key]
        try:
            await next_app(scope, receive, send)
        finally:
            request_id.reset(token)


async def add_request_id_header(message: Message, scope: Scope) -> None:
    """``before_send`` hook: every HTTP response carries the id, errors raised before a
    handler (401, 404 for an unknown path, 413) included. Also the access log, at debug
    (at info it would cost the hot paths)."""
    if message["type"] == "http.response.start" and scope.get("type") == "http":
        rid = _from_scope(scope)
        headers = list(message.get("headers", ()))
        headers.append((_HEADER_BYTES, rid.encode()))
        message["headers"] = headers  # type: ignore[typeddict-item]
        if log.isEnabledFor(logging.DEBUG):
            started = scope.get("started")  # type: ignore[typeddict-item]
            ms = round((time.perf_counter() - started) * 1000, 2) if started else None
            log.debug("%s %s %s", scope["method"], scope["path"], message["status"],
                      extra={"request_id": rid, "method": scope["method"], "path": scope["path"],
                             "status": message["status"], "ms": ms})
