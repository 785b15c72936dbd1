"""The durable ledger: a JetStream stream of entries, appended with deterministic ids
(``Nats-Msg-Id``) so that appending an entry twice is a no-op, and followed by every
replica into its in-memory ``Aggregate``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime

import msgspec
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig
from nats.js.errors import APIError, NotFoundError

from .aggregate import Aggregate
from .model import LedgerEntry, LedgerRecord, PeriodsClosed
from .settings import MeterNames, MeterSettings

log = logging.getLogger("meter.ledger")

PUBLISH_TIMEOUT_S = 10.0
_encoder = msgspec.json.Encoder(decimal_format="string")
_record = msgspec.json.Decoder(LedgerRecord)


def encode(record: msgspec.Struct) -> bytes:
    return _encoder.encode(record)


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    try:
        await js.stream_info(config.name)
    except NotFoundError:
        try:
            await js.add_stream(config)
        except APIError as exc:  # another replica created it first
            if exc.err_code != 10058:
                raise
    else:
        await js.update_stream(config)


async def ensure_ledger(js: JetStreamContext, names: MeterNames, ms: MeterSettings, replicas: int = 1) -> None:
    await ensure_stream(js, StreamConfig(
        name=names.ledger_stream, subjects=[names.ledger_subjects], storage=StorageType.FILE,
        duplicate_window=ms.ledger_dup_window_s, num_replicas=replicas, allow_direct=True))
    await ensure_stream(js, StreamConfig(
        name=names.dlq_stream, subjects=[names.dlq], storage=StorageType.FILE, duplicate_window=86400.0,
        num_replicas=replicas, allow_direct=True))


async def publish_all(js: JetStreamContext, items: Sequence[tuple[str, bytes, dict[str, str]]]) -> list[int]:
    """Publish many messages concurrently (pipelined: one round trip for all) and wait for
    every ack. Returns the stream sequences; raises if any publish failed. (Not
    ``publish_async``: nats-py raises a server's error reply inside its reply handler, so
    the future of a refused publish never completes.)"""
    if len(items) == 1:
        subject, data, headers = items[0]
        return [(await js.publish(subject, data, timeout=PUBLISH_TIMEOUT_S, headers=headers)).seq]
    acks = await asyncio.gather(*(js.publish(subject, data, timeout=PUBLISH_TIMEOUT_S, headers=headers)
                                  for subject, data, headers in items))
    return [ack.seq for ack in acks]


class Ledger:
    """Append side and follow side of the ledger stream."""

    def __init__(self, js: JetStreamContext, names: MeterNames, aggregate: Aggregate | None = None) -> None:
        self.js, self.names = js, names
        self.aggregate = aggregate or Aggregate()
        self.ready = asyncio.Event()
        self.target_seq = 0  # the stream's last sequence when following started
        self.on_entries: Callable[[set[str]], None] | None = None  # tenants that got entries
        self.on_closed: Callable[[list[str], PeriodsClosed], Awaitable[None]] | None = None
        self._task: asyncio.Task | None = None
        self._advanced = asyncio.Event()

    # --- appending ----------------------------------------------------------------------------
    async def append(self, entries: Sequence[LedgerEntry]) -> None:
        """Durably append; an entry whose id was appended before (within the duplicate
        window) is dropped by JetStream."""
        if entries:
            await publish_all(self.js, [(self.names.ledger(e.tenant), encode(e), {"Nats-Msg-Id": e.id})
                                        for e in entries])

    async def close_through(self, period: str, at: datetime) -> None:
        marker = PeriodsClosed(id=f"close.{period}", at=at, through=period)
        await self.js.publish(self.names.ledger_control, encode(marker), headers={"Nats-Msg-Id": marker.id})

    # --- following ----------------------------------------------------------------------------
    async def start(self) -> None:
        info = await self.js.stream_info(self.names.ledger_stream)
        self.target_seq = info.state.last_seq
        if self.target_seq == 0 or info.state.messages == 0:
            self.ready.set()
        self._task = asyncio.create_task(self._follow())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def progress(self) -> tuple[int, int]:
        return self.aggregate.applied_seq, self.target_seq

    async def caught_up(self, timeout: float = 10.0) -> bool:
        """Wait until everything in the stream now has been folded."""
        info = await self.js.stream_info(self.names.ledger_stream)
        target = info.state.last_seq
        deadline = asyncio.get_running_loop().time() + timeout
        while self.aggregate.applied_seq < target:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return False
            self._advanced.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._advanced.wait(), min(remaining, 0.5))
        return True

    async def _follow(self) -> None:
        """An ephemeral, unacknowledged pull consumer from the next unfolded sequence;
        recreated from where it left off after any error (NATS restart, consumer lost)."""
        while True:
            sub = None
            try:
                start = self.aggregate.applied_seq + 1
                sub = await self.js.pull_subscribe(
                    self.names.ledger_subjects, stream=self.names.ledger_stream,
                    config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start,
                                          ack_policy=AckPolicy.NONE, inactive_threshold=60.0,
                                          max_waiting=1))
                while True:
                    try:
                        msgs = await sub.fetch(2000, timeout=1.0)
                    except TimeoutError:
                        if not self.ready.is_set() and self.aggregate.applied_seq >= self.target_seq:
                            self.ready.set()
                        continue
                    await self._fold(msgs)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep following through a NATS blip
                log.warning("ledger follower restarting after %s", exc)
                await asyncio.sleep(0.5)
            finally:
                if sub is not None:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()

    async def _fold(self, msgs: list) -> None:
        agg = self.aggregate
        tenants: set[str] = set()
        for msg in msgs:
            seq = msg.metadata.sequence.stream
            try:
                record = _record.decode(msg.data)
            except msgspec.DecodeError as exc:  # never written by the meter; keep going
                log.error("ledger message %d undecodable (%s): skipped", seq, exc)
                agg.applied_seq = max(agg.applied_seq, seq)
                continue
            closed = agg.apply(seq, record)
            if isinstance(record, LedgerEntry):
                tenants.add(record.tenant)
            elif closed and self.on_closed is not None:
                await self.on_closed(closed, record)
        if tenants and self.on_entries is not None:
            self.on_entries(tenants)
        if not self.ready.is_set() and agg.applied_seq >= self.target_seq:
            self.ready.set()
        self._advanced.set()
