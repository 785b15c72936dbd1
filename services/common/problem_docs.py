"""The OpenAPI schema says what errors really look like.

litestar documents a 400 as ``application/json`` ``{status_code, detail, extra}`` and no
other error at all; every service answers errors as RFC 7807 problem details
(``services/common/http.py``). ``document_problems`` gives every operation the problem
responses it can return, so clients (and the schemathesis run in the test suite) can
rely on the schema for errors too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
from litestar import Litestar
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, OpenAPIType, Operation, Schema
from litestar.routes import HTTPRoute

PROBLEM = "application/problem+json"


class Problem(msgspec.Struct, kw_only=True):
    """RFC 7807 problem details; some errors add fields (``errors``, ``reasons``, ``retry_after``)."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str


_EVERY = {
    400: "Malformed request: the detail says what to fix (body validation errors name the field)",
    404: "No such resource, or one of another tenant or provider (the two look the same)",
    405: "Method not allowed on this path",
    413: "Request body larger than the service accepts",
    503: "A dependency (NATS, Redis, the meter's ledger) is not ready; retry shortly",
}
_AUTHENTICATED = {
    401: "No, malformed, unknown or revoked API key",
    403: "This role may not do this",
    409: "Conflicts with the current state (the detail says which)",
    422: "Well-formed but not acceptable (the detail says why)",
    429: "Over the key's rate limit; see the Retry-After header",
}


def _spec(description: str) -> ResponseSpec:
    return ResponseSpec(data_container=Problem, media_type=PROBLEM, description=description,
                        generate_examples=False)


def problem_responses(*codes: int) -> dict[int, ResponseSpec]:
    """The documented problem responses ``codes`` for a handler's ``responses``: a public
    route that still checks a key (the event stream) declares the authenticated ones."""
    texts = {**_EVERY, **_AUTHENTICATED}
    return {code: _spec(texts[code]) for code in codes}


def document_problems(app: Litestar) -> Litestar:
    """Add the problem responses to every operation of ``app`` (before its schema is built)."""
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        for handler in route.route_handlers:
            codes: dict[int, str] = dict(_EVERY)
            if not handler.opt.get("exclude_from_auth"):
                codes.update(_AUTHENTICATED)
            own: dict[int, Any] = dict(handler.responses or {})
            handler.responses = {**{code: _spec(text) for code, text in codes.items()}, **own}
    return app


def also_served_as(media_type: str, description: str) -> type[Operation]:
    """An operation class for a handler whose 200 may also come as ``media_type`` (the
    meter's CSV usage): the schema lists it next to JSON, as a string."""

    @dataclass
    class AlsoServed(Operation):
        def __post_init__(self) -> None:
            ok = (self.responses or {}).get("200")
            if isinstance(ok, OpenAPIResponse):
                ok.content = {**(ok.content or {}),
                              media_type: OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING,
                                                                         description=description))}

    return AlsoServed
