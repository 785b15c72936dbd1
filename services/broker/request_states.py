"""The request lifecycle in Redis (docs/lifecycle.md, "Request"): each transition one
compare-and-set script in ``lua/``, named as in the table. A request is one hash:
``state`` (the authority), ``updated_at``, ``record`` (the rest, as JSON; its own state
field is not read back) and, while a queue pass places it, ``claim`` and ``claim_until``.

Only the request's own key is touched by a script (on Redis Cluster the queue's sorted
set lives in another slot): the queue is an index, and a pass drops from it whatever
is no longer queued."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources

import msgspec
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from services.common.keys import Keys
from services.common.redis_conn import is_cluster

from .leases import Lookup, lookups_into
from .records import RequestRecord

# bounds how long one ``record_into`` call holds Redis (64 records: 0.26 ms median, 1.2 ms p99
# on the loaded machine; 32: 0.11 / 0.30 ms)
RECORDS_PER_CALL = 32
CLAIM_S = 60.0  # a claim outlives any live placement (a durable grant retries for at most 30 s)

_record = msgspec.json.Decoder(RequestRecord)


def _lua(name: str) -> str:
    return resources.files("services.broker.lua").joinpath(name).read_text()


def _s(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _fields(record: RequestRecord) -> dict[str, bytes | str]:
    return {"state": record.state, "updated_at": record.updated_at.isoformat(),
            "record": msgspec.json.encode(record)}


def decode(raw_record: object, state: object, updated_at: object) -> RequestRecord | None:
    if raw_record is None or state is None:
        return None
    record = _record.decode(raw_record)  # type: ignore[arg-type]
    record.state = _s(state)  # type: ignore[assignment]
    if updated_at is not None:
        record.updated_at = datetime.fromisoformat(_s(updated_at))
    return record


@dataclass(frozen=True, slots=True)
class Claim:
    """A queue pass holds ``request_id`` (state ``placing``) under ``token`` until it settles."""
    request_id: str
    token: str
    record: RequestRecord


@dataclass(frozen=True, slots=True)
class ReplacementClaim:
    """A failover holds ``request_id`` (state ``replacing``) for the replacement of
    ``lease_id`` under ``token`` until it settles."""
    request_id: str
    lease_id: str
    token: str
    record: RequestRecord


@dataclass(frozen=True, slots=True)
class Handled:
    """The lease's replacement was decided before (a redelivered event): what became of it."""
    outcome: dict


@dataclass(frozen=True, slots=True)
class Busy:
    """Another replacement of the request is under way (or it waits in the queue): later."""
    state: str


class Refused(Exception):
    """A transition whose from-state did not hold: ``state`` is the request's state now."""

    def __init__(self, request_id: str, state: str) -> None:
        super().__init__(f"request {request_id} is {state or 'unknown'}")
        self.request_id, self.state = request_id, state


