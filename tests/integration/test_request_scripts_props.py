"""Stateful property test of the request lifecycle's scripts (queue, claim, settle,
cancel/expire) with the lease scripts they interleave with (reserve, confirm, end) and
preemption (``preempt.lua``), against a real redis-server, in any interleaving of:

* tenants queueing and cancelling requests, deadlines passing;
* two or more queue runners claiming, reserving, settling (or giving back);
* a claimer that crashes mid-placement (its claim expires, its unconfirmed lease is swept);
* preemptors that pick victims from what they read, then act later (another preemptor
  or a concurrent request may have moved first, on the same victims or units).

Invariants after every step: a request is placed at most once; a cancelled or expired
request never holds a confirmed lease; a pool is never leased beyond its capacity;
Redis matches a plain model (request states, leases, pool numbers).

The default run takes at least ``MIN_STEPS`` steps (counted); ``-m slow`` runs the soak."""

from __future__ import annotations

import itertools
import uuid
from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal
from importlib import resources

import msgspec
import pytest
import redis
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from services.common.keys import Keys
from services.common.messages import LeaseInfo
from services.common.redis_conn import read_lua

from ..helpers import own_db

REGION = "cn-gz"
POOLS = ("pa", "pb")
CLAIM_S = 60
PENDING_S = 30
MIN_STEPS = 20_000


def _lua(name: str) -> str:
    return resources.files("services.broker.lua").joinpath(name).read_text()


class Req(msgspec.Struct):
    state: str = "queued"
    token: str = ""
    until: float = 0.0
    placements: int = 0


class Live(msgspec.Struct):
    pool: str
    units: int
    request: str
    interruptible: bool
    pending: bool
    expiry: float


class Claimed(msgspec.Struct):
    request: str
    token: str
    lease: str = ""


class Intent(msgspec.Struct):
    victims: list[str]
    pool: str
    units: int


