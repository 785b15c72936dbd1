"""Stateful property test of device shares (issue 14) over the real scripts on a real
redis-server: the registry's pool script (a sharing pool's per-device hash follows its
record: created, grown, shrunk, removed) and the broker's reserve, end_lease and restore
scripts.

In any order of: shares and whole-device asks (alone, or several in one all-or-none
group, so fractional and whole asks on one pool contend in one step), with a device hint
that may be good, stale or absent, releases, capacity changes under live leases, healthy
units reported, pools removed and registered again under a live share lease, and Redis
lost and rebuilt from the record and the leases: no device ever has more than 1000 milli
taken, a whole-device lease never shares its device, a release gives back exactly what
was taken (to the same devices of the same generation only), the pool's whole free units
count the wholly free devices, and every choice follows the rule of lua/reserve.lua."""

from __future__ import annotations

import itertools
import os
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import msgspec
import redis
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from services.common.keys import Keys
from services.common.messages import LeaseInfo
from services.common.redis_conn import read_lua

from ..helpers import own_db, run_machine

REGION = "cn-gz"
SHARING = ("sa", "sb")  # pools that share their devices
POOLS = (*SHARING, "pn")  # pn does not share
MILLI = 1000
MIN_STEPS = 3_000
MIN_MILLI = {"sb": 200}  # its shares are never smaller (sharing.min_milli)
MAX_MILLI = {"sb": 750}  # ... nor larger (sharing.max_milli): slices only, never a whole device


class Held(msgspec.Struct):
    pool: str
    gen: int
    milli: int
    devices: tuple[int, ...]  # empty on a pool that does not share
    units: int


class Spec(msgspec.Struct):
    gen: int
    cap: int
    upn: int
    healthy: int = -1  # -1: no heartbeat said


def record(pool: str, cap: int, upn: int) -> str:
    """The parts of a pool record (services.common.messages.Pool) the pool script reads."""
    mode = "none" if pool not in SHARING else ("time_slice" if pool == "sa" else "memory")
    return msgspec.json.encode({"pool_id": pool, "spec": {"units": cap, "units_per_node": upn, "sharing": {
        "mode": mode, "min_milli": MIN_MILLI.get(pool, 1), "max_milli": MAX_MILLI.get(pool, MILLI)}}}).decode()


