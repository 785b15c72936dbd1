"""``Idempotency-Key`` for ``POST /v1/requests``: same key and body → the same answer
(status and body, 4xx included); same key, other body → 422. A key is a state machine
(docs/lifecycle.md, "Idempotency key"), in the manner of Stripe's keys with recovery
points: its record is written before any side effect and names what the placement is
about to grant, so that a retry after a crash resumes (answers the grants that were
made) or rolls back (ends them, nothing billed) and places afresh — never "in progress"
for longer than a placement's deadline, never a second grant.

Two copies of every key: Redis (the live state: every transition is one Lua
compare-and-set, ``lua/idem_*.lua``) and a JetStream KV bucket (the durable record:
create, then update-with-revision). The bucket's revision fences the owners: a broker
that lost its claim to a recovering one (its deadline passed) cannot record an answer,
and a retry after a Redis loss finds the key there."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Protocol

import msgspec
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue
from redis.asyncio import Redis

from services.common.errors import BadRequest, BrokerError, Conflict, Unavailable, Unprocessable
from services.common.ids import new_id
from services.common.keys import Keys
from services.common.messages import LeaseInfo

log = logging.getLogger("broker")

TTL_S = 86_400
ROLLBACK_S = 0.5  # the bounded time a failed placement spends on recording its key rolled back
# a pending key is abandoned (its owner died or is rolling back) this long after the owner's
# placement deadline: the next retry recovers it
IDEMPOTENCY_MARGIN_S = 2.0
Named = list[tuple[str, str]]  # (region, lease id) of the leases a placement is about to grant


class Answer(msgspec.Struct, frozen=True, kw_only=True):
    status: int
    body: bytes = b""
    error: dict | None = None  # title, detail, extra of a 4xx

    def give(self) -> tuple[int, bytes]:
        if self.error is not None:
            exc = BrokerError(self.error.get("detail", ""), **self.error.get("extra", {}))
            exc.status, exc.title = self.status, self.error.get("title", "error")
            raise exc
        return self.status, self.body


class Durable(msgspec.Struct, kw_only=True):
    """The key's durable record (one KV entry)."""

    digest: str
    request_id: str
    state: str = "pending"  # pending | done | rolled_back
    since: float = 0.0  # unix seconds of the current owner's claim
    leases: Named = []
    answer: Answer | None = None


_answer = msgspec.json.Decoder(Answer)
_durable = msgspec.json.Decoder(Durable)
_named = msgspec.json.Decoder(Named)
_encode = msgspec.json.encode


class Grants(Protocol):
    """What a key's recovery asks of the live leases (``key_grants.LeaseGrants``)."""

    async def live(self, named: Named) -> list[LeaseInfo] | None:
        """The named leases if every one is live and confirmed; None otherwise."""

    async def roll_back(self, named: Named) -> None:
        """End every named lease still live, in the durable record at its grant time."""

    async def queued(self, request_id: str) -> tuple[int, bytes] | None:
        """The 202 of a request that went to the queue (it names no leases), if it did."""

    async def withdraw(self, request_id: str) -> None:
        """Take a queued request out of the queue and the record (its client heard an error)."""


Place = Callable[[str], Awaitable[tuple[int, bytes]]]  # request id -> (status, body)
Adopt = Callable[[str, list[LeaseInfo]], Awaitable[tuple[int, bytes]]]  # request id, its leases -> 201


@dataclass
class Claim:
    """One owner's hold on a pending key: its token, the request id it places under,
    the leases it has named, and the KV revision its next write must find."""

    keyring: Keyring
    slot: str
    entry: str
    digest: str
    token: str
    request_id: str
    since: float
    revision: int = 0
    named: Named = field(default_factory=list)
    kv_ok: bool = True  # False when the durable record already holds the answer (nothing more to write there)

    def durable(self, state: str = "pending", answer: Answer | None = None) -> bytes:
        return _encode(Durable(digest=self.digest, request_id=self.request_id, state=state, since=self.since,
                               leases=self.named, answer=answer))

    async def name(self, leases: Sequence[LeaseInfo]) -> None:
        """Recovery point before a grant: the key names the leases about to be taken.
        Refused (503) when the claim was taken over: the new owner decides. An attempt's
        names replace the last one's: a reservation refused took nothing, and one that
        failed after its grant was published fails the whole placement."""
        named = [(lease.region, lease.lease_id) for lease in leases]
        if not await self.keyring.name(self, named):
            raise taken_over()


