"""Stateful property test of the broker's lease scripts (reserve, end, renew) and the
registry's pool script together, against a real redis-server: in any order of
reservations (one or several pools, all or nothing, interruptible or not), releases,
expiries, renewals, capacity changes, pools going offline, draining, being removed and
registered again, and Redis being lost and rebuilt (pools from their record, leases
restored with their seq from the durable record), the live numbers match a plain
model after every step and a pool is never booked beyond what was free.

The default run takes at least ``MIN_STEPS`` steps (counted, not assumed: hypothesis
stops a run early at will), which with ``test_pool_script_props`` makes more than
10,000 steps in all."""

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
MIN_STEPS = 7_500


class Live(msgspec.Struct):
    pool: str
    units: int
    expiry: float
    seq: int
    interruptible: bool
    confirmed: bool = False  # the broker confirmed it once its grant was durable


def make_machine(url: str, counter: list[int]) -> type[RuleBasedStateMachine]:
    client = redis.Redis.from_url(url, decode_responses=True)
    pool_script = client.register_script(read_lua("services.registry.lua", "pool.lua"))
    reserve = client.register_script(read_lua("services.broker.lua", "reserve.lua"))
    end = client.register_script(read_lua("services.broker.lua", "end_lease.lua"))
    renew = client.register_script(read_lua("services.broker.lua", "renew.lua"))
    restore = client.register_script(read_lua("services.broker.lua", "restore.lua"))
    confirm = client.register_script(read_lua("services.broker.lua", "confirm.lua"))

    class LeaseScripts(RuleBasedStateMachine):
        leases = Bundle("leases")

        @initialize(caps=st.lists(st.integers(1, 16), min_size=3, max_size=3))
        def setup(self, caps: list[int]) -> None:
            self.k = Keys(f"lp{uuid.uuid4().hex[:10]}")
            self.now = 1000.0
            self.cap = dict(zip(POOLS, caps, strict=True))
            self.online = dict.fromkeys(POOLS, True)
            self.draining = dict.fromkeys(POOLS, False)
            self.present = dict.fromkeys(POOLS, True)  # registered (not removed)
            self.live: dict[str, Live] = {}
            for p in POOLS:
                self.pool("upsert", p, self.cap[p], "{}", "m", "acme")
            client.set(self.k.leases_ready(REGION), "1")

        def step(self) -> None:
            counter[0] += 1

        def pool(self, op: str, pool_id: str, *args: object) -> list:
            k = self.k
            return pool_script(keys=[k.pool(REGION, pool_id), k.region_pools(REGION), k.heartbeats(REGION)],
                               args=[op, self.now, pool_id, "", *args])

        def leased(self, pool_id: str) -> int:
            return sum(lv.units for lv in self.live.values() if lv.pool == pool_id)

        def bookable(self, pool_id: str) -> bool:
            return self.present[pool_id] and self.online[pool_id] and not self.draining[pool_id]

        def free_model(self, pool_id: str) -> int:
            return max(0, self.cap[pool_id] - self.leased(pool_id)) if self.bookable(pool_id) else 0

        def _reserve(self, mode: str, picks: list[tuple[str, int, str, bool, float]]) -> list:
            k = self.k
            keys = [k.lease_expiry(REGION), k.leases_ready(REGION), k.interruptible_leases(REGION)]
            args: list[object] = [1, mode, picks[0][4], len(picks)]  # one group: one placement in one region
            for pool_id, units, lease_id, interruptible, expiry in picks:
                info = LeaseInfo(lease_id=lease_id, request_id="r", tenant="t", pool_id=pool_id, provider="acme",
                                 region=REGION, model="m", units=units,
                                 billing="interruptible" if interruptible else "on_demand",
                                 unit_price=Decimal(1), granted_at=datetime.now(UTC),
                                 expires_at=datetime.fromtimestamp(expiry, UTC))
                keys += [k.pool(REGION, pool_id), k.pool_leases(REGION, pool_id), k.lease(REGION, lease_id)]
                args += [lease_id, units, msgspec.json.encode(info), int(interruptible)]
            [reply] = reserve(keys=keys, args=args)
            return reply

        @rule(target=leases, picks=st.lists(st.tuples(st.sampled_from(POOLS), st.integers(1, 8)), min_size=1,
                                            max_size=3, unique_by=lambda t: t[0]),
              ttl=st.integers(1, 100), interruptible=st.booleans())
        def reserve_all_or_none(self, picks: list[tuple[str, int]], ttl: int, interruptible: bool) -> list[str]:
            self.step()
            expiry = self.now + ttl
            full = [(p, u, uuid.uuid4().hex[:12], interruptible, expiry) for p, u in picks]
            fits = all(self.free_model(p) >= u for p, u in picks)
            raw = self._reserve("check", full)
            assert (int(raw[0]) == 1) == fits, (picks, raw, {p: self.free_model(p) for p in POOLS})
            if not fits:
                return []
            for pool_id, units, lease_id, intr, _ in full:
                self.live[lease_id] = Live(pool_id, units, expiry, 1, intr)
            for i, (pool_id, _, _, _, _) in enumerate(full):  # the script answers each pool's free units after
                assert int(raw[1 + i]) == self.free_model(pool_id)
            return [f[2] for f in full]

        def _end(self, lease_id: str, mode: str) -> list:
            pool_id = self.live[lease_id].pool if lease_id in self.live else "pa"
            k = self.k
            return end(keys=[k.lease_expiry(REGION), k.lease(REGION, lease_id), k.pool(REGION, pool_id),
                             k.pool_leases(REGION, pool_id), k.interruptible_leases(REGION)],
                       args=[lease_id, mode, self.now])

        def _ended(self, lease_id: str, raw: list) -> None:
            """An ended lease: its next seq, and the pool's free units (-1 once removed)."""
            lv = self.live.pop(lease_id)
            assert int(raw[2]) == lv.seq + 1
            assert int(raw[4]) == (0 if lv.confirmed else 1)  # an unconfirmed lease says so when it ends
            assert int(raw[3]) == (self.free_model(lv.pool) if self.present[lv.pool] else -1)

        @rule(ids=leases, mode=st.sampled_from(["release", "lost", "preempt", "revoke"]))
        def end_lease(self, ids: list[str], mode: str) -> None:
            self.step()
            for lease_id in ids:
                raw = self._end(lease_id, mode)
                assert (int(raw[0]) == 1) == (lease_id in self.live)
                if lease_id in self.live:
                    self._ended(lease_id, raw)

        @rule(dt=st.integers(1, 60))
        def time_passes_and_sweeper_runs(self, dt: int) -> None:
            self.step()
            self.now += dt
            due = set(client.zrangebyscore(self.k.lease_expiry(REGION), "-inf", self.now))
            assert due == {i for i, lv in self.live.items() if lv.expiry <= self.now}
            for lease_id, lv in list(self.live.items()):
                raw = self._end(lease_id, "expire")
                assert (int(raw[0]) == 1) == (lv.expiry <= self.now)
                if lv.expiry <= self.now:
                    self._ended(lease_id, raw)

        @rule(ids=leases, ttl=st.integers(1, 100))
        def broker_confirms(self, ids: list[str], ttl: int) -> None:
            """What the broker does once the grants are durable (``confirm.lua``): the real
            expiry, no pending mark; a lease already gone is reported, not brought back."""
            self.step()
            k = self.k
            ids = list(dict.fromkeys(ids))
            expiry = self.now + ttl
            args: list[object] = [1, len(ids)]  # one group: the leases of one region
            for lease_id in ids:
                args += [lease_id, expiry]
            [raw] = confirm(keys=[k.lease_expiry(REGION), *(k.lease(REGION, i) for i in ids)], args=args)
            assert [int(x) for x in raw] == [int(i in self.live) for i in ids]
            for lease_id in ids:
                if lease_id in self.live:
                    lv = self.live[lease_id]
                    lv.expiry, lv.confirmed = expiry, True
                else:
                    assert not client.exists(k.lease(REGION, lease_id))

        @rule(ids=leases, ttl=st.integers(1, 100))
        def renew_lease(self, ids: list[str], ttl: int) -> None:
            self.step()
            for lease_id in ids:
                k = self.k
                raw = renew(keys=[k.lease_expiry(REGION), k.lease(REGION, lease_id)],
                            args=[lease_id, self.now, self.now + ttl, "{}"])
                alive = lease_id in self.live and self.live[lease_id].expiry > self.now
                assert (int(raw[0]) == 1) == alive
                if alive:
                    lv = self.live[lease_id]
                    lv.expiry, lv.seq = self.now + ttl, lv.seq + 1
                    assert int(raw[1]) == lv.seq

        @rule(pool_id=st.sampled_from(POOLS), cap=st.integers(1, 16))
        def provider_changes_capacity(self, pool_id: str, cap: int) -> None:
            self.step()
            raw = self.pool("patch", pool_id, cap, "{}")
            assert int(raw[0]) == (1 if self.present[pool_id] else 0)
            if self.present[pool_id]:
                self.cap[pool_id] = cap

        @rule(pool_id=st.sampled_from(POOLS), online=st.booleans())
        def pool_goes_offline_or_online(self, pool_id: str, online: bool) -> None:
            self.step()
            if online:
                self.pool("heartbeat", pool_id, -2)
            else:
                self.now += 1
                self.pool("expire", pool_id, self.now + 1)
            if self.present[pool_id]:
                self.online[pool_id] = online

        @rule(pool_id=st.sampled_from(POOLS), on=st.booleans())
        def provider_drains(self, pool_id: str, on: bool) -> None:
            self.step()
            self.pool("drain" if on else "undrain", pool_id)
            if self.present[pool_id]:
                self.draining[pool_id] = on

        @rule(pool_id=st.sampled_from(POOLS))
        def pool_removed_and_its_leases_lost(self, pool_id: str) -> None:
            """The registry removes the pool; the broker then marks its leases lost."""
            self.step()
            raw = self.pool("remove", pool_id)
            assert int(raw[0]) == (1 if self.present[pool_id] else 0)
            if self.present[pool_id]:
                assert int(raw[5]) == self.leased(pool_id)  # what the removal event reports as lost
            self.present[pool_id] = False
            for lease_id in sorted(client.smembers(self.k.pool_leases(REGION, pool_id))):
                raw = self._end(lease_id, "lost")
                assert int(raw[0]) == 1
                self._ended(lease_id, raw)
            assert not any(lv.pool == pool_id for lv in self.live.values())

        @rule(pool_id=st.sampled_from(POOLS), cap=st.integers(1, 16))
        def pool_registered_again(self, pool_id: str, cap: int) -> None:
            self.step()
            self.pool("upsert", pool_id, cap, "{}", "m", "acme")
            if not self.present[pool_id]:
                self.draining[pool_id] = False
            self.present[pool_id], self.online[pool_id], self.cap[pool_id] = True, True, cap

        @rule()
        def redis_lost_and_rebuilt(self) -> None:
            """Everything of this deployment gone; the registry puts pools back from its
            record, the broker restores every unexpired lease with its seq; until then a
            reservation is refused rather than booked over the lost leases."""
            self.step()
            stale = list(client.scan_iter(match=f"{self.k.prefix}:*"))
            if stale:
                client.delete(*stale)
            for p in POOLS:
                if self.present[p]:
                    self.pool("upsert", p, self.cap[p], "{}", "m", "acme")
                    self.online[p], self.draining[p] = True, False
            if any(self.bookable(p) for p in POOLS):
                p = next(p for p in POOLS if self.bookable(p))
                assert int(self._reserve("check", [(p, 1, "probe", False, self.now + 5)])[0]) == -1
            self.live = {i: lv for i, lv in self.live.items() if lv.expiry > self.now}
            for lv in self.live.values():
                lv.confirmed = True  # restored from the durable record: nothing pending
            k = self.k
            keys, args = [k.lease_expiry(REGION), k.interruptible_leases(REGION)], []
            for lease_id, lv in self.live.items():
                keys += [k.pool(REGION, lv.pool), k.pool_leases(REGION, lv.pool), k.lease(REGION, lease_id)]
                args += [lease_id, lv.units, "{}", int(lv.interruptible), lv.expiry, lv.seq]
            if self.live:
                assert restore(keys=keys, args=args) == len(self.live)
                assert restore(keys=keys, args=args) == 0  # restoring twice changes nothing
            client.set(self.k.leases_ready(REGION), "1")

        @invariant()
        def pools_match_model(self) -> None:
            k = self.k
            for pool_id in POOLS:
                h = client.hgetall(k.pool(REGION, pool_id))
                if not self.present[pool_id]:
                    assert h == {}
                    continue
                assert int(h["leased"]) == self.leased(pool_id)
                assert int(h["free"]) == self.free_model(pool_id) >= 0
                assert int(h["overcommit"]) == max(0, self.leased(pool_id) - self.cap[pool_id])
                assert client.smembers(k.pool_leases(REGION, pool_id)) == {
                    i for i, lv in self.live.items() if lv.pool == pool_id}

        @invariant()
        def leases_match_model(self) -> None:
            k = self.k
            assert set(client.zrange(k.lease_expiry(REGION), 0, -1)) == set(self.live)
            assert client.smembers(k.interruptible_leases(REGION)) == {
                i for i, lv in self.live.items() if lv.interruptible}
            for lease_id, lv in self.live.items():
                units, seq, expires = client.hmget(k.lease(REGION, lease_id), "units", "seq", "expires")
                assert (int(units), int(seq), float(expires)) == (lv.units, lv.seq, lv.expiry)

        def teardown(self) -> None:
            if hasattr(self, "k"):
                stale = list(client.scan_iter(match=f"{self.k.prefix}:*"))
                if stale:
                    client.delete(*stale)

    return LeaseScripts


def test_lease_scripts_match_model(redis_url: str) -> None:
    counter = [0]
    machine = make_machine(redis_url, counter)
    machine.TestCase.settings = hsettings(max_examples=200, stateful_step_count=60, deadline=None)
    machine.TestCase().runTest()
    print(f"{counter[0]} steps")
    assert counter[0] >= MIN_STEPS, f"only {counter[0]} steps ran"
