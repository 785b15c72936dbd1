"""Pipelined JetStream publishing and pulling on nats-py's public client API
(``publish``, ``subscribe``, ``new_inbox``) and JetStream's documented wire API.

``js.publish`` costs a request (a fresh inbox token, a future, an ``asyncio.wait_for``, a
JSON parse into a dataclass) per message; ``js.publish_async`` is cheaper but nats-py
raises a server's error reply inside its reply handler, so the future of a refused publish
(a KV write that lost an optimistic-concurrency race) never completes. ``Publisher`` keeps
one wildcard reply subscription, numbers its messages, and resolves a plain future per
message, errors included (as the nats-py error ``js.publish`` would raise), with one
deadline per batch. ``AckedPublisher`` puts concurrent callers' events into such batches.
``Puller`` fetches from a pull consumer through one callback subscription;
``follow_bucket`` keeps a copy of a key-value bucket, ``bucket_entries`` and
``bucket_values`` read it once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Callable, Sequence

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError
from nats.js.kv import KeyValue

from .coalesce import Coalescer
from .lifecycle import wait_event
from .tracing import nats_headers

WRONG_LAST_SEQUENCE = (10071, 10164)  # a create-only or compare-and-set write met another value


class _Err(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _Ack(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: _Err | None = None


_ack = msgspec.json.Decoder(_Ack)


def api_error(code: int, err_code: int | None = None, description: str = "") -> APIError:
    """The error nats-py raises for this reply (``ServiceUnavailableError`` for a 503, ...)."""
    try:
        APIError.from_error({"code": code, "err_code": err_code, "description": description})
    except APIError as exc:
        return exc
    raise AssertionError("unreachable")


def is_wrong_last_sequence(exc: BaseException | None) -> bool:
    return isinstance(exc, APIError) and exc.err_code in WRONG_LAST_SEQUENCE


class Publisher:
    def __init__(self, nc: NATS, timeout: float = 10.0) -> None:
        self.nc, self.timeout = nc, timeout
        self._prefix = nc.new_inbox() + "."
        self._cut = len(self._prefix)
        self._futures: dict[str, asyncio.Future] = {}
        self._collect: dict[str, tuple[list[Msg], asyncio.Future]] = {}
        self._ids = itertools.count(1)
        self._sub = None
        self._starting: asyncio.Lock | None = None

    async def start(self) -> None:
        """Subscribe to the replies (also done by the first ``send``)."""
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._sub is None:
                self._sub = await self.nc.subscribe(self._prefix + "*", cb=self._on_reply,
                                                    pending_msgs_limit=1_000_000, pending_bytes_limit=1 << 30)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None
        for fut in self._futures.values():
            if not fut.done():
                fut.cancel()
        self._futures.clear()

    async def _on_reply(self, msg: Msg) -> None:
        token = msg.subject[self._cut:]
        if token in self._collect:
            self._collected(token, msg)
            return
        fut = self._futures.pop(token, None)
        if fut is None or fut.done():
            return
        if not msg.data:  # a status message: no stream took it
            fut.set_exception(NoStreamResponseError())
            return
        try:
            ack = _ack.decode(msg.data)
        except msgspec.DecodeError as exc:
            fut.set_exception(nats.js.errors.Error(f"unreadable publish acknowledgement: {exc}"))
            return
        if ack.error is not None:
            fut.set_exception(api_error(ack.error.code, ack.error.err_code, ack.error.description))
        else:
            fut.set_result(ack.seq)

    def _collected(self, token: str, msg: Msg) -> None:
        msgs, fut = self._collect[token]
        status = (msg.headers or {}).get("Status") if not msg.data else None
        if status is None:
            msgs.append(msg)
        elif fut.done():
            return
        elif status in ("204", "404"):  # end of batch / nothing found
            fut.set_result(msgs)
        else:
            fut.set_exception(api_error(int(status), None, str((msg.headers or {}).get("Description", ""))))

    async def request_many(self, subject: str, data: bytes) -> list[Msg]:
        """A request answered by several messages and an end-of-batch status (a batched
        direct get)."""
        if self._sub is None:
            await self.start()
        token = str(next(self._ids))
        fut = asyncio.get_running_loop().create_future()
        self._collect[token] = ([], fut)
        try:
            await self.nc.publish(subject, data, reply=self._prefix + token)
            done, _ = await asyncio.wait([fut], timeout=self.timeout)
            if not done:
                raise nats.errors.TimeoutError(f"no complete answer to {subject} within {self.timeout}s")
            return fut.result()
        finally:
            self._collect.pop(token, None)

    async def send(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> asyncio.Future:
        """Publish now; the future resolves to the stream sequence (or the error). Raises
        what stops the message being written at all (too big, connection draining)."""
        if self._sub is None:
            await self.start()
        token = str(next(self._ids))
        fut = asyncio.get_running_loop().create_future()
        self._futures[token] = fut
        try:
            await self.nc.publish(subject, data, reply=self._prefix + token, headers=headers)
        except BaseException:
            self._futures.pop(token, None)
            raise
        return fut

    async def settle(self, futures: Sequence[asyncio.Future]) -> list[int | Exception]:
        """Each result or error, once all have settled or the deadline passed (then
        ``nats.errors.TimeoutError`` for those not acknowledged)."""
        if not futures:
            return []
        _, pending = await asyncio.wait(futures, timeout=self.timeout)
        if pending:
            for fut in pending:
                fut.cancel()
            for token in [t for t, f in self._futures.items() if f.done()]:
                del self._futures[token]
        return [nats.errors.TimeoutError() if fut.cancelled() else (fut.exception() or fut.result())
                for fut in futures]

    async def wait(self, futures: Sequence[asyncio.Future]) -> list[int]:
        """Every result, or the first error (after all have settled or the deadline passed)."""
        results = await self.settle(futures)
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results  # type: ignore[return-value]

    async def publish_all(self, items: Sequence[tuple[str, bytes, dict[str, str] | None]]) -> list[int]:
        futures = [await self.send(s, d, h) for s, d, h in items]
        return await self.wait(futures)


class AckedPublisher:
    """JetStream publishes of concurrent callers, sent together (``Coalescer``) and
    acknowledged through one ``Publisher``, each caller getting its stream sequence or
    the error ``js.publish`` would raise. Callers that must ride out a failover retry
    with ``publish_durably``: the same ``Nats-Msg-Id`` makes that safe."""

    def __init__(self, nc: NATS, timeout: float = 3.0) -> None:
        self.publisher = Publisher(nc, timeout)
        self._batches: Coalescer[tuple[str, bytes, dict[str, str] | None], int] = Coalescer(self._flush)

    def publish(self, subject: str, event: msgspec.Struct) -> asyncio.Future[int]:
        """The stream sequence, to await (a future, not a coroutine: one frame less)."""
        headers = nats_headers({"Nats-Msg-Id": event.id})  # type: ignore[attr-defined]
        return self._batches.submit((subject, msgspec.json.encode(event), headers))

    async def _flush(self, items: list[tuple[str, bytes, dict[str, str] | None]]) -> list[int | Exception]:
        sent: list[asyncio.Future | Exception] = []
        for subject, payload, headers in items:
            try:
                sent.append(await self.publisher.send(subject, payload, headers))
            except Exception as exc:  # noqa: BLE001 - not written (buffer full, draining, too big): that item's error
                sent.append(exc)
        settled = iter(await self.publisher.settle([f for f in sent if not isinstance(f, Exception)]))
        return [item if isinstance(item, Exception) else next(settled) for item in sent]


def stream_seq(msg: Msg) -> int:
    """The stream sequence of a message delivered by a consumer, read straight from its
    reply subject (``msg.metadata`` builds four objects to say the same)."""
    tokens = msg.reply.split(".")
    if len(tokens) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.<pending>
        return int(tokens[5])
    return msg.metadata.sequence.stream


async def ensure_consumer(js: JetStreamContext, stream: str, config: ConsumerConfig) -> None:
    """A durable consumer that every replica of a service shares: created by whichever
    replica comes first (the others find it, or lose the race to create it)."""
    try:
        await js.consumer_info(stream, config.durable_name)
    except NotFoundError:
        try:
            await js.add_consumer(stream, config)
        except APIError as exc:  # another replica created it
            if exc.err_code not in (10148, 10013):
                raise


class Puller:
    """Fetches batches from a pull consumer through one callback subscription.

    (nats-py's ``fetch`` waits for each message with ``next_msg``, which creates a task
    named by a fresh ``uuid4`` per message: a fifth of the meter's CPU at 10,000 events/s.)
    A fetch first asks for what is there (``no_wait``); if nothing is, it waits up to
    ``timeout`` for one message, then takes what else is there.
    """

    def __init__(self, nc: NATS, stream: str, consumer: str) -> None:
        self.nc = nc
        self.subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = nc.new_inbox()
        self._buffer: list[Msg] = []
        self._want = 0
        self._status: str | None = None
        self._done = asyncio.Event()
        self._sub = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(self._inbox, cb=self._on_msg, pending_msgs_limit=1_000_000,
                                            pending_bytes_limit=1 << 30)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    async def _on_msg(self, msg: Msg) -> None:
        if not msg.data and msg.headers and "Status" in msg.headers:
            self._status = f"{msg.headers['Status']} {msg.headers.get('Description', '')}".strip()
            self._done.set()
            return
        self._buffer.append(msg)
        if len(self._buffer) >= self._want:
            self._done.set()

    async def _request(self, batch: int, expires: float | None) -> list[Msg]:
        self._buffer, self._want, self._status = [], batch, None
        self._done.clear()
        body: dict = {"batch": batch}
        if expires is None:
            body["no_wait"] = True
        else:
            body["expires"] = int(expires * 1_000_000_000)
        await self.nc.publish(self.subject, json.dumps(body).encode(), reply=self._inbox)
        await wait_event(self._done, (expires or 0) + 5.0)
        msgs, self._buffer = self._buffer, []
        status = self._status or ""
        if status.startswith("409") and "deleted" in status.lower():
            raise api_error(409, None, status)
        return msgs

    async def fetch(self, batch: int, timeout: float = 1.0) -> list[Msg]:
        msgs = await self._request(batch, None)
        if msgs:
            return msgs
        first = await self._request(1, timeout)
        if first and batch > 1:
            first += await self._request(batch - 1, None)
        return first


async def follow_bucket(js: JetStreamContext, bucket: str, on_entry: Callable[[str, bytes | None, int], object],
                        timeout: float = 30.0) -> JetStreamContext.PushSubscription:
    """Keep a process's copy of a key-value bucket current through one ordered consumer
    that lives as long as the connection (or until the returned subscription is
    unsubscribed): ``on_entry(key, value, revision)`` for every key's latest value, then
    for each change as it comes (``value`` None: the key was deleted or purged; the
    revision is the stream sequence, so a caller can ignore an older one that a key read
    or a write of its own already overtook). Returns once the copy has caught up with the
    bucket, and raises ``TimeoutError`` if it has not within ``timeout``.

    nats-py's ordered consumer re-creates itself after a gap or missed heartbeats (a NATS
    restart), from the next sequence, so a follower is a subscription, not a loop. Readers
    serve from the copy, so a read costs no consumer (opening one per read leaked them,
    issue 16)."""
    prefix = f"$KV.{bucket}."
    caught_up = asyncio.Event()

    async def on_msg(msg: Msg) -> None:
        headers = msg.headers or {}
        deleted = (headers.get("KV-Operation") in ("DEL", "PURGE")
                   or headers.get("Nats-Marker-Reason") in ("MaxAge", "Purge", "Remove"))
        on_entry(msg.subject[len(prefix):], None if deleted else msg.data, msg.metadata.sequence.stream)
        if msg.metadata.num_pending == 0:
            caught_up.set()

    info = await js.stream_info(f"KV_{bucket}")
    if info.state.messages == 0:
        caught_up.set()
    sub = await js.subscribe(f"{prefix}>", stream=f"KV_{bucket}", cb=on_msg, ordered_consumer=True,
                             deliver_policy=DeliverPolicy.LAST_PER_SUBJECT)
    if not await wait_event(caught_up, timeout):
        await sub.unsubscribe()
        raise TimeoutError(f"the copy of bucket {bucket} did not catch up within {timeout}s")
    return sub


async def unfollow(sub: JetStreamContext.PushSubscription | None) -> None:
    """Stop following a bucket; on a shutdown the connection may be gone already, which
    is no error."""
    if sub is not None:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()


async def bucket_entries(kv: KeyValue, timeout: float = 30.0) -> AsyncIterator[tuple[bytes, int]]:
    """The current value of every key of a bucket with its revision (deleted keys left out).

    The end is the entry the server sent with nothing pending after it, deletes included
    (the stream's last message may be one). nats-py's own end marker (``None``) is not
    trusted: it can come before messages the server had already sent (nats-io/nats.py#842),
    and a read of a full bucket then found nothing (seen: the registry's rebuild after a
    Redis loss restored no pool). Raises ``TimeoutError`` if the bucket stops answering."""
    if (await kv.status()).values == 0:
        return
    watcher = await kv.watchall()
    try:
        while True:
            try:
                entry = await watcher.updates(timeout=timeout)
            except nats.errors.TimeoutError:
                raise TimeoutError(f"bucket read: no entry within {timeout}s") from None
            if entry is None:  # nats-py's marker, maybe early: the deltas decide
                continue
            if entry.value and entry.operation not in ("DEL", "PURGE"):
                yield entry.value, entry.revision
            if entry.delta == 0:
                return
    finally:
        await watcher.stop()


async def bucket_values(kv: KeyValue) -> AsyncIterator[bytes]:
    """The current value of every key of a bucket (deleted keys left out)."""
    async with contextlib.aclosing(bucket_entries(kv)) as entries:
        async for value, _ in entries:
            yield value
