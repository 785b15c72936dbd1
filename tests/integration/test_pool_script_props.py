"""Property test of ``pool.lua`` against a real redis-server: whatever the order of
registrations, heartbeats, shrinks, drains, expiries, removals and (broker) leases, the
live numbers the script keeps match a plain model, and free units are never negative.
The default run takes at least ``MIN_STEPS`` steps (counted)."""

from __future__ import annotations

import uuid

import redis
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from services.common.keys import Keys
from services.common.redis_conn import read_lua

REGION, POOL = "cn-yrd", "p"
MIN_STEPS = 2_500


def make_machine(url: str, counter: list[int]) -> type[RuleBasedStateMachine]:
    client = redis.Redis.from_url(url, decode_responses=True)
    script = client.register_script(read_lua("services.registry.lua", "pool.lua"))

    class PoolScript(RuleBasedStateMachine):
        @initialize(capacity=st.integers(1, 64))
        def register(self, capacity: int) -> None:
            self.keys = Keys(f"prop{uuid.uuid4().hex[:10]}")
            self.now = 1000.0
            self.capacity, self.healthy, self.leased, self.alive, self.draining = capacity, -1, 0, True, False
            self.call("upsert", capacity, "{}", "m", "acme")

        def call(self, op: str, *args: object, provider: str = "") -> list:
            k = self.keys
            return script(keys=[k.pool(REGION, POOL), k.region_pools(REGION), k.heartbeats(REGION)],
                          args=[op, self.now, POOL, provider, *args])

        @rule(capacity=st.integers(1, 64))
        def replace_or_patch(self, capacity: int) -> None:
            counter[0] += 1
            self.call("patch", capacity, "{}")
            self.capacity = capacity

        @rule(healthy=st.one_of(st.none(), st.integers(0, 80)))
        def heartbeat(self, healthy: int | None) -> None:
            counter[0] += 1
            self.now += 1
            self.call("heartbeat", -2 if healthy is None else healthy)
            self.alive = True
            if healthy is not None:
                self.healthy = healthy

        @rule(on=st.booleans())
        def drain(self, on: bool) -> None:
            counter[0] += 1
            self.call("drain" if on else "undrain")
            self.draining = on

        @rule()
        def expire(self) -> None:
            counter[0] += 1
            self.now += 100
            self.call("expire", self.now - 50)
            self.alive = False

        @rule()
        def expire_too_early(self) -> None:
            counter[0] += 1
            self.call("expire", self.now - 50)  # last heartbeat is newer than the cutoff: no change

        @rule(n=st.integers(1, 16))
        def lease(self, n: int) -> None:
            counter[0] += 1
            # what the broker's reserve script does: take units only when free
            free = int(client.hget(self.keys.pool(REGION, POOL), "free"))
            if free >= n:
                client.hincrby(self.keys.pool(REGION, POOL), "leased", n)
                self.call("heartbeat", -2)  # recompute
                self.leased += n

        @rule(n=st.integers(1, 16))
        def release(self, n: int) -> None:
            counter[0] += 1
            n = min(n, self.leased)
            client.hincrby(self.keys.pool(REGION, POOL), "leased", -n)
            self.call("heartbeat", -2)
            self.leased -= n
            self.alive = True

        @rule(capacity=st.integers(1, 64))
        def removed_and_registered_again(self, capacity: int) -> None:
            """Removal reports the units still leased (the broker marks them lost); a new
            registration starts from nothing leased."""
            counter[0] += 1
            raw = self.call("remove")
            assert (int(raw[0]), raw[2], int(raw[5])) == (1, "removed", self.leased)
            assert client.exists(self.keys.pool(REGION, POOL)) == 0
            assert POOL not in client.smembers(self.keys.region_pools(REGION))
            assert self.call("heartbeat", -2)[0] == 0  # a heartbeat for a removed pool finds nothing
            self.call("upsert", capacity, "{}", "m", "acme")
            self.capacity, self.healthy, self.leased, self.alive, self.draining = capacity, -1, 0, True, False

        @rule()
        def foreign_provider_is_refused(self) -> None:
            counter[0] += 1
            before = client.hgetall(self.keys.pool(REGION, POOL))
            assert self.call("drain", provider="zeta")[0] == -1
            assert client.hgetall(self.keys.pool(REGION, POOL)) == before

        @invariant()
        def numbers_match_model(self) -> None:
            h = client.hgetall(self.keys.pool(REGION, POOL))
            effective = self.capacity if self.healthy < 0 else min(self.capacity, self.healthy)
            status = "offline" if not self.alive else ("draining" if self.draining else "online")
            free = max(0, effective - self.leased) if status == "online" else 0
            assert h["status"] == status
            assert int(h["free"]) == free >= 0
            assert int(h["overcommit"]) == max(0, self.leased - effective)
            assert int(h["leased"]) == self.leased
            if status == "online":
                assert int(h["free"]) + min(self.leased, effective) <= effective

        def teardown(self) -> None:
            if hasattr(self, "keys"):
                client.delete(self.keys.pool(REGION, POOL), self.keys.region_pools(REGION),
                              self.keys.heartbeats(REGION))

    return PoolScript


def test_pool_script_matches_model(redis_url: str) -> None:
    counter = [0]
    machine = make_machine(redis_url, counter)
    machine.TestCase.settings = hsettings(max_examples=120, stateful_step_count=50, deadline=None)
    machine.TestCase().runTest()
    print(f"{counter[0]} steps")
    assert counter[0] >= MIN_STEPS, f"only {counter[0]} steps ran"
