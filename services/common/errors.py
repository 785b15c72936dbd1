"""Error hierarchy shared by the services' transports.

Domain code raises these; each transport translates them in one place (problem
details over HTTP). ``status`` is the HTTP status the error maps to.
"""

from __future__ import annotations

from typing import Any


class BrokerError(Exception):
    status = 500
    title = "internal error"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class BadRequest(BrokerError):
    status = 400
    title = "bad request"


class Unauthorized(BrokerError):
    status = 401
    title = "unauthorized"


class Forbidden(BrokerError):
    status = 403
    title = "forbidden"


class NotFound(BrokerError):
    status = 404
    title = "not found"


class Conflict(BrokerError):
    status = 409
    title = "conflict"


class Unprocessable(BrokerError):
    status = 422
    title = "unprocessable"


class Unavailable(BrokerError):
    """A passing condition (a dependency restarting, state being rebuilt, the service
    busy): every 503 tells the client when to retry (``Retry-After``, default 1 s)."""

    status = 503
    title = "unavailable"


class Busy(Unavailable):
    """Working at capacity (docs/overload.md), not broken: retry after ``retry_after`` seconds."""

    title = "busy"

    def __init__(self, detail: str, retry_after: int = 1, **extra: Any) -> None:
        super().__init__(detail, retry_after=retry_after, **extra)


class TooManyRequests(BrokerError):
    """Over a key's rate limit; ``retry_after`` (seconds) becomes the Retry-After header."""

    status = 429
    title = "too many requests"

    def __init__(self, detail: str, retry_after: int, **extra: Any) -> None:
        super().__init__(detail, retry_after=retry_after, **extra)
        self.retry_after = retry_after
