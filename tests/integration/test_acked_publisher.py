"""Batched JetStream publishes against a real nats-server: each caller gets its own
stream sequence, a repeated Nats-Msg-Id is stored once, and a subject no stream
listens on fails with the error js.publish raises, without failing the others."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import msgspec
import nats.errors
import nats.js.errors
import pytest

from services.common.messages import RequestAccepted
from services.common.nats_conn import AckedPublisher
from services.common.subjects import REQUEST, Subjects


def event(i: int) -> RequestAccepted:
    return RequestAccepted(id=f"ev_{i}", at=datetime.now(UTC), request_id=f"req_{i}", tenant="t1", units=1)


async def test_concurrent_publishes_are_each_acknowledged(nc, subjects: Subjects) -> None:
    acks = AckedPublisher(nc)
    subject = subjects.request("t1")
    seqs = await asyncio.gather(*(acks.publish(subject, event(i)) for i in range(200)))
    assert sorted(seqs) == list(range(1, 201))
    info = await nc.jetstream().stream_info(subjects.stream(REQUEST))
    assert info.state.messages == 200
    again = await acks.publish(subject, event(7))  # the same Nats-Msg-Id: stored once
    assert again == seqs[7]
    assert (await nc.jetstream().stream_info(subjects.stream(REQUEST))).state.messages == 200


async def test_no_stream_fails_that_publish_only(nc, subjects: Subjects) -> None:
    acks = AckedPublisher(nc, timeout=2.0)
    good = acks.publish(subjects.request("t1"), event(1))
    bad = acks.publish("nobody.listens.here", event(2))
    results = await asyncio.gather(good, bad, return_exceptions=True)
    assert results[0] == 1
    assert isinstance(results[1], nats.js.errors.NoStreamResponseError)
    with pytest.raises(nats.js.errors.NoStreamResponseError):
        await nc.jetstream().publish("nobody.listens.here", b"{}")  # what js.publish says, for comparison


class Big(msgspec.Struct, frozen=True):
    id: str
    blob: str


async def test_a_message_the_client_cannot_send_fails_alone(nc, subjects: Subjects) -> None:
    """Refused before it was written (here: above the server's max payload): that caller
    gets the error; the others in the same batch are written and acknowledged."""
    acks = AckedPublisher(nc)
    subject = subjects.request("t1")
    too_big = Big(id="big-1", blob="x" * (nc.max_payload + 1))
    results = await asyncio.gather(acks.publish(subject, event(1)), acks.publish(subject, too_big),
                                   acks.publish(subject, event(2)), return_exceptions=True)
    assert results[0] == 1 and results[2] == 2, results
    assert isinstance(results[1], nats.errors.MaxPayloadError)