def taken_over() -> Unavailable:
    return Unavailable("this Idempotency-Key was taken over by a retry (this placement outlived its deadline); "
                       "retry to get its answer", retry_after=1)


_current: contextvars.ContextVar[Claim | None] = contextvars.ContextVar("idempotency_claim", default=None)


async def before_grant(leases: Sequence[LeaseInfo]) -> None:
    """Called by the placement right before it reserves ``leases``: the idempotency key
    it runs under (if any) names them first."""
    claim = _current.get()
    if claim is not None and leases and leases[0].request_id == claim.request_id:
        await claim.name(leases)


def _lua(name: str) -> str:
    return resources.files("services.broker.lua").joinpath(name).read_text()


def _s(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class Keyring:
    """The idempotency keys of one deployment. ``kv`` None: no durable copy (tests of
    the Redis scripts alone)."""

    def __init__(self, redis: Redis, keys: Keys, kv: KeyValue | None, grants: Grants,
                 stale_s: float, clock: Callable[[], float] = time.time) -> None:
        self.redis, self.keys, self.kv, self.grants = redis, keys, kv, grants
        self.stale_s, self.clock = stale_s, clock
        self._claim = redis.register_script(_lua("idem_claim.lua"))
        self._name = redis.register_script(_lua("idem_name.lua"))
        self._finish = redis.register_script(_lua("idem_finish.lua"))

    @staticmethod
    async def open_bucket(nc: NATS, name: str, replicas: int = 1, timeout: float = 2.0) -> KeyValue:
        """The bucket of durable key records (entries live as long as the keys: 24 h)."""
        js = nc.jetstream(timeout=timeout)
        try:
            return await js.key_value(name)
        except nats.js.errors.BucketNotFoundError:
            pass
        with contextlib.suppress(nats.js.errors.APIError):  # another replica created it meanwhile
            return await js.create_key_value(KeyValueConfig(bucket=name, storage=StorageType.FILE, history=1,
                                                            ttl=TTL_S, replicas=replicas))
        return await js.key_value(name)

    # --- the transitions (one compare-and-set each) -----------------------------------------
    async def claim(self, slot: str, digest: str, request_id: str, token: str) -> list:
        raw = await self._claim(keys=[slot], args=[digest, request_id, token, int(self.clock() * 1000),
                                                   int(self.stale_s * 1000), TTL_S])
        return [_s(raw[0]), *raw[1:]]

    async def name(self, claim: Claim, named: Named) -> bool:
        if not int(await self._name(keys=[claim.slot], args=[claim.token, claim.request_id, _encode(named)])):
            return False
        claim.named = named
        if self.kv is not None and claim.kv_ok:
            try:
                claim.revision = await self.kv.update(claim.entry, claim.durable(), last=claim.revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                return False  # a recovering retry took the key over in the durable record
        return True

    async def finish(self, claim: Claim, answer: Answer | None) -> bool:
        """pending → done (``answer``) or → rolled_back (None). The durable record first:
        its revision decides who owns the key; Redis follows (and is written over when it
        lost the key meanwhile)."""
        state = "done" if answer is not None else "rolled_back"
        durable = self.kv is not None and claim.kv_ok
        if durable:
            try:
                claim.revision = await self.kv.update(claim.entry, claim.durable(state, answer),  # type: ignore[union-attr]
                                                      last=claim.revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                return False
        restore = "restore" if durable and answer is not None else ""
        done = int(await self._finish(keys=[claim.slot], args=[
            claim.token, state, _encode(answer) if answer is not None else b"", TTL_S, claim.digest,
            claim.request_id, restore]))
        return durable or bool(done)

    # --- one idempotent placement ------------------------------------------------------------
    def new_claim(self, tenant: str, key: str, body: bytes) -> Claim:
        """A claim about to be made: where the key lives (Redis, KV), its body's digest,
        a fresh token and request id."""
        if not key or len(key) > 255:
            raise BadRequest("Idempotency-Key must be 1-255 characters")
        key_hash = hashlib.sha256(key.encode()).hexdigest()
        return Claim(self, self.keys.idempotency(tenant, key_hash),
                     f"{hashlib.sha256(tenant.encode()).hexdigest()[:16]}.{key_hash}",
                     hashlib.sha256(body).hexdigest(), new_id("claim"), new_id("req"), self.clock())

    async def run(self, tenant: str, key: str, body: bytes, place: Place, adopt: Adopt) -> tuple[int, bytes]:
        claim = self.new_claim(tenant, key, body)
        got = await self.claim(claim.slot, claim.digest, claim.request_id, claim.token)
        kind = got[0]
        if kind == "mismatch":
            raise Unprocessable("Idempotency-Key was used before with a different body")
        if kind == "done":
            return _answer.decode(got[1]).give()
        if kind == "busy":
            raise self._busy(int(got[1]) / 1000)
        previous: tuple[str, Named] | None = None
        if kind == "stale":  # until recovered, both copies go on naming what the dead owner named
            previous = (_s(got[2]), [tuple(n) for n in _named.decode(got[3])])  # type: ignore[misc]
            claim.request_id, claim.named = previous[0], list(previous[1])
        found = await self._durable_claim(claim, previous)
        if isinstance(found, Answer):
            return found.give()
        if found is not None:
            resumed = await self._recover(claim, *found, adopt)
            if resumed is not None:
                return resumed
        return await self._place(claim, place)

    def _busy(self, left_s: float) -> Conflict:
        wait = max(1, round(left_s + 0.5))
        return Conflict(f"a request with this Idempotency-Key is being processed; its answer (or its rollback) "
                        f"is certain within {wait} s: retry then", retry_after=wait)

    async def _durable_claim(self, claim: Claim, previous: tuple[str, Named] | None
                             ) -> Answer | tuple[str, Named] | None:
        """Write the claim to the durable record before any side effect. An entry already
        there (Redis lost the key, or its owner died between the two writes) is the
        truth: its answer is given, a live owner's claim is waited for, an abandoned one
        is taken over. Returns the answer, or what an abandoned owner had named (request
        id, leases) for ``_recover``, or None (a fresh claim)."""
        if self.kv is None:
            return previous
        try:
            claim.revision = await self.kv.create(claim.entry, claim.durable())
            return previous
        except nats.js.errors.KeyWrongLastSequenceError:
            pass
        except BaseException:
            await self._release(claim)
            raise
        entry = await self.kv.get(claim.entry)
        found = _durable.decode(entry.value)
        if found.digest != claim.digest:
            await self._release(claim)
            raise Unprocessable("Idempotency-Key was used before with a different body")
        if found.state == "done" and found.answer is not None:
            claim.request_id, claim.kv_ok = found.request_id, False
            await self._finish(keys=[claim.slot], args=[claim.token, "done", _encode(found.answer), TTL_S,
                                                        claim.digest, found.request_id, "restore"])
            return found.answer
        if found.state == "pending" and previous is None and self.clock() - found.since < self.stale_s:
            await self._release(claim)
            raise self._busy(self.stale_s - (self.clock() - found.since))
        if found.state == "pending":  # abandoned: what either copy named stays named until recovered
            named = list(dict.fromkeys([*(previous[1] if previous else []), *(tuple(n) for n in found.leases)]))
            previous = (found.request_id, named)  # type: ignore[assignment]
            claim.request_id, claim.named = found.request_id, named  # type: ignore[assignment]
            await self._name(keys=[claim.slot], args=[claim.token, claim.request_id, _encode(named)])
        try:  # taken over, fenced by the revision
            claim.revision = await self.kv.update(claim.entry, claim.durable(), last=entry.revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            await self._release(claim)
            raise self._busy(self.stale_s) from None
        return previous

    async def _recover(self, claim: Claim, request_id: str, named: Named, adopt: Adopt) -> tuple[int, bytes] | None:
        """The previous owner is past its deadline: answer what it granted if all of it is
        live and confirmed (resume), else end whatever of it is live (roll back). A
        placement that named nothing may have queued its request: that is its answer."""
        if not named and request_id:
            queued = await self.grants.queued(request_id)
            if queued is not None:
                claim.request_id = request_id
                if not await self.finish(claim, Answer(status=queued[0], body=queued[1])):
                    raise taken_over()
                return queued
        if named:
            claim.request_id, claim.named = request_id, named
            leases = await self.grants.live(named)
            if leases is not None:
                # the request id the leases were granted under (a copy may name a later one)
                claim.request_id = request_id = leases[0].request_id
                status, body = await adopt(request_id, leases)
                if not await self.finish(claim, Answer(status=status, body=body)):
                    raise taken_over()
                log.warning("idempotent request %s resumed after its broker's deadline: %d leases answered",
                            request_id, len(leases))
                return status, body
            await self.grants.roll_back(named)
            log.warning("idempotent request %s rolled back after its broker's deadline", request_id)
        claim.named = []
        claim.request_id = new_id("req")
        if not await self.name(claim, []):
            raise taken_over()
        return None

    async def _place(self, claim: Claim, place: Place) -> tuple[int, bytes]:
        token = _current.set(claim)
        try:
            status, body = await place(claim.request_id)
        except BrokerError as exc:
            if exc.status >= 500:
                await self._roll_back(claim)
                raise
            error = {"detail": exc.detail, "title": exc.title, "extra": exc.extra}
            if not await self.finish(claim, Answer(status=exc.status, error=error)):
                raise taken_over() from exc
            raise
        except BaseException:
            await self._roll_back(claim)
            raise
        finally:
            _current.reset(token)
        before = claim.revision
        try:
            recorded = await self.finish(claim, Answer(status=status, body=body))
        except Exception:
            if claim.revision != before:  # the durable record has the answer; Redis catches up on a retry
                return status, body
            return await self._unrecorded(claim)
        if not recorded:
            return await self._superseded(claim)
        return status, body

    async def _unrecorded(self, claim: Claim) -> tuple[int, bytes]:
        """Recording the answer failed (a store did not answer) and it may have got there
        all the same. Its client must not hear an error about a grant that stands, so a
        rollback is recorded at the same revision: it succeeds only if the answer did not
        get there (then what was granted ends, billed nothing, and 503), and is refused if
        it did (then that answer is given). If neither store answers, the key stays pending
        and the next retry, once it is stale, resumes or rolls back."""
        before = claim.revision
        try:
            rolled_back = await asyncio.wait_for(self.finish(claim, None), ROLLBACK_S)
        except Exception as exc:  # noqa: BLE001 - left to the next retry, unless the record took the rollback
            if claim.revision != before:
                rolled_back = True
            else:
                raise Unavailable("the answer could not be recorded (the event store or the live state store did "
                                  "not answer): retry with the same Idempotency-Key to get it", retry_after=1) from exc
        if not rolled_back:
            return await self._superseded(claim)
        if claim.named:
            await self.grants.roll_back(claim.named)
        else:
            await self.grants.withdraw(claim.request_id)
        raise Unavailable("the answer could not be recorded, so the placement was undone; nothing was granted: "
                          "retry", retry_after=1)

    async def _superseded(self, claim: Claim) -> tuple[int, bytes]:
        """This placement outlived its deadline and a retry took the key over. While the
        key still names this placement's request id, the new owner is deciding about its
        leases (it answers them if they are live, or ends them). Once it names another
        request id (or answered another), these leases were not taken: they end here.
        If it answered them, that answer is this one."""
        found = await self._current(claim)
        if found is not None and found.request_id == claim.request_id:
            if found.state == "done" and found.answer is not None:
                return found.answer.give()
        elif claim.named:
            await self.grants.roll_back(claim.named)
        raise taken_over()

    async def _current(self, claim: Claim) -> Durable | None:
        """The key as its durable record (or, without one, Redis) has it now."""
        if self.kv is not None:
            try:
                return _durable.decode((await self.kv.get(claim.entry)).value)
            except nats.js.errors.KeyNotFoundError:
                return None
        state, request_id, answer = await self.redis.hmget(claim.slot, "state", "request_id", "answer")
        if state is None:
            return None
        return Durable(digest=claim.digest, request_id=_s(request_id), state=_s(state),
                       answer=_answer.decode(answer) if answer else None)

    async def _roll_back(self, claim: Claim) -> None:
        """The placement failed (5xx, its deadline, a crash of this task): what it named is
        ended, the key goes back to claimable. Bounded; what does not happen in time is
        recovered by the next retry once the key is stale."""
        async def undo() -> None:
            if claim.named:
                await self.grants.roll_back(claim.named)
            await self.finish(claim, None)

        try:
            await asyncio.wait_for(asyncio.shield(undo()), ROLLBACK_S)
        except Exception as exc:  # noqa: BLE001 - the stale claim is recovered by a retry
            log.warning("rollback of idempotent request %s left to its next retry (%s)", claim.request_id,
                        type(exc).__name__)

    async def _release(self, claim: Claim) -> None:
        """Give up a claim that made no side effect (Redis side only)."""
        with contextlib.suppress(Exception):
            await self._finish(keys=[claim.slot], args=[claim.token, "rolled_back", b"", TTL_S, claim.digest,
                                                        claim.request_id, ""])
