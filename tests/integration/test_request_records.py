"""The records of requests placed at once (accepted → placed) written together: the
confirmations of a batch carry every record in one script call, each record reads back
as the state machine's hash (``state``, ``updated_at``, ``record``), and a Redis that
forgot its scripts gets them again without losing a record."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from redis.asyncio.client import Pipeline

from services.broker.domain.requests import ComputeRequest
from services.broker.leases import LeaseStore
from services.broker.records import RequestRecord
from services.broker.request_states import RECORDS_PER_CALL, RequestStates
from services.common.keys import Keys

from .broker_replicas import replicas, tenant

pytestmark = pytest.mark.asyncio


def record(i: int, state: str) -> RequestRecord:
    now = datetime(2026, 12, 6, 12, 0, 0, tzinfo=UTC) + timedelta(seconds=i)
    return RequestRecord(request_id=f"req-{i}", tenant=f"t{i % 2}", state=state, created_at=now,  # type: ignore[arg-type]
                         updated_at=now + timedelta(seconds=1), body=ComputeRequest(units=i + 1),
                         lease_ids=[f"lease-{i}"] if state == "placed" else [],
                         reasons=["no capacity"] if state == "rejected" else [])


async def test_the_records_of_a_batch_are_one_command_and_each_reads_back(rds, srds, prefix: str) -> None:
    states = RequestStates(rds, Keys(prefix))
    records = [record(i, "placed" if i % 3 else "rejected") for i in range(5)]

    def build(pipe: Pipeline) -> int:
        states.record_into(pipe, *records)
        return len(pipe.command_stack)

    # the confirmation pipeline's runner, which loads the script when Redis does not know it
    n, replies = await LeaseStore(rds, Keys(prefix)).run_pipeline(build, also=states.scripts)
    assert n == 1 and replies == [5]  # one call for the batch, not one HSET per request
    for r in records:
        assert await states.get(r.request_id) == r
        assert srds.hget(Keys(prefix).request(r.request_id), "state") == r.state


async def test_a_batch_with_its_lookups_is_one_command_and_each_lookup_is_written(rds, srds, prefix: str) -> None:
    """The confirmations' lookups (lease index, a tenant's requests and leases) ride in
    the records' call: 600 lease index entries (more than one command's worth of pairs in
    the script) and two tenants' sorted sets."""
    states, keys = RequestStates(rds, Keys(prefix)), Keys(prefix)
    records = [record(i, "placed") for i in range(3)]
    index = [x for i in range(600) for x in (f"lease-{i}", f"region-{i % 7}")]
    lookups = [(keys.lease_index(), "h", index),
               (keys.tenant_leases("t0"), "z", [1.5, "lease-0", 2.5, "lease-2"]),
               (keys.tenant_leases("t1"), "z", [3.5, "lease-1"])]

    def build(pipe: Pipeline) -> int:
        states.record_into(pipe, *records, lookups=lookups)
        return len(pipe.command_stack)

    n, replies = await LeaseStore(rds, Keys(prefix)).run_pipeline(build, also=states.scripts)
    assert n == 1 and replies == [3]
    assert srds.hgetall(keys.lease_index()) == dict(zip(index[::2], index[1::2], strict=True))
    assert srds.zrange(keys.tenant_leases("t0"), 0, -1, withscores=True) == [("lease-0", 1.5), ("lease-2", 2.5)]
    assert srds.zrange(keys.tenant_leases("t1"), 0, -1, withscores=True) == [("lease-1", 3.5)]
    assert await states.get_many([r.request_id for r in records]) == records


async def test_a_large_batch_is_cut_into_calls_that_each_hold_redis_briefly(rds, prefix: str) -> None:
    states = RequestStates(rds, Keys(prefix))
    records = [record(i, "placed") for i in range(RECORDS_PER_CALL + 2)]

    def build(pipe: Pipeline) -> int:
        states.record_into(pipe, *records)
        return len(pipe.command_stack)

    n, replies = await LeaseStore(rds, Keys(prefix)).run_pipeline(build, also=states.scripts)
    assert n == 2 and replies == [RECORDS_PER_CALL, 2]
    assert await states.get_many([r.request_id for r in records]) == records


async def test_one_record_is_one_hset_and_reads_back(rds, prefix: str) -> None:
    states = RequestStates(rds, Keys(prefix))
    r = record(7, "rejected")
    pipe = rds.pipeline(transaction=False)
    states.record_into(pipe, r)
    assert [c[0][0] for c in pipe.command_stack] == ["HSET"]
    await pipe.execute()
    assert await states.get(r.request_id) == r


async def test_placements_confirmed_together_after_redis_forgot_its_scripts(settings, srds) -> None:
    async with replicas(settings, n=1) as rs:
        broker = rs.brokers[0]
        await rs.pool("p", 16)
        srds.script_flush()  # a restarted Redis: every script is unknown until loaded again
        body = ComputeRequest(units=1)
        placed = await asyncio.gather(*(broker.place(tenant(f"t{i % 3}"), body) for i in range(8)))
        assert [status for status, _ in placed] == [201] * 8
        for _, view in placed:
            saved = await broker.record(view.request_id)
            assert saved is not None and saved.state == "placed"
            assert saved.lease_ids == [lease.lease_id for lease in view.leases]
            assert srds.hget(rs.keys.request(view.request_id), "state") == "placed"
