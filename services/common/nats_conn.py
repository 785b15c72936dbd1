"""NATS connection and JetStream set-up shared by every service."""

from __future__ import annotations

import asyncio
import logging

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from .jetstream import AckedPublisher  # noqa: F401 - imported from here by the services
from .subjects import EVENT_KINDS, FAILOVER, Subjects
from .tracing import nats_headers

log = logging.getLogger(__name__)

DUPLICATE_WINDOW_S = 120.0
BUCKETS = ("pools", "keys", "regions")  # durable records that are state, not events


async def connect(url: str, name: str, *, no_echo: bool = False) -> NATS:
    """Connect with unbounded reconnects and a short backoff: a NATS restart is a pause,
    not an outage, for a service. ``url`` may list several servers of a cluster,
    comma-separated; the client also learns the others from the server it reaches.
    ``no_echo``: the server does not deliver this connection's own messages to its own
    subscriptions (for a process that already applied what it published)."""

    async def _disconnected() -> None:
        log.debug("nats disconnected (%s)", name)  # also on every normal drain; reconnects are warned

    async def _reconnected() -> None:
        log.warning("nats reconnected (%s)", name)

    async def _error(exc: Exception) -> None:
        log.warning("nats error (%s): %s", name, exc)

    return await nats.connect(
        [u.strip() for u in url.split(",") if u.strip()],  # a cluster: several seeds, comma-separated
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.25,
        connect_timeout=5,
        allow_reconnect=True,
        disconnected_cb=_disconnected,
        reconnected_cb=_reconnected,
        error_cb=_error,
        no_echo=no_echo,
    )


def stream_configs(subjects: Subjects, replicas: int = 1) -> list[StreamConfig]:
    return [
        StreamConfig(
            name=subjects.stream(kind),
            subjects=[subjects.events(kind)],
            storage=StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW_S,
            num_replicas=replicas,
        )
        for kind in EVENT_KINDS
    ] + [failover_work_config(subjects, replicas)]


def failover_work_config(subjects: Subjects, replicas: int = 1) -> StreamConfig:
    """The broker's failover work queue (``Subjects.failover_work``): a message is
    removed once the failover consumer acknowledges it."""
    return StreamConfig(name=subjects.stream(FAILOVER), subjects=[subjects.failover_work()],
                        retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE,
                        duplicate_window=DUPLICATE_WINDOW_S, num_replicas=replicas)


async def ensure_streams(js: JetStreamContext, subjects: Subjects, replicas: int = 1) -> None:
    """Create the event streams and record buckets, or bring them to this config.
    Safe to call from every replica at every start."""
    for config in stream_configs(subjects, replicas):
        await ensure_stream(js, config)
    for bucket in BUCKETS:
        await ensure_bucket(js, subjects.bucket(bucket), replicas)


def _differs(have: StreamConfig, want: StreamConfig) -> bool:
    return (sorted(have.subjects or []) != sorted(want.subjects or []) or have.num_replicas != want.num_replicas
            or have.storage != want.storage or bool(have.allow_direct) != bool(want.allow_direct)
            or abs((have.duplicate_window or 0) - (want.duplicate_window or 0)) > 1e-3)


async def ensure_stream(js: JetStreamContext, config: StreamConfig, attempts: int = 6) -> None:
    """Create the stream, or update it when its config differs (e.g. more replicas).
    Replicas starting together on a fresh NATS cluster race, and an update that meets a
    create in progress can go unanswered: a create or update that fails or times out is
    retried after a fresh look."""
    for attempt in range(attempts):
        try:
            try:
                info = await js.stream_info(config.name)
            except NotFoundError:
                await js.add_stream(config)
                return
            if _differs(info.config, config):
                await js.update_stream(config)
            return
        except (nats.errors.TimeoutError, nats.js.errors.APIError) as exc:
            if attempt == attempts - 1:
                raise
            log.warning("ensuring stream %s: %s; looking again", config.name, exc or type(exc).__name__)


