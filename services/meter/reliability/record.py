"""The reliability record in Redis: ``record.lua`` applies a batch of allocation events to
the facts of their leases and to their pools' and providers' counters, atomically and
idempotently (one script per batch, not a command per event)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from datetime import datetime
from importlib import resources

import msgspec
from redis.asyncio import Redis

from services.common.delivery import RELIABILITY_PRIOR
from services.common.keys import Keys
from services.common.messages import (
    GRANT_EVENTS,
    AllocEvent,
    LeaseExpired,
    LeaseFailed,
    LeaseLost,
    LeasePreempted,
    LeaseReady,
    LeaseReleased,
    LeaseRevoked,
)
from services.common.reliability import READY_WINDOW

LIVE_FACTS_TTL_S = 400 * 86_400  # a reserved year is the longest lease
ENDED_FACTS_TTL_S = 7 * 86_400  # long past any redelivery of its events
# events per script call: a script holds Redis while it runs (some 20-40 us per event), so
# a batch is cut into calls short enough that placements' commands get in between
SCRIPT_EVENTS = 16
_SCRIPT = resources.files(__package__).joinpath("record.lua").read_text()
_OPEN = resources.files(__package__).joinpath("open.lua").read_text()
_CLEAR = resources.files(__package__).joinpath("clear.lua").read_text()
CLEAR_BATCH = 500  # keys per clear.lua call
_rows = msgspec.json.Encoder()
_ENDS = {LeaseFailed: "failed", LeaseLost: "lost", LeaseReleased: "end", LeaseExpired: "end",
         LeasePreempted: "end", LeaseRevoked: "end"}


# the mark while one replica clears the record and replays the stream into it
REBUILDING = "rebuilding"
REBUILD_CLAIM_MS = 120_000


class RecordLost(Exception):
    """Redis holds no record (new, or lost): the stream is replayed into it."""


def event_kind(event: AllocEvent) -> str | None:
    """The fact an event tells: ``ready``, an end (``failed``, ``lost``, ``end``), that
    the lease exists (``seen``: its grant), or nothing (None: renewals, replacements)."""
    if isinstance(event, LeaseReady):
        return "ready"
    if isinstance(event, GRANT_EVENTS):
        return "seen"
    return _ENDS.get(type(event))


def _ms(at: datetime) -> int:
    return round(at.timestamp() * 1000)


class ReliabilityRecord:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis, self.keys = redis, keys
        self._script = redis.register_script(_SCRIPT)
        self._open = redis.register_script(_OPEN)
        self._clear = redis.register_script(_CLEAR)
        self._claim = ""
        good, bad = RELIABILITY_PRIOR
        self._keys = [keys.reliability_scores(), keys.reliability_version(), keys.reliability_since()]
        self._args = [str(READY_WINDOW), str(LIVE_FACTS_TTL_S), str(ENDED_FACTS_TTL_S), repr(good), repr(bad)]

    async def start(self) -> bool:
        """Claim, clear and open the record in one go (a Redis without it); False if it is
        there or another replica is rebuilding it. The feed runs the steps itself, to move
        its consumer in between."""
        if not await self.claim():
            return False
        await self.clear()
        return await self.open()

    async def claim(self) -> bool:
        """True if this replica is to rebuild the record: Redis holds none (new, lost, or
        its mark deleted to rebuild it) and no other replica has claimed it. While the mark
        says ``rebuilding`` the script writes nothing, so no replica's write lands in a
        record being cleared, and a second replica's start cannot clear what the rebuild
        wrote. A claim whose holder dies lapses after ``REBUILD_CLAIM_MS``. A replica that
        still holds its claim (its rebuild failed half way and starts again) resumes it."""
        mark, token = self.keys.reliability_since(), f"{REBUILDING}:{uuid.uuid4().hex}"
        if await self.redis.set(mark, token, nx=True, px=REBUILD_CLAIM_MS):
            self._claim = token
            return True
        return bool(self._claim) and await self.redis.get(mark) in (self._claim, self._claim.encode())

    async def clear(self) -> None:
        """Every key of the record but its mark: the replay then counts each fact once.
        In batches, each deleted only while the claim is still this replica's (and renewing
        it): raises ``RecordLost`` once it is not, before touching another's rebuild."""
        batch: list[str | bytes] = []
        async for key in self.redis.scan_iter(match=self.keys.reliability_all(), count=1000):
            batch.append(key)
            if len(batch) >= CLEAR_BATCH:
                await self._clear_batch(batch)
                batch = []
        await self._clear_batch(batch)  # (also with none left: the claim is checked once more)

    async def _clear_batch(self, batch: list[str | bytes]) -> None:
        mark = self.keys.reliability_since()
        if await self._clear(keys=[mark, *batch], args=[self._claim, REBUILD_CLAIM_MS]) == -1:
            raise RecordLost("this replica's claim to rebuild the reliability record lapsed while it cleared "
                             "it: another replica rebuilds it")

    async def open(self) -> bool:
        """The record takes writes from now on; False if this replica's claim had lapsed
        (another may be rebuilding: this one's clearing is not trusted)."""
        return bool(await self._open(keys=[self.keys.reliability_since()], args=[self._claim, str(int(time.time()))]))

    async def apply(self, event: AllocEvent) -> bool:
        """True if the event told the record something new."""
        [changed] = await self.apply_all([event])
        return changed

    async def apply_all(self, events: Sequence[AllocEvent]) -> list[bool]:
        """Events in order, ``SCRIPT_EVENTS`` per script call (each call atomic). Renewals
        and replacements tell the record nothing and are not sent. Raises ``RecordLost`` if the record is not there
        (nothing was written)."""
        rows = [(kind, _ms(e.at), _ms(e.lease.granted_at), 1 if e.lease.delivery else 0, e.lease.lease_id,
                 e.lease.pool_id, e.lease.provider) for e in events if (kind := event_kind(e)) is not None]
        results: list[int] = []
        for i in range(0, len(rows), SCRIPT_EVENTS):
            result = await self._script(keys=self._keys, args=[self.keys.reliability_prefix(),
                                                              _rows.encode(rows[i:i + SCRIPT_EVENTS]), *self._args])
            if result == -1:
                raise RecordLost("the reliability record is not in Redis: it is rebuilt from the stream")
            results += result
        changed = iter(results)
        return [bool(next(changed)) if event_kind(e) is not None else False for e in events]
