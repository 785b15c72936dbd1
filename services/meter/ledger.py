"""The durable ledger: a JetStream stream of entries, each appended create-only on a
subject of its own named by its deterministic id, so that appending an entry twice is a
no-op however much later the second append comes; followed by every replica into its
in-memory ``Aggregate``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime

import msgspec
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig

from services.common.jetstream import Publisher, Puller, is_wrong_last_sequence, stream_seq
from services.common.lifecycle import forever, stop_tasks, wait_event
from services.common.nats_conn import ensure_stream  # idempotent, safe for replicas starting at once
from services.common.settings import Settings
from services.common.subjects import MeterNames

from .aggregate import Aggregate
from .model import FoldedEntry, FoldedRecord, LedgerRecord, PeriodsClosed

log = logging.getLogger("meter.ledger")

_encoder = msgspec.json.Encoder(decimal_format="string")
_folded = msgspec.json.Decoder(FoldedRecord)


def encode(record: msgspec.Struct) -> bytes:
    return _encoder.encode(record)


async def ensure_ledger(js: JetStreamContext, names: MeterNames, settings: Settings, replicas: int = 1) -> None:
    await ensure_stream(js, StreamConfig(
        name=names.ledger_stream, subjects=[names.ledger_subjects], storage=StorageType.FILE,
        duplicate_window=settings.ledger_dup_window_s, num_replicas=replicas, allow_direct=True))
    await ensure_stream(js, StreamConfig(
        name=names.dlq_stream, subjects=[names.dlq], storage=StorageType.FILE, duplicate_window=86400.0,
        num_replicas=replicas, allow_direct=True))


class Ledger:
    """Append side and follow side of the ledger stream."""

    def __init__(self, nc: NATS, js: JetStreamContext, names: MeterNames, publisher: Publisher,
                 aggregate: Aggregate | None = None) -> None:
        self.nc, self.js, self.names, self.publisher = nc, js, names, publisher
        self.aggregate = aggregate or Aggregate()
        self.ready = asyncio.Event()
        self.target_seq = 0  # the stream's last sequence when following started
        self.on_entries: Callable[[list[FoldedEntry]], None] | None = None  # entries just folded
        self.on_closed: Callable[[list[str], PeriodsClosed], Awaitable[None]] | None = None
        self._task: asyncio.Task | None = None
        self._advanced = asyncio.Event()
        self._stopping = False

    # --- appending ----------------------------------------------------------------------------
    async def append(self, entries: Sequence[LedgerRecord]) -> None:
        """Durably append; an entry whose id was appended before is not appended again.

        Each entry goes to a subject of its own (``MeterNames.ledger``) with
        ``Nats-Expected-Last-Subject-Sequence: 0``: JetStream stores it only if that
        subject holds nothing, at any age. (``Nats-Msg-Id`` alone de-duplicates within the
        stream's duplicate window only: a dead letter retried after it would be billed
        twice.) A repeat within the window is acknowledged as a duplicate, a later one is
        refused as "wrong last sequence": both mean the entry is in the ledger."""
        if not entries:
            return
        futures = [await self.publisher.send(self.names.ledger(e.tenant, e.id), encode(e),
                                             {"Nats-Msg-Id": e.id, "Nats-Expected-Last-Subject-Sequence": "0"})
                   for e in entries]
        for result in await self.publisher.settle(futures):
            if isinstance(result, Exception) and not is_wrong_last_sequence(result):
                raise result

    async def close_through(self, period: str, at: datetime) -> None:
        marker = PeriodsClosed(id=f"close.{period}", at=at, through=period)
        await self.js.publish(self.names.ledger_control, encode(marker), headers={"Nats-Msg-Id": marker.id})

    # --- following ----------------------------------------------------------------------------
    async def start(self) -> None:
        info = await self.js.stream_info(self.names.ledger_stream)
        self.target_seq = info.state.last_seq
        if self.target_seq == 0 or info.state.messages == 0:
            self.ready.set()
        self._task = asyncio.create_task(forever("ledger follower", self._follow, until=lambda: self._stopping,
                                                 logger=log))

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            await stop_tasks([self._task])

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
            await wait_event(self._advanced, min(remaining, 0.5))
        return True

    async def _follow(self) -> None:
        """An ephemeral, unacknowledged pull consumer from the next unfolded sequence;
        recreated (by ``forever``) from where it left off after any error (NATS restart,
        consumer lost)."""
        start = self.aggregate.applied_seq + 1
        info = await self.js.add_consumer(self.names.ledger_stream, ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start, ack_policy=AckPolicy.NONE,
            inactive_threshold=60.0, filter_subject=self.names.ledger_subjects, max_waiting=4))
        puller = Puller(self.nc, self.names.ledger_stream, info.name)
        try:
            await puller.start()
            while not self._stopping:
                msgs = await puller.fetch(2000, timeout=1.0)
                if msgs:
                    await self._fold(msgs)
                elif not self.ready.is_set() and self.aggregate.applied_seq >= self.target_seq:
                    self.ready.set()
        finally:
            with contextlib.suppress(Exception):
                await puller.stop()

    async def _fold(self, msgs: list) -> None:
        agg = self.aggregate
        entries: list[FoldedEntry] = []
        for msg in msgs:
            seq = stream_seq(msg)
            try:
                record = _folded.decode(msg.data)
            except msgspec.DecodeError as exc:  # never written by the meter; keep going
                log.error("ledger message %d undecodable (%s): skipped", seq, exc)
                agg.applied_seq = max(agg.applied_seq, seq)
                continue
            closed = agg.apply(seq, record)
            if isinstance(record, FoldedEntry):
                entries.append(record)
            elif closed and self.on_closed is not None:
                await self.on_closed(closed, record)
        if entries and self.on_entries is not None:
            self.on_entries(entries)
        if not self.ready.is_set() and agg.applied_seq >= self.target_seq:
            self.ready.set()
        self._advanced.set()
