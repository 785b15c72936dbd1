"""``jetstream.follow_bucket``, the one bucket follower of the three services, against a
real nats-server: it returns once the copy has caught up (at once on an empty bucket),
hands on every key's latest value with its revision, deletes as ``None``, and then each
change as it comes."""

from __future__ import annotations

import asyncio

from services.common.jetstream import follow_bucket
from services.common.lifecycle import wait_event
from services.common.nats_conn import ensure_bucket


class Copy:
    def __init__(self) -> None:
        self.values: dict[str, bytes | None] = {}
        self.revisions: dict[str, int] = {}
        self.changed = asyncio.Event()

    def __call__(self, key: str, value: bytes | None, revision: int) -> None:
        self.values[key], self.revisions[key] = value, revision
        self.changed.set()

    async def until(self, key: str, value: bytes | None) -> None:
        while self.values.get(key, b"absent") != value:
            self.changed.clear()
            assert await wait_event(self.changed, 5), (key, value, self.values)


async def test_an_empty_bucket_is_caught_up_at_once(nc, prefix: str) -> None:
    js = nc.jetstream()
    bucket = f"{prefix}_empty"
    await ensure_bucket(js, bucket)
    copy = Copy()
    sub = await follow_bucket(js, bucket, copy, timeout=5)
    try:
        assert copy.values == {}
        await (await js.key_value(bucket)).put("late", b"1")
        await copy.until("late", b"1")
    finally:
        await sub.unsubscribe()


async def test_current_values_deletes_and_revisions_then_changes(nc, prefix: str) -> None:
    js = nc.jetstream()
    bucket = f"{prefix}_follow"
    kv = await ensure_bucket(js, bucket)
    rev_a = await kv.put("a", b"1")
    await kv.put("b", b"2")
    await kv.put("gone", b"x")
    await kv.delete("gone")
    rev_b = await kv.put("b", b"3")
    copy = Copy()
    sub = await follow_bucket(js, bucket, copy, timeout=5)
    try:
        # returned caught up: every key's latest value is in, the deleted one as None
        assert copy.values == {"a": b"1", "b": b"3", "gone": None}
        assert copy.revisions["a"] == rev_a and copy.revisions["b"] == rev_b
        assert copy.revisions["gone"] > rev_a
        rev_a2 = await kv.put("a", b"4")
        await copy.until("a", b"4")
        assert copy.revisions["a"] == rev_a2 > rev_a
        await kv.delete("b")
        await copy.until("b", None)
        assert copy.revisions["b"] > rev_a2
        await kv.purge("a")
        await copy.until("a", None)
    finally:
        await sub.unsubscribe()


async def test_a_read_of_a_bucket_gets_every_current_value_every_time(nc, prefix: str) -> None:
    """``bucket_entries`` (the registry's rebuild after a Redis loss, the broker's pool
    view): nats-py's watcher can end its initial replay before the messages the server
    had already delivered (nats-io/nats.py#842), so a read of a full bucket came back
    empty: seen as a Redis rebuild that restored no pool at all."""
    from services.common.jetstream import bucket_entries

    js = nc.jetstream()
    kv = await ensure_bucket(js, f"{prefix}_read")
    for i in range(60):
        await kv.put(f"k{i}", f"v{i}".encode())
    await kv.put("gone", b"x")
    await kv.delete("gone")  # the last message of the stream: a delete
    counts = []
    for _ in range(40):
        counts.append(len([value async for value, _ in bucket_entries(kv)]))
    assert counts == [60] * 40, f"reads of 60 current values found {sorted(set(counts))}"
    empty = await ensure_bucket(js, f"{prefix}_read_empty")
    assert [value async for value, _ in bucket_entries(empty)] == []
