"""Stateful property test of the broker's lease scripts (reserve, end, renew) and the
registry's pool script together, against a real redis-server: in any order of
reservations (one or several pools, all or nothing), releases, expiries, renewals,
capacity changes and pools going offline, the live numbers match a plain model and a
pool is never booked beyond what was free."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal

import msgspec
import redis
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, rule

from services.common.keys import Keys
from services.common.messages import LeaseInfo
from services.common.redis_conn import read_lua

REGION = "cn-gz"
POOLS = ("pa", "pb", "pc")


def make_machine(url: str) -> type[RuleBasedStateMachine]:
    client = redis.Redis.from_url(url, decode_responses=True)
    pool_script = client.register_script(read_lua("services.registry.lua", "pool.lua"))
    reserve = client.register_script(read_lua("services.broker.lua", "reserve.lua"))
    end = client.register_script(read_lua("services.broker.lua", "end_lease.lua"))
    renew = client.register_script(read_lua("services.broker.lua", "renew.lua"))

    class LeaseScripts(RuleBasedStateMachine):
        leases = Bundle("leases")

        @initialize(caps=st.lists(st.integers(1, 16), min_size=3, max_size=3))
        def setup(self, caps: list[int]) -> None:
            self.k = Keys(f"lp{uuid.uuid4().hex[:10]}")
            self.now = 1000.0
            self.cap = dict(zip(POOLS, caps, strict=True))
            self.online = dict.fromkeys(POOLS, True)
            self.live: dict[str, tuple[str, int, float]] = {}  # lease id -> pool, units, expiry
            for p in POOLS:
                self.pool("upsert", p, self.cap[p], "{}", "m", "acme")
            client.set(self.k.leases_ready(REGION), "1")

        def pool(self, op: str, pool_id: str, *args: object) -> list:
            k = self.k
            return pool_script(keys=[k.pool(REGION, pool_id), k.region_pools(REGION), k.heartbeats(REGION)],
                               args=[op, self.now, pool_id, "", *args])

        def leased(self, pool_id: str) -> int:
            return sum(u for p, u, _ in self.live.values() if p == pool_id)

        def free_model(self, pool_id: str) -> int:
            return max(0, self.cap[pool_id] - self.leased(pool_id)) if self.online[pool_id] else 0

        @rule(target=leases, picks=st.lists(st.tuples(st.sampled_from(POOLS), st.integers(1, 8)), min_size=1,
                                            max_size=3, unique_by=lambda t: t[0]),
              ttl=st.integers(1, 100))
        def reserve_all_or_none(self, picks: list[tuple[str, int]], ttl: int) -> list[str]:
            k, ids = self.k, []
            keys = [k.lease_expiry(REGION), k.leases_ready(REGION), k.interruptible_leases(REGION)]
            args: list[object] = ["check", self.now + ttl]
            for pool_id, units in picks:
                lease_id = uuid.uuid4().hex[:12]
                ids.append(lease_id)
                info = LeaseInfo(lease_id=lease_id, request_id="r", tenant="t", pool_id=pool_id, provider="acme",
                                 region=REGION, model="m", units=units, billing="on_demand",
                                 unit_price=Decimal(1), granted_at=datetime.now(UTC),
                                 expires_at=datetime.fromtimestamp(self.now + ttl, UTC))
                keys += [k.pool(REGION, pool_id), k.pool_leases(REGION, pool_id), k.lease(REGION, lease_id)]
                args += [lease_id, units, msgspec.json.encode(info), 0]
            fits = all(self.free_model(p) >= u for p, u in picks)
            raw = reserve(keys=keys, args=args)
            assert (int(raw[0]) == 1) == fits, (picks, raw, {p: self.free_model(p) for p in POOLS})
            if not fits:
                return []
            for lease_id, (pool_id, units) in zip(ids, picks, strict=True):
                self.live[lease_id] = (pool_id, units, self.now + ttl)
            return ids

        def _end(self, lease_id: str, mode: str) -> list:
            pool_id = self.live[lease_id][0] if lease_id in self.live else "pa"
            k = self.k
            return end(keys=[k.lease_expiry(REGION), k.lease(REGION, lease_id), k.pool(REGION, pool_id),
                             k.pool_leases(REGION, pool_id), k.interruptible_leases(REGION)],
                       args=[lease_id, mode, self.now])

        @rule(ids=leases, mode=st.sampled_from(["release", "lost", "preempt"]))
        def end_lease(self, ids: list[str], mode: str) -> None:
            for lease_id in ids:
                raw = self._end(lease_id, mode)
                assert (int(raw[0]) == 1) == (lease_id in self.live)
                self.live.pop(lease_id, None)

        @rule(dt=st.integers(1, 60))
        def time_passes_and_sweeper_runs(self, dt: int) -> None:
            self.now += dt
            for lease_id, (_, _, expiry) in list(self.live.items()):
                raw = self._end(lease_id, "expire")
                assert (int(raw[0]) == 1) == (expiry <= self.now)
                if expiry <= self.now:
                    del self.live[lease_id]

        @rule(ids=leases, ttl=st.integers(1, 100))
        def renew_lease(self, ids: list[str], ttl: int) -> None:
            for lease_id in ids:
                k = self.k
                raw = renew(keys=[k.lease_expiry(REGION), k.lease(REGION, lease_id)],
                            args=[lease_id, self.now, self.now + ttl, "{}"])
                alive = lease_id in self.live and self.live[lease_id][2] > self.now
                assert (int(raw[0]) == 1) == alive
                if alive:
                    pool_id, units, _ = self.live[lease_id]
                    self.live[lease_id] = (pool_id, units, self.now + ttl)

        @rule(pool_id=st.sampled_from(POOLS), cap=st.integers(1, 16))
        def provider_changes_capacity(self, pool_id: str, cap: int) -> None:
            self.pool("patch", pool_id, cap, "{}")
            self.cap[pool_id] = cap

        @rule(pool_id=st.sampled_from(POOLS), online=st.booleans())
        def pool_goes_offline_or_online(self, pool_id: str, online: bool) -> None:
            if online:
                self.pool("heartbeat", pool_id, -2)
            else:
                self.now += 1
                self.pool("expire", pool_id, self.now + 1)
            self.online[pool_id] = online

        @invariant()
        def pools_match_model(self) -> None:
            for pool_id in POOLS:
                h = client.hgetall(self.k.pool(REGION, pool_id))
                assert int(h["leased"]) == self.leased(pool_id)
                assert int(h["free"]) == self.free_model(pool_id) >= 0
                assert int(h["overcommit"]) == max(0, self.leased(pool_id) - self.cap[pool_id])
                assert client.scard(self.k.pool_leases(REGION, pool_id)) == sum(
                    1 for p, _, _ in self.live.values() if p == pool_id)

        def teardown(self) -> None:
            if hasattr(self, "k"):
                stale = list(client.scan_iter(match=f"{self.k.prefix}:*"))
                if stale:
                    client.delete(*stale)

    return LeaseScripts


def test_lease_scripts_match_model(redis_url: str) -> None:
    machine = make_machine(redis_url)
    machine.TestCase.settings = hsettings(max_examples=80, stateful_step_count=50, deadline=None)
    machine.TestCase().runTest()