class RequestStates:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis, self.keys = redis, keys
        self._queue = redis.register_script(_lua("queue_request.lua"))
        self._claim = redis.register_script(_lua("claim_request.lua"))
        self._settle = redis.register_script(_lua("settle_request.lua"))
        self._cancel = redis.register_script(_lua("cancel_request.lua"))
        self._record = redis.register_script(_lua("record_requests.lua"))
        self._cluster = is_cluster(redis)  # request keys live in different slots there
        self._claim_replacement = redis.register_script(_lua("claim_replacement.lua"))
        self._settle_replacement = redis.register_script(_lua("settle_replacement.lua"))

    # --- reading ---------------------------------------------------------------------------
    async def get(self, request_id: str) -> RequestRecord | None:
        return decode(*await self.redis.hmget(self.keys.request(request_id), "record", "state", "updated_at"))

    async def get_many(self, ids: list) -> list[RequestRecord]:
        if not ids:
            return []
        pipe = self.redis.pipeline(transaction=False)  # on Redis Cluster the keys span slots
        for i in ids:
            pipe.hmget(self.keys.request(_s(i)), "record", "state", "updated_at")
        return [r for r in (decode(*raw) for raw in await pipe.execute()) if r is not None]

    # --- transitions -------------------------------------------------------------------------
    def record_into(self, pipe: Pipeline, *records: RequestRecord, lookups: Sequence[Lookup] = ()) -> None:
        """accepted → placed | rejected: requests nobody else knows yet, each decided by
        the call that accepted it (no other transition can race it). Many records (the
        confirmations of a batch) go in one ``lua/record_requests.lua`` call per
        ``RECORDS_PER_CALL``, with ``lookups`` (index entries) in the first: one command
        each, each with a reply to read, cost the broker about 10 µs more CPU per
        placement (``bench/record_cost.py``). On Redis Cluster the keys live in different
        hash slots: a command each; so is one record without lookups. A pipeline that
        holds the script call may meet NOSCRIPT: ``scripts`` are the ones to load before
        running it again."""
        if self._cluster or len(records) <= 1 and not lookups:
            for record in records:
                pipe.hset(self.keys.request(record.request_id), mapping=_fields(record))
            lookups_into(pipe, lookups)
            return
        for i in range(0, max(len(records), 1), RECORDS_PER_CALL):
            chunk = records[i:i + RECORDS_PER_CALL]
            extra = lookups if i == 0 else ()
            if not chunk and not extra:
                return
            keys: list[str] = [self.keys.request(record.request_id) for record in chunk]
            args: list[object] = [len(chunk)]
            for record in chunk:
                args += [record.state, record.updated_at.isoformat(), msgspec.json.encode(record)]
            for key, kind, pairs in extra:
                keys.append(key)
                args += [kind, len(pairs) // 2, *pairs]
            # the raw command, not the script object: that would add a SCRIPT EXISTS round trip
            pipe.execute_command("EVALSHA", self._record.sha, len(keys), *keys, *args)

    @property
    def scripts(self) -> tuple:
        """The scripts ``record_into`` may put in a pipeline (loaded after a NOSCRIPT)."""
        return (self._record,)

    async def queue(self, record: RequestRecord) -> bool:
        """accepted → queued, create-only: False if the request has a record already."""
        raw = await self._queue(keys=[self.keys.request(record.request_id)],
                                args=[msgspec.json.encode(record), record.updated_at.isoformat()])
        return int(raw[0]) == 1

    async def claim(self, request_id: str, now: float | None = None) -> Claim | None:
        """queued → placing; None when the request is not queued (cancelled, claimed by
        another pass, done)."""
        now = time.time() if now is None else now
        token = uuid.uuid4().hex
        raw = await self._claim(keys=[self.keys.request(request_id)], args=[token, now, now + CLAIM_S])
        if int(raw[0]) != 1:
            return None
        record = _record.decode(raw[1])
        record.state = "placing"
        return Claim(request_id, token, record)

    async def _settle_to(self, claim: Claim, state: str, record: RequestRecord) -> None:
        record.state = state  # type: ignore[assignment]
        raw = await self._settle(keys=[self.keys.request(claim.request_id)],
                                 args=[claim.token, state, record.updated_at.isoformat(),
                                       msgspec.json.encode(record)])
        if int(raw[0]) != 1:
            raise Refused(claim.request_id, _s(raw[1]))

    async def place(self, claim: Claim, record: RequestRecord) -> None:
        """placing → placed (with its lease ids); ``Refused`` if the claim was taken over."""
        await self._settle_to(claim, "placed", record)

    async def requeue(self, claim: Claim, record: RequestRecord) -> None:
        """placing → queued: nothing fits now (the reasons say why); back in line."""
        await self._settle_to(claim, "queued", record)

    async def reject(self, claim: Claim, record: RequestRecord) -> None:
        """placing → rejected: it can no longer be placed at all."""
        await self._settle_to(claim, "rejected", record)

    async def _leave_queue(self, request_id: str, state: str, updated_at: datetime,
                           record: RequestRecord | None) -> None:
        raw = await self._cancel(keys=[self.keys.request(request_id)],
                                 args=[state, updated_at.isoformat(), msgspec.json.encode(record) if record else "",
                                       time.time()])
        if int(raw[0]) != 1:
            raise Refused(request_id, _s(raw[1]))

    async def cancel(self, request_id: str, now: datetime) -> None:
        """queued → cancelled (or from an abandoned claim); ``Refused`` (with the state now)
        from any other state."""
        await self._leave_queue(request_id, "cancelled", now, None)

    async def expire(self, record: RequestRecord, now: datetime) -> None:
        """queued → expired: its deadline passed while it waited."""
        record.updated_at = now
        await self._leave_queue(record.request_id, "expired", now, record)

    # --- failover (docs/lifecycle.md, "Request": replacing) -----------------------------------
    async def claim_replacement(self, request_id: str, lease_id: str, now: float | None = None,
                                claim_s: float = CLAIM_S) -> ReplacementClaim | Handled | Busy | None:
        """placed → replacing for ``lease_id``; ``Handled`` if that lease's outcome is
        recorded already, ``Busy`` if the request is held by another replacement (or
        queued), None if the request does not hold that lease (nothing to replace)."""
        now = time.time() if now is None else now
        token = uuid.uuid4().hex
        code, payload = await self._claim_replacement(keys=[self.keys.request(request_id)],
                                                      args=[lease_id, token, now, now + claim_s])
        code = int(code)
        if code == 1:
            record = _record.decode(payload)
            record.state = "replacing"
            return ReplacementClaim(request_id, lease_id, token, record)
        if code == 2:
            return Handled(msgspec.json.decode(payload))
        if code == 0:
            return Busy(_s(payload))
        return None

    async def settle_replacement(self, claim: ReplacementClaim, state: str, record: RequestRecord | None,
                                 outcome: dict | None) -> None:
        """replacing → ``state`` (placed, queued, failed) with ``outcome`` recorded for the
        lease; ``outcome`` None gives the claim up undecided (state placed, record kept).
        ``Refused`` if the claim was taken over."""
        if record is not None:
            record.state = state  # type: ignore[assignment]
        updated = (record.updated_at if record is not None else datetime.now(UTC)).isoformat()
        raw = await self._settle_replacement(
            keys=[self.keys.request(claim.request_id)],
            args=[claim.token, claim.lease_id, state, updated,
                  msgspec.json.encode(record) if record is not None else "",
                  msgspec.json.encode(outcome) if outcome is not None else ""])
        if int(raw[0]) != 1:
            raise Refused(claim.request_id, _s(raw[1]))
