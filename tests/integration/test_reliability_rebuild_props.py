"""The reliability record's rebuild (docs/reliability.md: claim, clear, open) over the real
scripts on a real Redis, with three replicas interleaved as a crashing, stalling world
interleaves them: claims taken, lapsed and taken again, clears and opens by replicas whose
claim is gone, writes at every moment, Redis losing the record and an operator deleting
the mark. Whatever the order: at most one claim holds, a replica whose claim lapsed
changes nothing, a write lands only in an open record, and the record counts exactly the
failures written since the last clear that was its own."""

from __future__ import annotations

import asyncio
import uuid

import redis.asyncio as aioredis
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from services.common.keys import Keys
from services.common.reliability import PROVIDER, read_reliability
from services.meter.reliability import ReliabilityRecord
from services.meter.reliability.record import RecordLost

from ..helpers import run_machine
from .test_reliability import T0_MS, failed

REPLICAS = 3
MIN_STEPS = 3_000


def make_machine(url: str, counter: list[int]) -> type[RuleBasedStateMachine]:
    loop = asyncio.new_event_loop()
    client = aioredis.Redis.from_url(url)

    def run(coro):  # noqa: ANN001, ANN202
        return loop.run_until_complete(coro)

    class Rebuild(RuleBasedStateMachine):
        @initialize()
        def setup(self) -> None:
            self.keys = Keys(f"rr{uuid.uuid4().hex[:10]}")
            self.replicas = [ReliabilityRecord(client, self.keys) for _ in range(REPLICAS)]
            self.mark = "absent"  # absent | claimed | open
            self.holder: int | None = None  # whose claim the mark is
            self.written = 0  # failures in the record
            self.n = 0

        def step(self) -> None:
            counter[0] += 1

        @rule(r=st.integers(0, REPLICAS - 1))
        def claim(self, r: int) -> None:
            self.step()
            took = run(self.replicas[r].claim())
            # (its own claim again: a rebuild that failed half way resumes)
            assert took == (self.mark == "absent" or (self.mark == "claimed" and self.holder == r)), (took, self.mark)
            if took:
                self.mark, self.holder = "claimed", r

        @rule(r=st.integers(0, REPLICAS - 1))
        def clear(self, r: int) -> None:
            self.step()
            mine = self.mark == "claimed" and self.holder == r
            try:
                run(self.replicas[r].clear())
            except RecordLost:
                assert not mine
                return
            assert mine, "a clear by a replica whose claim is gone went through"
            self.written = 0

        @rule(r=st.integers(0, REPLICAS - 1))
        def open(self, r: int) -> None:
            self.step()
            opened = run(self.replicas[r].open())
            assert opened == (self.mark == "claimed" and self.holder == r), (opened, self.mark, self.holder, r)
            if opened:
                self.mark, self.holder = "open", None

        @rule(r=st.integers(0, REPLICAS - 1))
        def write(self, r: int) -> None:
            self.step()
            self.n += 1
            try:
                run(self.replicas[r].apply_all(failed(f"f{self.n}")))
            except RecordLost:
                assert self.mark != "open"
                return
            assert self.mark == "open", "a write landed in a record that is not open"
            self.written += 1

        @rule()
        def lapse(self) -> None:
            """The claimant stalled past the claim's time to live."""
            self.step()
            if self.mark == "claimed":
                run(client.delete(self.keys.reliability_since()))
                self.mark, self.holder = "absent", None

        @rule()
        def operator_rebuilds(self) -> None:
            """The mark deleted on purpose: the record's keys stay until a claimant clears them."""
            self.step()
            run(client.delete(self.keys.reliability_since()))
            self.mark, self.holder = "absent", None

        @rule()
        def redis_lost(self) -> None:
            self.step()
            keys = run(_all(client, self.keys))
            if keys:
                run(client.delete(*keys))
            self.mark, self.holder, self.written = "absent", None, 0

        @invariant()
        def counts_what_was_written(self) -> None:
            if not hasattr(self, "keys"):
                return
            [rel] = run(read_reliability(client, self.keys, PROVIDER, ["acme"], T0_MS))
            assert rel.failures == self.written, (rel.failures, self.written, self.mark)

        def teardown(self) -> None:
            if hasattr(self, "keys"):
                keys = run(_all(client, self.keys))
                if keys:
                    run(client.delete(*keys))

    return Rebuild


async def _all(client: aioredis.Redis, keys: Keys) -> list:
    return [k async for k in client.scan_iter(match=keys.reliability_all(), count=1000)]


def test_rebuild_claims_clears_and_opens_match_model(redis_url: str) -> None:
    steps = run_machine(make_machine, redis_url, examples=60, steps=60, min_steps=MIN_STEPS)
    assert steps >= MIN_STEPS
