"""Property test of ``pool.lua`` against a real redis-server: whatever the order of
registrations, heartbeats, shrinks, drains, expiries, removals and (broker) leases, the
live numbers the script keeps match a plain model, and free units are never negative.
The default run takes at least ``MIN_STEPS`` steps (counted)."""

from __future__ import annotations

import uuid

import redis
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from services.common.keys import Keys
from services.common.redis_conn import read_lua

from ..helpers import run_machine

REGION, POOL = "cn-yrd", "p"
MIN_STEPS = 5_000


def make_machine(url: str, counter: list[int]) -> type[RuleBasedStateMachine]:
    client = redis.Redis.from_url(url, decode_responses=True)
    script = client.register_script(read_lua("services.registry.lua", "pool.lua"))

    class PoolScript(RuleBasedStateMachine):
        @initialize(capacity=st.integers(1, 64))
        def register(self, capacity: int) -> None:
            self.keys = Keys(f"prop{uuid.uuid4().hex[:10]}")
            self.now = 1000.0
            self.capacity, self.healthy, self.leased, self.alive, self.draining = capacity, -1, 0, True, False
            self.gen = self.rev = 1  # the record's revision at creation, then at each change
            self.call("upsert", capacity, "{}", "m", "acme", self.gen, self.rev)

        def call(self, op: str, *args: object, provider: str = "") -> list:
            k = self.keys
            return script(keys=[k.pool(REGION, POOL), k.region_pools(REGION), k.heartbeats(REGION),
                                k.pool_leases(REGION, POOL), k.removed_pools(REGION)],
                          args=[op, self.now, POOL, provider, *args])

        @rule(capacity=st.integers(1, 64))
        def replace_or_patch(self, capacity: int) -> None:
            counter[0] += 1
            self.rev += 1
            assert self.call("patch", capacity, "{}", self.gen, self.rev)[0] == 1
            self.capacity = capacity
            assert self.call("patch", 1, "{}", self.gen, self.rev - 1)[0] == 3  # an older revision: no change
            assert self.call("patch", 1, "{}", self.gen + 1, self.rev + 1)[0] == -2  # another generation

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
            assert self.call("remove", self.gen + 1)[0] == -2  # only the generation named is removed
            raw = self.call("remove", self.gen)
            assert (int(raw[0]), raw[2], int(raw[5]), int(raw[7])) == (1, "removed", self.leased, self.gen)
            assert client.exists(self.keys.pool(REGION, POOL)) == 0
            assert POOL not in client.smembers(self.keys.region_pools(REGION))
            assert self.call("heartbeat", -2)[0] == 0  # a heartbeat for a removed pool finds nothing
            self.rev += 2  # the record's delete, then its create
            self.gen = self.rev
            assert self.call("upsert", capacity, "{}", "m", "acme", self.gen, self.rev)[0] == 2
            self.capacity, self.healthy, self.leased, self.alive, self.draining = capacity, -1, 0, True, False

        @rule(capacity=st.integers(1, 64))
        def stale_and_foreign_registrations_change_nothing(self, capacity: int) -> None:
            """Writers racing each other: Redis keeps what the record holds last."""
            counter[0] += 1
            before = client.hgetall(self.keys.pool(REGION, POOL))
            assert self.call("upsert", capacity, "{}", "m", "acme", self.gen, self.rev - 1)[0] == 3
            assert self.call("upsert", capacity, "{}", "m", "acme", self.gen - 1, self.rev + 1)[0] == 3
            assert self.call("upsert", capacity, "{}", "m", "zeta", self.gen, self.rev + 1)[0] == -1
            assert client.hgetall(self.keys.pool(REGION, POOL)) == before

        @rule(capacity=st.integers(1, 64))
        def registered_again_over_a_missed_removal(self, capacity: int) -> None:
            """The record was removed and created again but Redis never heard of the
            removal: the new generation replaces the old one, starting from nothing leased,
            and names the old generation, whose leases are lost."""
            counter[0] += 1
            old = self.gen
            self.rev += 2
            self.gen = self.rev
            raw = self.call("upsert", capacity, "{}", "m", "acme", self.gen, self.rev)
            assert (int(raw[0]), int(raw[7]), int(raw[9])) == (2, self.gen, old)
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
            assert (int(h["generation"]), int(h["rev"])) == (self.gen, self.rev)
            if status == "online":
                assert int(h["free"]) + min(self.leased, effective) <= effective

        def teardown(self) -> None:
            if hasattr(self, "keys"):
                client.delete(self.keys.pool(REGION, POOL), self.keys.region_pools(REGION),
                              self.keys.heartbeats(REGION), self.keys.removed_pools(REGION))

    return PoolScript


def test_pool_script_matches_model(redis_url: str) -> None:
    steps = run_machine(make_machine, redis_url, examples=150, steps=50, min_steps=MIN_STEPS)
    assert steps >= MIN_STEPS, f"only {steps} steps ran"
