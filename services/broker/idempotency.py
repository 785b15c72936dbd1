"""``Idempotency-Key`` for ``POST /v1/requests``: same key and body → the same
response (status and body, errors included); same key, different body → 422; the
first call still running → 409. Keys live 24 h per tenant in Redis. A 5xx is not
remembered, so a retry after an outage does the work."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable

import msgspec
from redis.asyncio import Redis

from services.common.errors import BadRequest, BrokerError, Conflict, Unprocessable
from services.common.keys import Keys

TTL_S = 86_400


class Stored(msgspec.Struct, kw_only=True):
    body: str
    state: str = "pending"
    status: int = 0
    response: bytes = b""
    error: dict = {}


async def once(redis: Redis, keys: Keys, tenant: str, key: str | None, body: bytes,
               run: Callable[[], Awaitable[tuple[int, bytes]]]) -> tuple[int, bytes]:
    if key is None:
        return await run()
    if not key or len(key) > 255:
        raise BadRequest("Idempotency-Key must be 1-255 characters")
    slot = keys.idempotency(tenant, hashlib.sha256(key.encode()).hexdigest())
    digest = hashlib.sha256(body).hexdigest()
    claimed = await redis.set(slot, msgspec.json.encode(Stored(body=digest)), nx=True, ex=TTL_S)
    if not claimed:
        raw = await redis.get(slot)
        stored = msgspec.json.decode(raw, type=Stored) if raw else None
        if stored is None:  # expired between the two calls: treat as new
            return await once(redis, keys, tenant, key, body, run)
        if stored.body != digest:
            raise Unprocessable("Idempotency-Key was used before with a different body")
        if stored.state == "pending":
            raise Conflict("a request with this Idempotency-Key is still being processed; retry shortly")
        if stored.error:
            exc = BrokerError(stored.error.get("detail", ""), **stored.error.get("extra", {}))
            exc.status, exc.title = stored.status, stored.error.get("title", "error")
            raise exc
        return stored.status, stored.response
    try:
        status, response = await run()
    except BrokerError as exc:
        if exc.status >= 500:
            await redis.delete(slot)
        else:
            error = {"detail": exc.detail, "title": exc.title, "extra": exc.extra}
            await redis.set(slot, msgspec.json.encode(Stored(body=digest, state="done", status=exc.status,
                                                             error=error)), ex=TTL_S)
        raise
    except BaseException:
        await redis.delete(slot)
        raise
    await redis.set(slot, msgspec.json.encode(Stored(body=digest, state="done", status=status, response=response)),
                    ex=TTL_S)
    return status, response