def make_machine(url: str, seen: Counter[str]) -> type[RuleBasedStateMachine]:
    client = redis.Redis.from_url(url, decode_responses=True)
    queue_s = client.register_script(_lua("queue_request.lua"))
    claim_s = client.register_script(_lua("claim_request.lua"))
    settle_s = client.register_script(_lua("settle_request.lua"))
    cancel_s = client.register_script(_lua("cancel_request.lua"))
    pool_s = client.register_script(read_lua("services.registry.lua", "pool.lua"))
    reserve_s = client.register_script(read_lua("services.broker.lua", "reserve.lua"))
    confirm_s = client.register_script(read_lua("services.broker.lua", "confirm.lua"))
    end_s = client.register_script(read_lua("services.broker.lua", "end_lease.lua"))
    preempt_s = client.register_script(read_lua("services.broker.lua", "preempt.lua"))

    class RequestScripts(RuleBasedStateMachine):
        requests = Bundle("requests")
        claims = Bundle("claims")
        reserved = Bundle("reserved")
        intents = Bundle("intents")

        @initialize(caps=st.lists(st.integers(2, 12), min_size=2, max_size=2))
        def setup(self, caps: list[int]) -> None:
            self.k = Keys(f"rq{uuid.uuid4().hex[:10]}")
            self.ids = itertools.count()  # per example: a replay must see the same ids
            self.now = 1000.0
            self.cap = dict(zip(POOLS, caps, strict=True))
            self.reqs: dict[str, Req] = {}
            self.live: dict[str, Live] = {}
            for p in POOLS:
                pool_s(keys=[self.k.pool(REGION, p), self.k.region_pools(REGION), self.k.heartbeats(REGION),
                             self.k.pool_leases(REGION, p), self.k.removed_pools(REGION)],
                       args=["upsert", self.now, p, "", self.cap[p], "{}", "m", "acme", 1, 1])
            client.set(self.k.leases_ready(REGION), "1")

        # --- helpers -------------------------------------------------------------------------
        def step(self) -> None:
            seen["steps"] += 1

        def leased(self, pool: str) -> int:
            return sum(lv.units for lv in self.live.values() if lv.pool == pool)

        def free(self, pool: str) -> int:
            return max(0, self.cap[pool] - self.leased(pool))

        def info(self, lease_id: str, pool: str, units: int, request: str, interruptible: bool) -> bytes:
            return msgspec.json.encode(LeaseInfo(
                lease_id=lease_id, request_id=request, tenant="t", pool_id=pool, provider="acme", region=REGION,
                model="m", units=units, billing="interruptible" if interruptible else "on_demand",
                unit_price=Decimal(1), granted_at=datetime.now(UTC), expires_at=datetime.now(UTC)))

        def lease_keys(self, pool: str, lease_id: str) -> list[str]:
            return [self.k.pool(REGION, pool), self.k.pool_leases(REGION, pool), self.k.lease(REGION, lease_id)]

        def reserve(self, pool: str, units: int, request: str, interruptible: bool) -> str | None:
            """reserve.lua for one lease (pending); the model follows what it must answer."""
            lease_id = f"l{next(self.ids)}"
            k = self.k
            expiry = self.now + PENDING_S
            keys = [k.lease_expiry(REGION), k.leases_ready(REGION), k.interruptible_leases(REGION),
                    *self.lease_keys(pool, lease_id)]
            args = [1, "check", expiry, 1, lease_id, units, self.info(lease_id, pool, units, request, interruptible),
                    int(interruptible), 0, 1000, ""]
            [raw] = reserve_s(keys=keys, args=args)
            fits = self.free(pool) >= units
            assert (int(raw[0]) == 1) == fits, (raw, pool, units, self.free(pool))
            if not fits:
                return None
            self.live[lease_id] = Live(pool, units, request, interruptible, True, expiry)
            assert int(raw[1]) == self.free(pool)
            return lease_id

        def confirm(self, lease_id: str) -> bool:
            expiry = self.now + 1000
            pool = self.live[lease_id].pool if lease_id in self.live else POOLS[0]
            [raw] = confirm_s(keys=[self.k.lease_expiry(REGION), self.k.lease_provisioning(REGION),
                                    self.k.lease(REGION, lease_id), self.k.pool(REGION, pool)],
                              args=[1, 1, lease_id, expiry, 0])
            assert int(raw[0]) == int(lease_id in self.live)
            if lease_id in self.live:
                self.live[lease_id].pending, self.live[lease_id].expiry = False, expiry
                return True
            return False

        def end(self, lease_id: str, mode: str) -> bool:
            lv = self.live.get(lease_id)
            pool = lv.pool if lv else POOLS[0]
            k = self.k
            raw = end_s(keys=[k.lease_expiry(REGION), k.lease(REGION, lease_id), k.pool(REGION, pool),
                              k.pool_leases(REGION, pool), k.interruptible_leases(REGION)],
                        args=[lease_id, mode, self.now])
            gone = mode == "expire" and lv is not None and lv.expiry > self.now
            assert int(raw[0]) == int(lv is not None and not gone), (lease_id, mode, raw)
            if int(raw[0]) == 1:
                del self.live[lease_id]
                assert int(raw[3]) == self.free(pool) and int(raw[4]) == int(lv.pending)
                return True
            return False

        def claimable(self, req: Req) -> bool:
            return req.state == "queued" or (req.state == "placing" and req.until <= self.now)

        # --- tenants ---------------------------------------------------------------------------
        @rule(target=requests)
        def tenant_queues_a_request(self) -> str:
            self.step()
            rid = f"r{next(self.ids)}"
            assert queue_s(keys=[self.k.request(rid)], args=["{}", "2026-01-01T00:00:00"]) == [1]
            self.reqs[rid] = Req()
            return rid

        @precondition(lambda self: len(self.reqs) % 4 == 3)  # now and then, not a fifth of the steps
        @rule(rid=requests)
        def rebuild_queues_it_again(self, rid: str) -> None:
            """Create-only: a replayed RequestQueued never overwrites a newer state."""
            self.step()
            assert queue_s(keys=[self.k.request(rid)], args=["{}", "x"]) == [0, self.reqs[rid].state]

        @rule(rid=requests, how=st.sampled_from(["cancelled", "expired"]))
        def tenant_cancels_or_deadline_passes(self, rid: str, how: str) -> None:
            self.step()
            req = self.reqs[rid]
            raw = cancel_s(keys=[self.k.request(rid)], args=[how, "x", "", self.now])
            ok = self.claimable(req)
            assert raw == ([1] if ok else [0, req.state]), (raw, req)
            seen[f"{how} from {req.state}{' (claim expired)' if req.state == 'placing' and ok else ''}: {ok}"] += 1
            if ok:
                req.state, req.token = how, ""

        # --- queue runners ---------------------------------------------------------------------
        @rule(target=claims, rid=requests)
        def runner_a_claims(self, rid: str):  # noqa: ANN201
            return self.claim(rid)

        @rule(target=claims, rid=requests)
        def runner_b_claims(self, rid: str):  # noqa: ANN201
            return self.claim(rid)

        @rule(target=claims, c=claims)
        def another_runner_takes_over_an_outlived_claim(self, c: Claimed):  # noqa: ANN201
            """The first runner is slow: its claim expires and another runner's pass claims
            the request; the first one carries on, unaware."""
            self.now += CLAIM_S + 1
            return self.claim(c.request)

        def claim(self, rid: str):  # noqa: ANN201
            self.step()
            req = self.reqs[rid]
            token = f"c{next(self.ids)}"
            raw = claim_s(keys=[self.k.request(rid)], args=[token, self.now, self.now + CLAIM_S])
            ok = self.claimable(req)
            assert int(raw[0]) == int(ok), (raw, req, self.now)
            seen[f"claim from {req.state}: {ok}"] += 1
            if not ok:
                assert raw[1] == req.state
                return multiple()
            req.state, req.token, req.until = "placing", token, self.now + CLAIM_S
            return Claimed(rid, token)

        def settle(self, c: Claimed, state: str) -> bool:
            req = self.reqs[c.request]
            raw = settle_s(keys=[self.k.request(c.request)], args=[c.token, state, "x", "{}"])
            ok = req.state == "placing" and req.token == c.token
            assert int(raw[0]) == int(ok), (raw, req, c)
            seen[f"settle {state}: {ok}"] += 1
            if ok:
                req.state, req.token = state, ""
            return ok

        @rule(target=reserved, c=consumes(claims), pool=st.sampled_from(POOLS), units=st.integers(1, 3))
        def claimer_reserves(self, c: Claimed, pool: str, units: int):  # noqa: ANN201
            """Nothing fits: back to queued (if the claim is still its own)."""
            self.step()
            lease_id = self.reserve(pool, units, c.request, False)
            if lease_id is None:
                self.settle(c, "queued")
                return multiple()
            c.lease = lease_id
            return c

        @rule(c=consumes(reserved))
        def claimer_settles_then_confirms(self, c: Claimed) -> None:
            """The grant is durable: placing → placed, then the lease confirmed; refused (the
            claim was taken over or the request cancelled after it expired): give it back."""
            self.step()
            if self.settle(c, "placed"):
                req = self.reqs[c.request]
                req.placements += 1
                assert req.placements == 1, f"{c.request} placed twice"
                self.confirm(c.lease)
            else:
                self.end(c.lease, "release")

        @rule(c=st.one_of(consumes(claims), consumes(reserved)))
        def claimer_crashes(self, c: Claimed) -> None:
            """Nothing more from it: its claim expires, its unconfirmed lease is swept."""
            self.step()

        @rule(dt=st.sampled_from([1, 5, 31, 61]))
        def time_passes_and_sweeper_runs(self, dt: int) -> None:
            self.step()
            self.now += dt
            for lease_id in sorted(client.zrangebyscore(self.k.lease_expiry(REGION), "-inf", self.now)):
                assert self.end(lease_id, "expire")

        # --- other placements and preemption -----------------------------------------------------
        @rule(pool=st.sampled_from(POOLS), units=st.integers(1, 4))
        def concurrent_request_placed_at_once(self, pool: str, units: int) -> None:
            """An on-demand request placed straight away (it may race a preemptor)."""
            self.step()
            lease_id = self.reserve(pool, units, f"now{next(self.ids)}", False)
            if lease_id is not None:
                assert self.confirm(lease_id)

        @precondition(lambda self: len(self.live) > 2)
        @rule(i=st.integers(0, 1000))
        def tenant_releases(self, i: int) -> None:
            self.step()
            confirmed = sorted(lid for lid, lv in self.live.items() if not lv.pending)
            if confirmed:
                assert self.end(confirmed[i % len(confirmed)], "release")

        @rule(pool=st.sampled_from(POOLS), units=st.integers(1, 4))
        def interruptible_lease_placed(self, pool: str, units: int) -> None:
            """A victim to be: an interruptible lease, placed and confirmed."""
            self.step()
            lease_id = self.reserve(pool, units, f"cheap{next(self.ids)}", True)
            if lease_id is not None:
                assert self.confirm(lease_id)

        @precondition(lambda self: any(lv.interruptible for lv in self.live.values()))
        @rule(target=intents, pool=st.sampled_from(POOLS), extra=st.integers(1, 8))
        def preemptor_picks_victims(self, pool: str, extra: int):  # noqa: ANN201
            """What the broker reads before it acts: interruptible leases on the pool, newest
            first, until with them gone there would be room for ``extra`` units more than
            are free now."""
            self.step()
            units = self.free(pool) + extra
            found = sorted((lid for lid in client.smembers(self.k.interruptible_leases(REGION))
                            if self.live[lid].pool == pool), key=lambda lid: -int(lid[1:]))
            victims, room = [], self.free(pool)
            for lid in found:
                if room >= units:
                    break
                victims.append(lid)
                room += self.live[lid].units
            if not victims or room < units:
                return multiple()
            return Intent(victims, pool, units)

        @rule(intent=intents, units=st.integers(1, 4))
        def concurrent_request_races_a_preemptor(self, intent: Intent, units: int) -> None:
            """Between a preemptor's read and its act, a request takes free units of its pool."""
            self.step()
            units = min(units, self.free(intent.pool))
            if units:
                lease_id = self.reserve(intent.pool, units, f"race{next(self.ids)}", False)
                assert lease_id is not None and self.confirm(lease_id)

        @rule(intent=consumes(intents))
        def preemptor_acts(self, intent: Intent) -> None:
            """Ends its victims and reserves in one step, or changes nothing."""
            self.step()
            lease_id = f"l{next(self.ids)}"
            request = f"pre{next(self.ids)}"
            k = self.k
            keys = [k.lease_expiry(REGION), k.leases_ready(REGION), k.interruptible_leases(REGION)]
            for victim in intent.victims:
                keys += self.lease_keys(self.live[victim].pool if victim in self.live else intent.pool, victim)
            keys += self.lease_keys(intent.pool, lease_id)
            args = [len(intent.victims), 1, self.now + PENDING_S, *intent.victims,
                    lease_id, intent.units, self.info(lease_id, intent.pool, intent.units, request, False), 0, 0, 1000, ""]
            raw = preempt_s(keys=keys, args=args)
            alive = all(v in self.live and self.live[v].interruptible for v in intent.victims)
            freed = sum(self.live[v].units for v in intent.victims if v in self.live and self.live[v].pool == intent.pool)
            room = self.cap[intent.pool] - (self.leased(intent.pool) - freed) if alive else -1
            ok = alive and room >= intent.units
            assert int(raw[0]) == int(ok), (raw, intent, room)
            seen["preempt: " + ("placed" if ok else "refused, a victim gone" if not alive else "refused, no room")] += 1
            if not ok:
                return
            for v in intent.victims:
                del self.live[v]
            self.live[lease_id] = Live(intent.pool, intent.units, request, False, True, self.now + PENDING_S)
            assert [int(x) for x in raw[1]] == [self.free(intent.pool)]
            assert [int(v[1]) for v in raw[2]] == [2] * len(intent.victims)  # each victim's next seq
            self.confirm(lease_id)

        # --- invariants -------------------------------------------------------------------------
        @invariant()
        def redis_matches_model(self) -> None:
            if not hasattr(self, "k"):
                return
            k = self.k
            pipe = client.pipeline(transaction=False)
            for p in POOLS:
                pipe.hmget(k.pool(REGION, p), "leased", "free")
                pipe.smembers(k.pool_leases(REGION, p))
            rids = sorted(self.reqs)
            for rid in rids:
                pipe.hget(k.request(rid), "state")
            lids = sorted(self.live)
            for lid in lids:
                pipe.hget(k.lease(REGION, lid), "pending")
            out = pipe.execute()
            for i, p in enumerate(POOLS):
                (leased, free), members = out[2 * i], out[2 * i + 1]
                assert int(leased) == self.leased(p) <= self.cap[p], "leased beyond capacity"
                assert int(free) == self.free(p)
                assert members == {lid for lid, lv in self.live.items() if lv.pool == p}
            states = out[2 * len(POOLS):2 * len(POOLS) + len(rids)]
            assert states == [self.reqs[r].state for r in rids]
            pending = out[2 * len(POOLS) + len(rids):]
            assert [p == "1" for p in pending] == [self.live[lid].pending for lid in lids]

        @invariant()
        def a_request_is_placed_once_and_a_cancelled_one_never(self) -> None:
            confirmed: dict[str, int] = {}
            for lv in self.live.values():
                if not lv.pending:
                    confirmed[lv.request] = confirmed.get(lv.request, 0) + 1
            for rid, req in self.reqs.items():
                assert req.placements <= 1
                if req.state in ("cancelled", "expired", "queued", "placing"):
                    assert confirmed.get(rid, 0) == 0, f"{rid} is {req.state} yet holds a confirmed lease"
                else:
                    assert confirmed.get(rid, 0) <= 1

        def teardown(self) -> None:
            if hasattr(self, "k"):
                stale = list(client.scan_iter(match=f"{self.k.prefix}:*", count=10_000))
                if stale:
                    client.delete(*stale)

    return RequestScripts


