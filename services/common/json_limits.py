"""A nesting limit on JSON request bodies, checked before they are decoded.

msgspec (like every recursive decoder) recurses once per level of nesting: a 2 KB body
nested 1,000 levels deep ran out of Python's recursion limit and answered a 500 on
every body endpoint. No request of ours nests deeper than a handful of levels, so a
body deeper than ``MAX_NESTING`` is refused with a 400 that says so, before decoding.
"""

from __future__ import annotations

import math
from typing import Any

from litestar import Request
from litestar.exceptions import ClientException, InternalServerException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.types import Empty

from .errors import BadRequest

MAX_NESTING = 64  # the deepest body of any endpoint is a few levels (a bulk list of pools with prices)

_BRACKETS_ONLY = bytes.maketrans(b"{}", b"[]"), bytes(b for b in range(256) if b not in b"[]{}")


def too_deep(body: bytes, limit: int = MAX_NESTING) -> bool:
    """Does ``body`` nest arrays and objects more than ``limit`` levels deep (an
    unclosed bracket counts as open)?

    Linear and in C loops: a body with no more brackets than ``limit`` is not scanned
    at all (every request but the bulk ones); a bulk body costs about as much as its
    decoding (5 ms for 5,000 pools)."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    # brackets inside strings do not nest: drop escapes (backslash pairs first, then
    # escaped quotes), so that every other quote opens or closes a string
    outside = b"".join(body.replace(b"\\\\", b"").replace(b'\\"', b"").split(b'"')[::2])
    skeleton = outside.translate(*_BRACKETS_ONLY)
    run = b"[" * (limit + 1)
    for _ in range(limit):  # each pass removes the innermost pairs: a shallow body empties
        if run in skeleton:
            return True
        shorter = skeleton.replace(b"[]", b"")
        if shorter == skeleton:  # nothing left to pair: what remains is unclosed
            return skeleton.count(b"[") > limit
        skeleton = shorter
    return bool(skeleton)


def check_nesting(body: bytes, limit: int = MAX_NESTING) -> None:
    if too_deep(body, limit):
        raise BadRequest(f"request body nests more than {limit} levels of arrays and objects; "
                         f"at most {limit} are accepted", max_nesting=limit)


_CONTENT_LENGTH = b"content-length"


class LimitedRequest(Request[Any, Any, Any]):
    """litestar's request, whose JSON body is checked for depth before litestar decodes
    it: the one place every service's handlers get their bodies decoded.

    It also reads the body the short way, with litestar's limits and errors: the
    content-length straight from the scope (litestar parses every header into a
    multidict to find it) and the body's chunks in one loop (litestar's async generator
    costs a frame per chunk). About 8 us of a placement's CPU (docs/benchmarks.md,
    session 10)."""

    @property
    def content_length(self) -> int | None:
        if self._content_length is not Empty:
            return self._content_length
        raw = next((v for k, v in self.scope["headers"] if k.lower() == _CONTENT_LENGTH), None)
        try:
            self._content_length = int(raw) if raw is not None else None
        except ValueError:
            raise ClientException(f"Invalid content-length: {raw.decode('latin-1')!r}") from None
        return self._content_length

    async def body(self) -> bytes:
        if self._body is Empty:
            if (body := self._connection_state.body) is not Empty:
                self._body = body
            else:
                self._body = self._connection_state.body = await self._read_body()
        return self._body

    async def _read_body(self) -> bytes:
        if not self.is_connected:
            raise InternalServerException("stream consumed")
        limit = self.route_handler.resolve_request_max_body_size() or math.inf
        announced = self.content_length
        if announced is not None and announced > limit:
            raise RequestEntityTooLarge
        chunks: list[bytes] = []
        total = 0
        while True:
            event = await self.receive()
            if event["type"] == "http.request":
                if chunk := event.get("body", b""):
                    total += len(chunk)
                    if total > limit:  # on the bytes received (the announced length may be wrong)
                        raise RequestEntityTooLarge
                    chunks.append(chunk)
                if not event.get("more_body", False):
                    break
            elif event["type"] == "http.disconnect":
                raise InternalServerException("client disconnected prematurely")
        self.is_connected = False
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def json(self) -> Any:
        if self._json is Empty and self._connection_state.json is Empty:
            check_nesting(await self.body())
        return await super().json()
