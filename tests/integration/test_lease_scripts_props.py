"""Stateful property test of the broker's lease scripts (reserve, end, renew, confirm,
restore) and the registry's pool script together, against a real redis-server.

Pools have generations (one registration of a pool id, from creation to removal; the
revision of the durable record's creating write) and a durable record modelled here as a
compare-and-set store. In any order of: reservations (one or several pools, the same pool
named twice in a group, all or none, on the generation the broker last heard of, which may
be stale), releases, expiries, renewals, confirmations, capacity changes, pools going
offline, draining, removed with their leases lost, removed while a broker missed it (its
leases live on) and registered again under the same id, two providers creating one pool,
late writes of slow registry replicas, and Redis being lost and rebuilt (pools from their
record, leases restored with their seq and generation), the live numbers match a plain
model after every step, Redis names the owner and generation the record names, and no
pool generation ever has more units leased than it ever had capacity.

The default run takes at least ``MIN_STEPS`` steps (counted, not assumed: hypothesis
stops a run early at will); ``test_lease_scripts_soak`` (marked slow) many more."""

from __future__ import annotations

import os
import uuid
from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal

import msgspec
import pytest
import redis
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, rule

from services.common.keys import Keys
from services.common.messages import LeaseInfo
from services.common.redis_conn import read_lua

from ..helpers import run_machine

REGION = "cn-gz"
POOLS = ("pa", "pb", "pc")
OWNERS = ("acme", "zeta")
MIN_STEPS = 15_000  # with test_pool_script_props (5,000): 20,000 steps of the pool scripts per run


class Live(msgspec.Struct):
    pool: str
    units: int
    expiry: float
    seq: int
    interruptible: bool
    gen: int  # the pool generation it was granted on
    confirmed: bool = False  # the broker confirmed it once its grant was durable
    deliver: bool = False  # it must be delivered: provisioning from its confirmation until ready
    deadline: float = 0.0  # its provision deadline (delivering leases)
    ready: bool = False  # delivered (delivering leases; a capacity-only one is ready from its grant)
    ready_at: float | None = None

    @property
    def state(self) -> str:
        """Exactly one of pending, provisioning, ready (docs/lifecycle.md, "Lease")."""
        if not self.confirmed:
            return "pending"
        return "provisioning" if self.deliver and not self.ready else "ready"


class Record(msgspec.Struct):
    """The registry's durable record of one pool (a KV entry)."""

    owner: str
    gen: int
    rev: int
    cap: int