async def ensure_bucket(js: JetStreamContext, name: str, replicas: int = 1, attempts: int = 6,
                        direct: bool = False) -> KeyValue:
    """The bucket, created if missing. Replicas starting together on a fresh NATS cluster
    race to create it, and a losing create can go unanswered (seen with R3 buckets):
    a create that fails or times out is followed by another look-up. ``direct``: allow
    direct gets (the meter reads many accounts in one batched direct get)."""
    for attempt in range(attempts):
        try:  # the look-up can go unanswered too while the cluster creates streams (seen: a replica failed to start)
            try:
                return await js.key_value(name)
            except BucketNotFoundError:
                pass
            return await js.create_key_value(
                KeyValueConfig(bucket=name, storage=StorageType.FILE, history=1, replicas=replicas, direct=direct)
            )
        except (nats.errors.TimeoutError, nats.js.errors.APIError) as exc:
            if attempt == attempts - 1:
                raise
            log.warning("creating bucket %s: %s; looking again", name, exc or type(exc).__name__)
    raise AssertionError("unreachable")


async def publish_event(js: JetStreamContext, subject: str, event: msgspec.Struct) -> int:
    """Publish an event durably; JetStream drops a repeat of the same ``event.id``.
    Carries the request id of the HTTP request it is published for, if any.
    Returns the stream sequence."""
    ack = await js.publish(
        subject, msgspec.json.encode(event), headers=nats_headers({"Nats-Msg-Id": event.id})  # type: ignore[attr-defined]
    )
    return ack.seq


# what a publish meets while a NATS cluster fails over (a node died, its streams elect new
# leaders, clients reconnect elsewhere); anything else is not retried
FAILOVER_ERRORS = (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.errors.StaleConnectionError,
                    nats.errors.ConnectionReconnectingError, nats.js.errors.ServiceUnavailableError,
                    nats.js.errors.NoStreamResponseError,
                    nats.errors.OutboundBufferLimitError)  # disconnected long enough to fill the client's buffer


async def publish_durably(js: JetStreamContext, subject: str, event: msgspec.Struct, within: float = 30.0,
                          attempt_timeout: float = 3.0) -> int:
    """``publish_event``, retried until acknowledged or ``within`` seconds have passed.

    For an event that records a change already made (a lease released or renewed in
    Redis): giving up would leave the durable record behind the live state. Retrying is
    safe, as the same ``Nats-Msg-Id`` makes a repeat of a stored event a no-op, and it
    rides out a cluster failover (a few seconds) instead of failing the request."""
    import time

    deadline = time.monotonic() + within
    while True:
        try:
            ack = await js.publish(subject, msgspec.json.encode(event),  # type: ignore[attr-defined]
                                   headers=nats_headers({"Nats-Msg-Id": event.id}),  # type: ignore[attr-defined]
                                   timeout=attempt_timeout)
            return ack.seq
        except FAILOVER_ERRORS as exc:
            if time.monotonic() + 0.25 >= deadline:
                raise
            log.warning("publish of %s not acknowledged (%s); retrying", event.id,  # type: ignore[attr-defined]
                        type(exc).__name__)
            await asyncio.sleep(0.25)


async def read_stream(js: JetStreamContext, stream: str, subject: str, batch: int = 1000,  # noqa: ANN201
                      start: int = 1):
    """Every message of ``stream`` on ``subject`` from sequence ``start`` up to its last
    sequence now (for rebuilding state from the durable record, or reading the latest
    few). Yields ``(seq, data)``."""
    info = await js.stream_info(stream)
    last = info.state.last_seq
    if info.state.messages == 0 or start > last:
        return
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    sub = await js.pull_subscribe(subject, stream=stream, config=ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE if start > 1 else DeliverPolicy.ALL,
        opt_start_seq=start if start > 1 else None, ack_policy=AckPolicy.NONE, inactive_threshold=30.0))
    try:
        while True:
            try:
                msgs = await sub.fetch(batch, timeout=2)
            except TimeoutError:
                return
            for msg in msgs:
                seq = msg.metadata.sequence.stream
                yield seq, msg.data
                if seq >= last:
                    return
    finally:
        await sub.unsubscribe()


async def close_quietly(nc: NATS, timeout: float = 5.0) -> None:
    """Drain (finish what is in flight), but never hang a shutdown on it: a drain that
    waits on a stuck callback or a gone server is cut short by a close."""
    try:
        await asyncio.wait_for(nc.drain(), timeout)
    except Exception as exc:  # noqa: BLE001 - includes TimeoutError
        log.warning("nats drain did not finish (%s); closing", exc or type(exc).__name__)
        if not nc.is_closed:
            try:
                await nc.close()
            except Exception as close_exc:  # noqa: BLE001 - the server is gone: flushing to it fails
                log.warning("nats close: %s", close_exc or type(close_exc).__name__)