def make_machine(url: str, counter: list[int]) -> type[RuleBasedStateMachine]:
    client = redis.Redis.from_url(url, decode_responses=True)
    pool_script = client.register_script(read_lua("services.registry.lua", "pool.lua"))
    reserve = client.register_script(read_lua("services.broker.lua", "reserve.lua"))
    end = client.register_script(read_lua("services.broker.lua", "end_lease.lua"))
    restore = client.register_script(read_lua("services.broker.lua", "restore.lua"))
    preempt = client.register_script(read_lua("services.broker.lua", "preempt.lua"))

    class ShareScripts(RuleBasedStateMachine):
        @initialize(caps=st.lists(st.integers(1, 12), min_size=3, max_size=3),
                    upns=st.lists(st.sampled_from([1, 2, 4, 8]), min_size=3, max_size=3))
        def setup(self, caps: list[int], upns: list[int]) -> None:
            self.k = Keys(f"sp{uuid.uuid4().hex[:10]}")
            self.now, self.revision = 1000.0, 0
            self.spec: dict[str, Spec | None] = dict.fromkeys(POOLS)
            self.held: dict[str, Held] = {}
            self.ids = itertools.count()  # per run: draws must replay the same
            for p, cap, upn in zip(POOLS, caps, upns, strict=True):
                self.register(p, cap, upn)
            client.set(self.k.leases_ready(REGION), "1")

        # --- the model --------------------------------------------------------------------
        def pool(self, op: str, pool_id: str, *args: object) -> list:
            k = self.k
            return pool_script(keys=[k.pool(REGION, pool_id), k.region_pools(REGION), k.heartbeats(REGION),
                                     k.pool_leases(REGION, pool_id), k.removed_pools(REGION)],
                               args=[op, self.now, pool_id, "", *args])

        def register(self, pool_id: str, cap: int, upn: int) -> None:
            self.revision += 1
            self.spec[pool_id] = Spec(self.revision, cap, upn)
            raw = self.pool("upsert", pool_id, cap, record(pool_id, cap, upn), "m", "acme", self.revision,
                            self.revision)
            assert int(raw[0]) == 2, raw

        def used(self, pool_id: str) -> dict[int, int]:
            """Milli taken per device of the pool's current generation."""
            spec, out = self.spec[pool_id], {}
            for h in self.held.values():
                if spec is not None and h.pool == pool_id and h.gen == spec.gen:
                    for d in h.devices:
                        out[d] = out.get(d, 0) + h.milli
            return out

        def device_free(self, pool_id: str) -> dict[int, int]:
            """Free milli per device the hash must hold: 0..cap-1, and past a shrunk
            capacity the devices still (partly) taken."""
            spec, used = self.spec[pool_id], self.used(pool_id)
            assert spec is not None
            out = {d: MILLI - used.get(d, 0) for d in range(spec.cap)}
            out.update({d: MILLI - u for d, u in used.items() if d >= spec.cap and u > 0})
            return out

        def wholes(self, pool_id: str) -> int:
            """The pool's free units: wholly free devices, less what the healthy count takes."""
            spec = self.spec[pool_id]
            if spec is None:
                return 0
            effective = spec.cap if spec.healthy < 0 else min(spec.cap, spec.healthy)
            if pool_id in SHARING:
                in_use = sum(1 for f in self.device_free(pool_id).values() if f < MILLI)
            else:
                in_use = sum(h.units for h in self.held.values() if h.pool == pool_id and h.gen == spec.gen)
            return max(0, effective - in_use)

        def lease_info(self, lease_id: str, pool_id: str, units: int, milli: int, gen: int) -> bytes:
            now = datetime.now(UTC)
            return msgspec.json.encode(LeaseInfo(
                lease_id=lease_id, request_id="r", tenant="t", pool_id=pool_id, provider="acme", region=REGION,
                model="m", units=units, billing="on_demand", unit_price=Decimal(1), granted_at=now,
                expires_at=now, pool_generation=gen, milli=milli))

        def reserve_group(self, asks: list[tuple[str, int, int, str]]) -> list:
            """One all-or-none group of ``(pool, units, milli, hint)``."""
            k = self.k
            keys = [k.lease_expiry(REGION), k.leases_ready(REGION), k.interruptible_leases(REGION)]
            args: list[object] = [1, "check", self.now + 30, len(asks)]
            self.asked = []
            for pool_id, units, milli, hint in asks:
                lease_id = f"l{next(self.ids):05d}"
                gen = self.spec[pool_id].gen if self.spec[pool_id] else 1
                self.asked.append(lease_id)
                keys += [k.pool(REGION, pool_id), k.pool_leases(REGION, pool_id), k.lease(REGION, lease_id)]
                args += [lease_id, units, self.lease_info(lease_id, pool_id, units, milli, gen), 1, gen, milli, hint]
            [reply] = reserve(keys=keys, args=args)
            return reply

        def fits(self, pool_id: str, units: int, milli: int, free: dict[int, int], wholes: int) -> bool:
            spec = self.spec[pool_id]
            if spec is None:
                return False
            if pool_id not in SHARING:
                return milli == MILLI and units <= wholes
            if milli > MAX_MILLI.get(pool_id, MILLI):
                return False
            if milli < MILLI:
                if milli < MIN_MILLI.get(pool_id, 1):
                    return False
                return any(free[d] >= milli and (free[d] < MILLI or wholes >= 1) for d in range(spec.cap))
            per_node: dict[int, int] = {}
            for d in range(spec.cap):
                if free[d] == MILLI:
                    per_node[d // spec.upn] = per_node.get(d // spec.upn, 0) + 1
            if units > wholes:
                return False
            return units > spec.upn or any(c >= units for c in per_node.values())

        def check_choice(self, pool_id: str, units: int, milli: int, hint: str, devices: tuple[int, ...],
                         free: dict[int, int]) -> None:
            """The devices taken follow the rule of lua/reserve.lua."""
            spec = self.spec[pool_id]
            assert spec is not None
            assert len(devices) == units and len(set(devices)) == units
            assert all(d < spec.cap for d in devices)
            if milli < MILLI:
                [d] = devices
                assert free[d] >= milli
                hinted = int(hint) if hint.lstrip("-").isdigit() else -1
                if 0 <= hinted < spec.cap and free[hinted] >= milli and free[hinted] < MILLI:
                    assert d == hinted, (d, hint, free)
                elif not (0 <= hinted < spec.cap and free[hinted] >= milli):
                    partial = [f for d, f in free.items() if d < spec.cap and milli <= f < MILLI]
                    if partial:  # best fit: the partly taken device with the least free milli that fits
                        assert free[d] == min(partial), (d, free, milli)
            else:
                assert all(free[d] == MILLI for d in devices)  # never a whole device with a share on it
                if units <= spec.upn:
                    assert len({d // spec.upn for d in devices}) == 1  # one node

        def step(self) -> None:
            counter[0] += 1

        # --- rules --------------------------------------------------------------------------
        @rule(pool_id=st.sampled_from(POOLS), milli=st.sampled_from([1, 100, 250, 333, 500, 750, 999]),
              hint=st.sampled_from(["", "-1", "0", "1", "3", "7", "11"]))
        def share(self, pool_id: str, milli: int, hint: str) -> None:
            self.asks([(pool_id, 1, milli, hint)])

        @rule(pool_id=st.sampled_from(POOLS), units=st.integers(1, 6), hint=st.sampled_from(["", "0", "0,1", "2,3"]))
        def whole(self, pool_id: str, units: int, hint: str) -> None:
            self.asks([(pool_id, units, MILLI, hint if len(hint.split(",")) == units else "")])

        @rule(asks=st.lists(st.tuples(st.sampled_from(SHARING), st.sampled_from([(1, 300), (1, 700), (2, MILLI),
                                                                                 (1, MILLI), (1, 150)])),
                            min_size=2, max_size=4))
        def contending(self, asks: list[tuple[str, tuple[int, int]]]) -> None:
            """Fractional and whole asks on the same pools in one all-or-none step."""
            self.asks([(p, units, milli, "") for p, (units, milli) in asks])

        def asks(self, asks: list[tuple[str, int, int, str]]) -> None:
            self.step()
            free = {p: self.device_free(p) for p in SHARING if self.spec[p] is not None}
            wholes = {p: self.wholes(p) for p in POOLS}
            reply = self.reserve_group(asks)
            expect_ok = True
            for pool_id, units, milli, _ in asks:  # the model's own fit, taking each ask in turn
                if self.spec[pool_id] is None or not self.fits(pool_id, units, milli, free.get(pool_id, {}),
                                                               wholes[pool_id]):
                    expect_ok = False
                    break
                if pool_id not in SHARING:
                    wholes[pool_id] -= units
                    continue
                # the script's own choice is checked below; here: any legal choice for the model
                # of the rest, so the fit of later asks is judged on the devices it really took
                break
            if int(reply[0]) == 0:
                i = int(reply[1]) - 1
                pool_id, units, milli, _ = asks[i]
                if milli < MILLI and (pool_id not in SHARING or milli < MIN_MILLI.get(pool_id, 1)) \
                        or pool_id in SHARING and milli > MAX_MILLI.get(pool_id, MILLI):
                    assert reply[3] == "sharing", reply  # this pool takes no such share (or whole device)
                if len(reply) > 4:  # no device fitted: the devices as they are, for the broker's view
                    spec = self.spec[pool_id]
                    assert spec is not None
                    assert [int(x) for x in reply[4]] == [self.device_free(pool_id)[d] for d in range(spec.cap)]
                if len(asks) == 1:
                    assert not expect_ok, (asks, reply, free, wholes)
                assert not any(client.exists(self.k.lease(REGION, lid)) for lid in self.asked)
                return
            assert int(reply[0]) == 1, reply
            if len(asks) == 1:
                assert expect_ok, (asks, reply, free, wholes)
            for (pool_id, units, milli, hint), lease_id, out in zip(asks, self.asked, reply[1:], strict=True):
                spec = self.spec[pool_id]
                assert spec is not None
                if pool_id in SHARING:
                    assert isinstance(out, list), out
                    devices = tuple(int(d) for d in out[1])
                    self.check_choice(pool_id, units, milli, hint, devices, free[pool_id])
                    for d in devices:
                        free[pool_id][d] -= milli
                    assert [int(x) for x in out[2]] == [free[pool_id][d] for d in devices]
                    info = msgspec.json.decode(client.hget(self.k.lease(REGION, lease_id), "info"), type=LeaseInfo)
                    assert info.devices == devices and info.milli == milli
                else:
                    assert milli == MILLI
                    devices = ()
                self.held[lease_id] = Held(pool_id, spec.gen, milli, devices, units)
            for pool_id, _, _, _ in asks:
                assert self.wholes(pool_id) >= 0

        @precondition(lambda self: self.held)
        @rule(data=st.data())
        def release(self, data: st.DataObject) -> None:
            self.step()
            lease_id = data.draw(st.sampled_from(sorted(self.held)))
            h = self.held.pop(lease_id)
            k = self.k
            raw = end(keys=[k.lease_expiry(REGION), k.lease(REGION, lease_id), k.pool(REGION, h.pool),
                            k.pool_leases(REGION, h.pool), k.interruptible_leases(REGION),
                            k.lease_provisioning(REGION)], args=[lease_id, "release", self.now, ""])
            assert int(raw[0]) == 1
            spec = self.spec[h.pool]
            if spec is not None and spec.gen == h.gen and h.devices:
                free = self.device_free(h.pool)  # after the release: exactly what it took came back
                assert [int(x) for x in raw[5]] == [free.get(d, MILLI) for d in h.devices]
            else:
                assert list(raw[5]) == []  # another generation's devices are not touched

        @precondition(lambda self: self.held)
        @rule(data=st.data(), pool_id=st.sampled_from(POOLS),
              ask=st.sampled_from([(1, MILLI), (2, MILLI), (3, MILLI), (1, 100), (1, 400), (1, 900)]),
              hint=st.sampled_from(["", "0", "1", "2"]))
        def preempt_for(self, data: st.DataObject, pool_id: str, ask: tuple[int, int], hint: str) -> None:
            """A live lease (all are interruptible here) ends for a new lease, in one step:
            the victim gives back exactly its milli on its devices, and the new lease takes
            devices by the rule of lua/reserve.lua among the devices as they are with the
            victim's milli back."""
            self.step()
            victim = data.draw(st.sampled_from(sorted(self.held)))
            units, milli = ask
            spec = self.spec[pool_id]
            assert spec is not None
            h = self.held.pop(victim)  # the model with the victim gone
            free = self.device_free(pool_id) if pool_id in SHARING else {}
            fits = self.fits(pool_id, units, milli, free, self.wholes(pool_id))
            self.held[victim] = h
            k, lease_id = self.k, f"l{next(self.ids):05d}"
            keys = [k.lease_expiry(REGION), k.leases_ready(REGION), k.interruptible_leases(REGION),
                    k.pool(REGION, h.pool), k.pool_leases(REGION, h.pool), k.lease(REGION, victim),
                    k.pool(REGION, pool_id), k.pool_leases(REGION, pool_id), k.lease(REGION, lease_id),
                    k.lease_provisioning(REGION)]
            raw = preempt(keys=keys, args=[1, 1, self.now + 30, victim, lease_id, units,
                                           self.lease_info(lease_id, pool_id, units, milli, spec.gen), 1, spec.gen,
                                           milli, hint])
            assert (int(raw[0]) == 1) == fits, (raw, pool_id, units, milli, free)
            if int(raw[0]) != 1:
                return
            self.held.pop(victim)
            [placed], [ended] = raw[1], raw[2]
            devices: tuple[int, ...] = ()
            if pool_id in SHARING:
                devices = tuple(int(d) for d in placed[1])
                self.check_choice(pool_id, units, milli, hint, devices, free)
                info = msgspec.json.decode(client.hget(k.lease(REGION, lease_id), "info"), type=LeaseInfo)
                assert info.devices == devices
            self.held[lease_id] = Held(pool_id, spec.gen, milli, devices, units)
            if pool_id in SHARING:
                after = self.device_free(pool_id)
                assert [int(x) for x in placed[2]] == [after[d] for d in devices]
            vspec = self.spec[h.pool]
            if h.devices and vspec is not None and vspec.gen == h.gen and h.pool != pool_id:
                after = self.device_free(h.pool)
                assert [int(x) for x in ended[4]] == [after.get(d, MILLI) for d in h.devices]

        @rule(pool_id=st.sampled_from(POOLS), cap=st.integers(1, 12))
        def resize(self, pool_id: str, cap: int) -> None:
            """A patch of the record's capacity under live leases."""
            self.step()
            spec = self.spec[pool_id]
            if spec is None:
                return
            self.revision += 1
            spec.cap = cap
            raw = self.pool("patch", pool_id, cap, record(pool_id, cap, spec.upn), spec.gen, self.revision)
            assert int(raw[0]) == 1, raw

        @rule(pool_id=st.sampled_from(POOLS), healthy=st.integers(0, 12))
        def heartbeat(self, pool_id: str, healthy: int) -> None:
            self.step()
            spec = self.spec[pool_id]
            if spec is None:
                return
            spec.healthy = healthy
            assert int(self.pool("heartbeat", pool_id, healthy)[0]) == 1

        @rule(pool_id=st.sampled_from(POOLS), cap=st.integers(1, 12), upn=st.sampled_from([1, 2, 4]))
        def remove_and_register(self, pool_id: str, cap: int, upn: int) -> None:
            """The pool goes with its live leases' state (they stay live in Redis until the
            broker ends them) and comes back as a new generation, all devices free."""
            self.step()
            spec = self.spec[pool_id]
            if spec is not None:
                raw = self.pool("remove", pool_id, spec.gen)
                assert int(raw[0]) == 1
                assert not client.exists(self.k.pool_devices(REGION, pool_id))
                self.spec[pool_id] = None
            self.register(pool_id, cap, upn)

        @rule()
        def redis_lost(self) -> None:
            """Every key gone; the registry writes its records again, then the broker
            restores the live leases from the allocation stream (their devices with them)."""
            self.step()
            for key in client.scan_iter(f"{self.k.prefix}:*", count=1000):
                client.delete(key)
            for pool_id, spec in self.spec.items():
                if spec is None:
                    continue
                raw = self.pool("upsert", pool_id, spec.cap, record(pool_id, spec.cap, spec.upn), "m", "acme",
                                spec.gen, self.revision)
                assert int(raw[0]) == 2
                if spec.healthy >= 0:
                    self.pool("heartbeat", pool_id, spec.healthy)
            k = self.k
            keys, args = [k.lease_expiry(REGION), k.interruptible_leases(REGION), k.lease_provisioning(REGION)], []
            for lease_id, h in self.held.items():
                keys += [k.pool(REGION, h.pool), k.pool_leases(REGION, h.pool), k.lease(REGION, lease_id)]
                args += [lease_id, h.units, self.lease_info(lease_id, h.pool, h.units, h.milli, h.gen), 1,
                         self.now + 3600, 1, h.gen, "", 0, "", h.milli, ",".join(map(str, h.devices))]
            if self.held:
                assert restore(keys=keys, args=args) == len(self.held)
            client.set(k.leases_ready(REGION), "1")

        # --- invariants ---------------------------------------------------------------------
        @invariant()
        def devices_match_the_model(self) -> None:
            if not hasattr(self, "k"):
                return
            for pool_id in POOLS:
                spec = self.spec[pool_id]
                key = self.k.pool_devices(REGION, pool_id)
                if spec is None or pool_id not in SHARING:
                    assert not client.exists(key)
                    continue
                have = {int(d): int(f) for d, f in client.hgetall(key).items()}
                assert all(0 <= f <= MILLI for f in have.values()), have  # never more than 1000 milli taken
                assert have == self.device_free(pool_id), (pool_id, have, self.device_free(pool_id))

        @invariant()
        def whole_leases_share_no_device(self) -> None:
            """Read from Redis: per device, the leases on it (current generation) take at
            most 1000 milli, and a whole-device lease is alone there."""
            if not hasattr(self, "k"):
                return
            for pool_id in SHARING:
                spec = self.spec[pool_id]
                if spec is None:
                    continue
                on: dict[int, list[int]] = {}
                for lease_id in client.smembers(self.k.pool_leases(REGION, pool_id)):
                    f = client.hmget(self.k.lease(REGION, lease_id), "generation", "milli", "devices")
                    if f[2] is None or int(f[0]) != spec.gen:
                        continue
                    for d in f[2].split(","):
                        on.setdefault(int(d), []).append(int(f[1]))
                for d, millis in on.items():
                    assert sum(millis) <= MILLI, (pool_id, d, millis)
                    assert MILLI not in millis or len(millis) == 1, (pool_id, d, millis)

        @invariant()
        def free_counts_wholly_free_devices(self) -> None:
            if not hasattr(self, "k"):
                return
            for pool_id in POOLS:
                if self.spec[pool_id] is not None:
                    assert int(client.hget(self.k.pool(REGION, pool_id), "free")) == self.wholes(pool_id), pool_id

    return ShareScripts


def test_share_scripts_match_model(redis_url: str) -> None:
    steps = run_machine(make_machine, redis_url, examples=int(os.environ.get("SHARE_EXAMPLES", "100")), steps=60,
                        min_steps=MIN_STEPS)
    assert steps >= MIN_STEPS, steps


def test_concurrent_fractional_and_whole_asks_never_overbook_a_device(redis_url: str) -> None:
    """Eight clients at once, each reserving shares and whole devices on one pool and
    releasing some: afterwards, per device, the live leases' milli add up to what the
    device has taken, at most 1000, a whole lease is alone on its devices, and once all
    are released every device is wholly free again."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    url = own_db(redis_url)
    k, pool_id, cap, upn = Keys(f"sc{uuid.uuid4().hex[:8]}"), "sa", 16, 4
    admin = redis.Redis.from_url(url, decode_responses=True)
    admin.set(k.leases_ready(REGION), "1")
    raw = admin.register_script(read_lua("services.registry.lua", "pool.lua"))(
        keys=[k.pool(REGION, pool_id), k.region_pools(REGION), k.heartbeats(REGION), k.pool_leases(REGION, pool_id),
              k.removed_pools(REGION)],
        args=["upsert", 1000, pool_id, "", cap, record(pool_id, cap, upn), "m", "acme", 1, 1])
    assert int(raw[0]) == 2

    def client_run(n: int) -> list[tuple[str, int, int]]:
        """Reserve and release at random; returns the leases it kept (id, milli, units)."""
        rnd, client = random.Random(n), redis.Redis.from_url(url, decode_responses=True)
        reserve = client.register_script(read_lua("services.broker.lua", "reserve.lua"))
        end = client.register_script(read_lua("services.broker.lua", "end_lease.lua"))
        kept: list[tuple[str, int, int]] = []
        now = datetime.now(UTC)
        for i in range(150):
            if kept and rnd.random() < 0.4:
                lease_id, _, _ = kept.pop(rnd.randrange(len(kept)))
                out = end(keys=[k.lease_expiry(REGION), k.lease(REGION, lease_id), k.pool(REGION, pool_id),
                                k.pool_leases(REGION, pool_id), k.interruptible_leases(REGION),
                                k.lease_provisioning(REGION)], args=[lease_id, "release", 0, ""])
                assert int(out[0]) == 1
                continue
            units, milli = rnd.choice([(1, 100), (1, 250), (1, 500), (1, 900), (1, MILLI), (2, MILLI), (4, MILLI)])
            lease_id = f"c{n}-{i}"
            info = msgspec.json.encode(LeaseInfo(
                lease_id=lease_id, request_id="r", tenant="t", pool_id=pool_id, provider="acme", region=REGION,
                model="m", units=units, billing="on_demand", unit_price=Decimal(1), granted_at=now, expires_at=now,
                pool_generation=1, milli=milli))
            [out] = reserve(keys=[k.lease_expiry(REGION), k.leases_ready(REGION), k.interruptible_leases(REGION),
                                  k.pool(REGION, pool_id), k.pool_leases(REGION, pool_id), k.lease(REGION, lease_id)],
                            args=[1, "check", 10**10, 1, lease_id, units, info, 0, 1, milli, str(rnd.randrange(-1, cap))])
            if int(out[0]) == 1:
                kept.append((lease_id, milli, units))
        return kept

    with ThreadPoolExecutor(8) as pool:
        kept = [lease for leases in pool.map(client_run, range(8)) for lease in leases]
    taken: dict[int, list[int]] = {}
    for lease_id, milli, units in kept:
        devices = [int(d) for d in admin.hget(k.lease(REGION, lease_id), "devices").split(",")]
        assert len(devices) == units
        for d in devices:
            taken.setdefault(d, []).append(milli)
    have = {int(d): int(f) for d, f in admin.hgetall(k.pool_devices(REGION, pool_id)).items()}
    assert set(have) == set(range(cap))
    for d in range(cap):
        millis = taken.get(d, [])
        assert sum(millis) <= MILLI and have[d] == MILLI - sum(millis), (d, millis, have[d])
        assert MILLI not in millis or len(millis) == 1, (d, millis)
    assert int(admin.hget(k.pool(REGION, pool_id), "free")) == sum(1 for f in have.values() if f == MILLI)
    assert kept, "nothing was kept: the test exercised nothing"
    end = admin.register_script(read_lua("services.broker.lua", "end_lease.lua"))
    for lease_id, _, _ in kept:
        end(keys=[k.lease_expiry(REGION), k.lease(REGION, lease_id), k.pool(REGION, pool_id),
                  k.pool_leases(REGION, pool_id), k.interruptible_leases(REGION), k.lease_provisioning(REGION)],
            args=[lease_id, "release", 0, ""])
    assert {int(f) for f in admin.hgetall(k.pool_devices(REGION, pool_id)).values()} == {MILLI}
    assert int(admin.hget(k.pool(REGION, pool_id), "free")) == cap