def make_machine(url: str, counter: list[int]) -> type[RuleBasedStateMachine]:
    client = redis.Redis.from_url(url, decode_responses=True)
    pool_script = client.register_script(read_lua("services.registry.lua", "pool.lua"))
    reserve = client.register_script(read_lua("services.broker.lua", "reserve.lua"))
    end = client.register_script(read_lua("services.broker.lua", "end_lease.lua"))
    renew = client.register_script(read_lua("services.broker.lua", "renew.lua"))
    restore = client.register_script(read_lua("services.broker.lua", "restore.lua"))
    confirm = client.register_script(read_lua("services.broker.lua", "confirm.lua"))
    ready = client.register_script(read_lua("services.broker.lua", "lease_ready.lua"))

    class LeaseScripts(RuleBasedStateMachine):
        leases = Bundle("leases")

        @initialize(caps=st.lists(st.integers(1, 16), min_size=3, max_size=3))
        def setup(self, caps: list[int]) -> None:
            self.k = Keys(f"lp{uuid.uuid4().hex[:10]}")
            self.now = 1000.0
            self.revision = 0  # the bucket's last revision (the stream sequence)
            self.record: dict[str, Record | None] = dict.fromkeys(POOLS)
            self.online = dict.fromkeys(POOLS, True)
            self.draining = dict.fromkeys(POOLS, False)
            self.view: dict[str, int] = {}  # pool -> generation the broker's view holds
            self.peak: dict[tuple[str, int], int] = {}  # (pool, generation) -> highest capacity it had
            self.writes: list[tuple[str, list]] = []  # every registry write to Redis, to replay late
            self.live: dict[str, Live] = {}
            self.n_leases = 0
            self.ended: dict[str, str] = {}  # lease id -> how it ended (failed ones were never ready)
            self.seqs: dict[str, int] = {}  # lease id -> every seq it had, in order (strictly increasing)
            for p, cap in zip(POOLS, caps, strict=True):
                self.create(p, "acme", cap)
                self.view[p] = self.gen(p)
            client.set(self.k.leases_ready(REGION), "1")

        # --- the model ------------------------------------------------------------------
        def step(self) -> None:
            counter[0] += 1

        def pool(self, op: str, pool_id: str, *args: object, provider: str = "") -> list:
            k = self.k
            return pool_script(keys=[k.pool(REGION, pool_id), k.region_pools(REGION), k.heartbeats(REGION),
                                     k.pool_leases(REGION, pool_id), k.removed_pools(REGION)],
                               args=[op, self.now, pool_id, provider, *args])

        def present(self, pool_id: str) -> bool:
            return self.record[pool_id] is not None

        def gen(self, pool_id: str) -> int:
            r = self.record[pool_id]
            return r.gen if r else 0

        def cap(self, pool_id: str) -> int:
            r = self.record[pool_id]
            return r.cap if r else 0

        def leased(self, pool_id: str, gen: int | None = None) -> int:
            gen = self.gen(pool_id) if gen is None else gen
            return sum(lv.units for lv in self.live.values() if lv.pool == pool_id and lv.gen == gen)

        def bookable(self, pool_id: str) -> bool:
            return self.present(pool_id) and self.online[pool_id] and not self.draining[pool_id]

        def free_model(self, pool_id: str) -> int:
            return max(0, self.cap(pool_id) - self.leased(pool_id)) if self.bookable(pool_id) else 0

        def follow(self, pool_id: str, expect: int) -> None:
            """The registry writes the record's current state to Redis (``upsert``)."""
            r = self.record[pool_id]
            assert r is not None
            args = ["upsert", pool_id, r.cap, "{}", "m", r.owner, r.gen, r.rev]
            raw = self.pool(*args)
            assert int(raw[0]) == expect, (args, raw)
            self.writes.append((pool_id, args))
            self.online[pool_id] = True
            self.peak[(pool_id, r.gen)] = max(self.peak.get((pool_id, r.gen), 0), r.cap)

        def create(self, pool_id: str, owner: str, cap: int) -> None:
            """KV create (create-only) then Redis; the pool is a new generation."""
            assert self.record[pool_id] is None
            self.revision += 1
            self.record[pool_id] = Record(owner, self.revision, self.revision, cap)
            self.draining[pool_id] = False
            self.follow(pool_id, expect=2)

        def remove_record(self, pool_id: str) -> None:
            self.revision += 1  # the delete marker
            self.record[pool_id] = None

        # --- reservations ---------------------------------------------------------------
        def _reserve(self, mode: str, picks: list[tuple[str, int, str, bool, float, int]]) -> list:
            k = self.k
            keys = [k.lease_expiry(REGION), k.leases_ready(REGION), k.interruptible_leases(REGION)]
            args: list[object] = [1, mode, picks[0][4], len(picks)]  # one group: one placement in one region
            for pool_id, units, lease_id, interruptible, expiry, gen in picks:
                info = LeaseInfo(lease_id=lease_id, request_id="r", tenant="t", pool_id=pool_id, provider="acme",
                                 region=REGION, model="m", units=units,
                                 billing="interruptible" if interruptible else "on_demand",
                                 unit_price=Decimal(1), granted_at=datetime.now(UTC),
                                 expires_at=datetime.fromtimestamp(expiry, UTC), pool_generation=gen)
                keys += [k.pool(REGION, pool_id), k.pool_leases(REGION, pool_id), k.lease(REGION, lease_id)]
                args += [lease_id, units, msgspec.json.encode(info), int(interruptible), gen, 1000, ""]
            [reply] = reserve(keys=keys, args=args)
            return reply

        @rule(target=leases, picks=st.lists(st.tuples(st.sampled_from(POOLS), st.integers(1, 8)), min_size=1,
                                            max_size=3),
              ttl=st.integers(1, 100), interruptible=st.booleans(), deliver=st.booleans(),
              provision=st.integers(5, 80), confirmed=st.booleans())
        def reserve_all_or_none(self, picks: list[tuple[str, int]], ttl: int, interruptible: bool,
                                deliver: bool, provision: int, confirmed: bool) -> list[str]:
            """On the generation the broker's view holds; a group may name one pool twice."""
            self.step()
            expiry = self.now + ttl
            self.n_leases += len(picks)  # ids in order, not random: the answers' draws must replay the same
            full = [(p, u, f"l{self.n_leases - i:06d}", interruptible, expiry, self.view[p])
                    for i, (p, u) in enumerate(picks)]
            demand = Counter()
            for p, u in picks:
                demand[p] += u
            fits = all(self.view[p] == self.gen(p) and self.free_model(p) >= n for p, n in demand.items())
            raw = self._reserve("check", full)
            assert (int(raw[0]) == 1) == fits, (picks, raw, {p: self.free_model(p) for p in POOLS}, self.view)
            if not fits:
                assert not any(client.exists(self.k.lease(REGION, f[2])) for f in full)
                return []
            for i, (pool_id, units, lease_id, intr, _, gen) in enumerate(full):
                self.live[lease_id] = Live(pool_id, units, expiry, 1, intr, gen, deliver=deliver,
                                           deadline=self.now + provision if deliver else 0.0)
                self.seqs[lease_id] = [1]
                assert int(raw[1 + i]) == self.free_model(pool_id)  # free right after this allocation
            if confirmed:  # the broker's usual path: its grants durable at once, then confirmed
                self._confirm([f[2] for f in full], ttl)
            return [f[2] for f in full]

        def _end(self, lease_id: str, mode: str, state: str = "") -> list:
            pool_id = self.live[lease_id].pool if lease_id in self.live else "pa"
            k = self.k
            return end(keys=[k.lease_expiry(REGION), k.lease(REGION, lease_id), k.pool(REGION, pool_id),
                             k.pool_leases(REGION, pool_id), k.interruptible_leases(REGION),
                             k.lease_provisioning(REGION)],
                       args=[lease_id, mode, self.now, state])

        def _ended(self, lease_id: str, raw: list, how: str = "ended") -> None:
            """An ended lease: its next seq, and its pool's free units, or -1 when no pool
            of its generation is there (removed, or registered again since)."""
            lv = self.live.pop(lease_id)
            assert int(raw[2]) == lv.seq + 1
            self.seqs[lease_id].append(int(raw[2]))
            assert how != "failed" or not lv.ready, "a lease that was ready ended as failed"
            self.ended[lease_id] = how
            assert int(raw[4]) == (0 if lv.confirmed else 1)  # an unconfirmed lease says so when it ends
            same = self.present(lv.pool) and self.gen(lv.pool) == lv.gen
            assert int(raw[3]) == (self.free_model(lv.pool) if same else -1)

        @rule(ids=leases, mode=st.sampled_from(["release", "lost", "preempt", "revoke"]))
        def end_lease(self, ids: list[str], mode: str) -> None:
            self.step()
            for lease_id in ids:
                raw = self._end(lease_id, mode)
                assert (int(raw[0]) == 1) == (lease_id in self.live)
                if lease_id in self.live:
                    self._ended(lease_id, raw)

        @rule(dt=st.integers(1, 60))
        def time_passes(self, dt: int) -> None:
            """No sweep yet: answers (a late ready) may meet a lease past its deadline."""
            self.step()
            self.now += dt

        @rule(dt=st.integers(0, 60))
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
            # the provision-timeout sweep: every lease tried, only the overdue provisioning ones fail
            late = set(client.zrangebyscore(self.k.lease_provisioning(REGION), "-inf", self.now))
            assert late == {i for i, lv in self.live.items() if lv.state == "provisioning" and lv.deadline <= self.now}
            for lease_id, lv in list(self.live.items()):
                raw = self._end(lease_id, "timeout")
                assert (int(raw[0]) == 1) == (lease_id in late), (lease_id, lv, raw)
                if lease_id in late:
                    self._ended(lease_id, raw, "failed")
                elif lv.state != "provisioning":
                    assert raw[1] == lv.state  # refused with the state it is in

        def some_live(self, ids: list[str], data: st.DataObject) -> list[str]:
            """``ids`` (maybe long gone) and a few of the live leases (most bundle entries
            are refused reservations or ended leases: answers must meet live ones too)."""
            if not self.live:
                return ids
            return ids + data.draw(st.lists(st.sampled_from(sorted(self.live)), max_size=2))

        @rule(ids=leases, data=st.data())
        def provider_answers_ready(self, ids: list[str], data: st.DataObject) -> None:
            """provisioning → ready: only confirmed, provisioning, on its pool generation,
            before its deadline; refused with the reason otherwise, and nothing changes."""
            self.step()
            k = self.k
            for lease_id in self.some_live(ids, data):
                lv = self.live.get(lease_id)
                pool_id = lv.pool if lv else "pa"
                raw = ready(keys=[k.lease(REGION, lease_id), k.pool(REGION, pool_id), k.lease_provisioning(REGION)],
                            args=[lease_id, self.now])
                if lv is None:
                    want = "gone"
                elif lv.state != "provisioning":
                    want = lv.state
                elif not (self.present(lv.pool) and self.gen(lv.pool) == lv.gen):
                    want = "generation"
                elif lv.deadline <= self.now:
                    want = "deadline"
                else:
                    want = ""
                if want:
                    assert (int(raw[0]), raw[1]) == (0, want), (lease_id, lv, raw)
                    continue
                assert int(raw[0]) == 1 and int(raw[1]) == lv.seq + 1
                lv.seq, lv.ready, lv.ready_at = lv.seq + 1, True, self.now
                self.seqs[lease_id].append(lv.seq)

        @rule(ids=leases, how=st.sampled_from(["failed", "unhealthy"]), data=st.data())
        def provider_answers_failed_or_unhealthy(self, ids: list[str], how: str, data: st.DataObject) -> None:
            """failed: provisioning → failed; unhealthy: ready → lost. From any other
            state refused, with the state it is in."""
            self.step()
            mode, need = ("fail", "provisioning") if how == "failed" else ("lost", "ready")
            for lease_id in dict.fromkeys(self.some_live(ids, data)):
                lv = self.live.get(lease_id)
                raw = self._end(lease_id, mode, need)
                if lv is None:
                    assert [int(x) for x in raw] == [0]
                elif lv.state != need:
                    assert (int(raw[0]), raw[1]) == (0, lv.state)
                else:
                    assert int(raw[0]) == 1
                    self._ended(lease_id, raw, how)

        @rule(ids=leases, ttl=st.integers(1, 100))
        def broker_confirms(self, ids: list[str], ttl: int) -> None:
            """What the broker does once the grants are durable (``confirm.lua``): the real
            expiry, no pending mark; a lease already gone, or whose pool generation is gone,
            is reported, not confirmed (the broker fails that grant). A delivering lease is
            provisioning from its first confirmation, its deadline indexed."""
            self.step()
            self._confirm(ids, ttl)

        def _confirm(self, ids: list[str], ttl: int) -> None:
            k = self.k
            ids = list(dict.fromkeys(ids))
            expiry = self.now + ttl
            args: list[object] = [1, len(ids)]  # one group: the leases of one region
            keys = [k.lease_expiry(REGION), k.lease_provisioning(REGION)]
            for lease_id in ids:
                lv = self.live.get(lease_id)
                args += [lease_id, expiry, lv.deadline if lv is not None and lv.deliver else 0]
                pool_id = self.live[lease_id].pool if lease_id in self.live else "pa"
                keys += [k.lease(REGION, lease_id), k.pool(REGION, pool_id)]
            [raw] = confirm(keys=keys, args=args)

            def ok(i: str) -> bool:
                lv = self.live.get(i)
                return lv is not None and self.present(lv.pool) and self.gen(lv.pool) == lv.gen

            assert [int(x) for x in raw] == [int(ok(i)) for i in ids]
            for lease_id in ids:
                if ok(lease_id):
                    lv = self.live[lease_id]
                    lv.expiry, lv.confirmed = expiry, True  # a delivering one is provisioning now
                elif lease_id not in self.live:
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

        # --- the registry ---------------------------------------------------------------
        @rule(pool_id=st.sampled_from(POOLS), cap=st.integers(1, 16))
        def provider_changes_capacity(self, pool_id: str, cap: int) -> None:
            """PATCH: compare-and-set on the record, then Redis."""
            self.step()
            r = self.record[pool_id]
            if r is None:
                assert int(self.pool("patch", pool_id, cap, "{}", 1, self.revision + 1)[0]) == 0
                return
            self.revision += 1
            r.rev, r.cap = self.revision, cap
            args = ["patch", pool_id, cap, "{}", r.gen, r.rev]
            assert int(self.pool(*args)[0]) == 1
            self.writes.append((pool_id, args))
            self.peak[(pool_id, r.gen)] = max(self.peak[(pool_id, r.gen)], cap)

        @rule(pool_id=st.sampled_from(POOLS), online=st.booleans())
        def pool_goes_offline_or_online(self, pool_id: str, online: bool) -> None:
            self.step()
            if online:
                self.pool("heartbeat", pool_id, -2)
            else:
                self.now += 1
                raw = self.pool("expire", pool_id, self.now + 1)
                if self.present(pool_id) and self.online[pool_id]:  # the leases the outage takes
                    assert set(raw[8]) == {i for i, lv in self.live.items() if lv.pool == pool_id}
            if self.present(pool_id):
                self.online[pool_id] = online

        @rule(pool_id=st.sampled_from(POOLS), on=st.booleans())
        def provider_drains(self, pool_id: str, on: bool) -> None:
            self.step()
            self.pool("drain" if on else "undrain", pool_id)
            if self.present(pool_id):
                self.draining[pool_id] = on

        @rule(pool_id=st.sampled_from(POOLS), broker_hears=st.booleans())
        def pool_removed(self, pool_id: str, broker_hears: bool) -> None:
            """The record goes, then Redis (only the generation the record held). A broker
            that hears of it ends the leases the removal names; one that was down does not
            (yet): those leases live on, on a generation that is gone."""
            self.step()
            if not self.present(pool_id):
                assert int(self.pool("remove", pool_id, 0)[0]) == 0
                return
            gen = self.gen(pool_id)
            self.remove_record(pool_id)
            assert int(self.pool("remove", pool_id, gen + 1)[0]) == -2  # another generation: untouched
            raw = self.pool("remove", pool_id, gen)
            assert (int(raw[0]), int(raw[5]), int(raw[7])) == (1, self.leased(pool_id, gen), gen)
            named = set(raw[8])
            assert named == {i for i, lv in self.live.items() if lv.pool == pool_id}
            if broker_hears:
                for lease_id in sorted(named):
                    raw = self._end(lease_id, "lost")
                    assert int(raw[0]) == 1
                    self._ended(lease_id, raw)

        @rule(pool_id=st.sampled_from(POOLS), cap=st.integers(1, 16), owner=st.sampled_from(OWNERS),
              rival=st.one_of(st.none(), st.sampled_from(OWNERS)), broker_hears=st.booleans())
        def providers_register(self, pool_id: str, cap: int, owner: str, rival: str | None,
                               broker_hears: bool) -> None:
            """PUT, maybe with a rival PUT of the same id at the same moment: the record
            takes one create (the other, losing the compare-and-set, reads the winner's
            record: refused if another owner's, a replacement if the same owner's), and
            only what the record took reaches Redis."""
            self.step()
            for who in (owner, rival) if rival else (owner,):
                r = self.record[pool_id]
                if r is None:
                    self.create(pool_id, who, cap)
                elif r.owner == who:
                    self.revision += 1
                    r.rev, r.cap = self.revision, cap
                    self.follow(pool_id, expect=1)
                # else: refused (403) before anything is written
            if broker_hears:
                self.view[pool_id] = self.gen(pool_id)

        @rule(pool_id=st.sampled_from(POOLS), cap=st.integers(1, 16))
        def registered_again_over_a_missed_removal(self, pool_id: str, cap: int) -> None:
            """The record was removed and created again, but the removal never reached
            Redis (a registry crashed in between): the new generation replaces the old hash
            and names the old generation's leases, which the broker then ends."""
            self.step()
            r = self.record[pool_id]
            if r is None:
                return
            self.remove_record(pool_id)
            self.revision += 1
            self.record[pool_id] = Record(r.owner, self.revision, self.revision, cap)
            self.draining[pool_id] = False
            before = {i for i, lv in self.live.items() if lv.pool == pool_id}
            raw = self.pool("upsert", pool_id, cap, "{}", "m", r.owner, self.revision, self.revision)
            assert (int(raw[0]), int(raw[9]), set(raw[8])) == (2, r.gen, before)
            self.writes.append((pool_id, ["upsert", pool_id, cap, "{}", "m", r.owner, self.revision,
                                          self.revision]))
            self.online[pool_id] = True
            self.peak[(pool_id, self.revision)] = cap
            for lease_id in sorted(before):
                self._ended(lease_id, self._end(lease_id, "lost"))
            self.view[pool_id] = self.revision

        @rule(data=st.data())
        def a_slow_replica_writes_late(self, data: st.DataObject) -> None:
            """A registry write that reaches Redis after newer ones: it changes nothing."""
            self.step()
            if not self.writes:
                return
            pool_id, args = data.draw(st.sampled_from(self.writes))
            r = self.record[pool_id]
            if r is not None and (args[-2], args[-1]) == (r.gen, r.rev):
                return  # the latest write: not stale
            before = client.hgetall(self.k.pool(REGION, pool_id))
            # refused: an older revision or generation is there, or (the pool removed) a
            # removed generation, or nothing for a patch to change
            assert int(self.pool(*args)[0]) in ((3, -2) if r is not None else (3, 0))
            assert client.hgetall(self.k.pool(REGION, pool_id)) == before

        @rule(pool_id=st.sampled_from(POOLS))
        def broker_hears_of_pool(self, pool_id: str) -> None:
            self.step()
            if self.present(pool_id):
                self.view[pool_id] = self.gen(pool_id)

        @rule()
        def redis_lost_and_rebuilt(self) -> None:
            """Everything of this deployment gone; the registry puts pools back from its
            record, the broker restores every unexpired lease with its seq and generation;
            until then a reservation is refused rather than booked over the lost leases."""
            self.step()
            stale = list(client.scan_iter(match=f"{self.k.prefix}:*", count=10_000))
            if stale:
                client.delete(*stale)
            self.writes = []  # what Redis remembered of removed generations is gone with it
            for p in POOLS:
                if self.present(p):
                    self.follow(p, expect=2)
                    self.draining[p] = False
            if any(self.bookable(p) for p in POOLS):
                p = next(p for p in POOLS if self.bookable(p))
                assert int(self._reserve("check", [(p, 1, "probe", False, self.now + 5, self.gen(p))])[0]) == -1
            self.live = {i: lv for i, lv in self.live.items() if lv.expiry > self.now}
            for lv in self.live.values():
                lv.confirmed = True  # restored from the durable record: nothing pending
            k = self.k
            keys, args = [k.lease_expiry(REGION), k.interruptible_leases(REGION), k.lease_provisioning(REGION)], []
            for lease_id, lv in self.live.items():
                keys += [k.pool(REGION, lv.pool), k.pool_leases(REGION, lv.pool), k.lease(REGION, lease_id)]
                state = "" if not lv.deliver else ("ready" if lv.ready else "provisioning")
                args += [lease_id, lv.units, "{}", int(lv.interruptible), lv.expiry, lv.seq, lv.gen, state,
                         lv.deadline if state == "provisioning" else 0, lv.ready_at if lv.ready else "", 1000, ""]
            if self.live:
                assert restore(keys=keys, args=args) == len(self.live)
                assert restore(keys=keys, args=args) == 0  # restoring twice changes nothing
            client.set(self.k.leases_ready(REGION), "1")

        # --- what must hold after every step (read in one round trip) -------------------------
        @invariant()
        def redis_matches_model(self) -> None:
            k = self.k
            pipe = client.pipeline(transaction=False)
            for pool_id in POOLS:
                pipe.hgetall(k.pool(REGION, pool_id))
                pipe.smembers(k.pool_leases(REGION, pool_id))
            pipe.zrange(k.lease_expiry(REGION), 0, -1)
            pipe.smembers(k.interruptible_leases(REGION))
            ids = list(self.live)
            pipe.zrange(k.lease_provisioning(REGION), 0, -1, withscores=True)
            for lease_id in ids:
                pipe.hmget(k.lease(REGION, lease_id), "units", "seq", "expires", "generation", "state", "pending")
            replies = pipe.execute()
            for n, pool_id in enumerate(POOLS):
                h, members = replies[2 * n], replies[2 * n + 1]
                assert members == {i for i, lv in self.live.items() if lv.pool == pool_id}
                r = self.record[pool_id]
                if r is None:
                    assert h == {}
                    continue
                assert (h["provider"], int(h["generation"]), int(h["rev"])) == (r.owner, r.gen, r.rev)
                assert int(h["leased"]) == self.leased(pool_id)
                assert int(h["free"]) == self.free_model(pool_id) >= 0
                assert int(h["overcommit"]) == max(0, self.leased(pool_id) - r.cap)
            expiring, interruptible = replies[2 * len(POOLS)], replies[2 * len(POOLS) + 1]
            provisioning = dict(replies[2 * len(POOLS) + 2])
            assert set(expiring) == set(self.live)
            assert interruptible == {i for i, lv in self.live.items() if lv.interruptible}
            # the sweep's index holds exactly the provisioning leases, by their deadlines
            assert provisioning == {i: lv.deadline for i, lv in self.live.items() if lv.state == "provisioning"}
            for lease_id, (units, seq, expires, gen, state, pending) in zip(ids, replies[2 * len(POOLS) + 3:],
                                                                            strict=True):
                lv = self.live[lease_id]
                assert (int(units), int(seq), float(expires), int(gen)) == (lv.units, lv.seq, lv.expiry, lv.gen)
                # one state each: pending (no state yet), provisioning, or ready (a capacity-only
                # lease has no state field: ready from its grant)
                held = "pending" if pending else (state or "ready")
                assert held == lv.state, (lease_id, held, lv)
                assert (state is None) == (lv.state == "pending" or not lv.deliver)
            for lease_id, seqs in self.seqs.items():
                assert all(a < b for a, b in zip(seqs, seqs[1:])), (lease_id, seqs)
                assert lease_id not in self.ended or lease_id not in self.live
            # the invariant of issue 11: no pool generation leased beyond the capacity it had
            for (pool_id, gen), peak in self.peak.items():
                assert self.leased(pool_id, gen) <= peak, (pool_id, gen)

        def teardown(self) -> None:
            if hasattr(self, "k"):
                stale = list(client.scan_iter(match=f"{self.k.prefix}:*", count=10_000))
                if stale:
                    client.delete(*stale)

    return LeaseScripts


def test_lease_scripts_match_model(redis_url: str) -> None:
    steps = run_machine(make_machine, redis_url, examples=200, steps=100, min_steps=MIN_STEPS)
    assert steps >= MIN_STEPS, f"only {steps} steps ran"


@pytest.mark.slow
def test_lease_scripts_soak(redis_url: str) -> None:
    """``CB_SOAK_EXAMPLES`` runs of 200 steps (default 2,000: about 300,000 steps)."""
    examples = int(os.environ.get("CB_SOAK_EXAMPLES", "2000"))
    assert run_machine(make_machine, redis_url, examples=examples, steps=200) >= examples * 100