# the interleavings the run must have met (each a race of issue 11), not only steps
# (a preemptor refused for want of room is rarer: a concurrent request must take units that
# were free when it read; test_preempt_refused_when_a_request_took_the_room lays that out)
MET = ("cancelled from placing: False", "cancelled from placing (claim expired): True", "claim from placing: False",
       "claim from placing: True", "settle placed: False", "settle queued: True",
       "preempt: placed", "preempt: refused, a victim gone")


def run(redis_url: str, examples: int, steps: int) -> Counter[str]:
    seen: Counter[str] = Counter()
    machine = make_machine(own_db(redis_url), seen)
    machine.TestCase.settings = hsettings(max_examples=examples, stateful_step_count=steps, deadline=None)
    machine.TestCase().runTest()
    print(dict(sorted(seen.items())))
    return seen


def check(seen: Counter[str], min_steps: int) -> None:
    assert seen["steps"] >= min_steps, f"only {seen['steps']} steps ran"
    assert all(seen[what] for what in MET), [what for what in MET if not seen[what]]


@pytest.mark.timeout(600)  # tens of seconds alone; a loaded 2-core machine takes minutes
def test_request_scripts_match_model(redis_url: str) -> None:
    check(run(redis_url, 500, 80), MIN_STEPS)


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_request_scripts_soak(redis_url: str) -> None:
    check(run(redis_url, 4000, 100), 10 * MIN_STEPS)


def test_preempt_refused_when_a_request_took_the_room(redis_url: str) -> None:
    """Pool of 8: an interruptible lease of 4, 4 free. A preemptor reads that and means
    to take 8 with that victim; a request takes 2 of the free units first. The preemption
    is refused and nothing changes: the victim lives, the pool holds 6."""
    machine = make_machine(redis_url, Counter())()
    machine.setup([8, 8])
    try:
        machine.interruptible_lease_placed("pa", 4)
        intent = machine.preemptor_picks_victims("pa", 4)  # 4 free + 4 more: the victim
        assert intent.units == 8 and len(intent.victims) == 1
        machine.concurrent_request_races_a_preemptor(intent, 2)
        machine.preemptor_acts(intent)  # asserts the script's refusal against the model
        machine.redis_matches_model()
        assert machine.leased("pa") == 6 and intent.victims[0] in machine.live
    finally:
        machine.teardown()
