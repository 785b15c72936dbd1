"""Stateful property test of a lease's delivery states over the real scripts and a real
redis-server (docs/lifecycle.md, "Lease"): in any interleaving of reservations (capacity
only or delivering, confirmed at once or left pending), confirmations, the provider's
ready / failed / unhealthy answers, renewals, releases and losses, time passing, the
expiry and provision-timeout sweeps, a pool registered again under its id (a new
generation the broker missed), and Redis lost and restored from the record:

* units are conserved: each pool's leased units are the live leases' of its generation;
* a live lease is in exactly one state (pending, provisioning or ready), the same in
  Redis as in the model, and the timeout sweep's index holds exactly the provisioning
  ones, by deadline;
* each lease's seq strictly increases, and Redis holds the model's;
* no lease is both ready and failed: failed only from provisioning, lost (unhealthy)
  only from ready, a late ready refused and the lease failed by the sweep;
* every transition that changed Redis owes its event (docs/lifecycle.md, "Outbox"): it
  is in the region's outbox, with its kind, seq and free units, until it was
  acknowledged (the broker published it, or the sweep did once the grace passed), also
  when its broker died right after the script; nothing else is there.

``test_lease_scripts_props`` runs the same scripts among the registry's pool scripts;
this one keeps the pools simple so that the delivery transitions are reached often."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal

import msgspec
import redis
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from services.broker.outbox import Entry, iso
from services.common.keys import Keys
from services.common.messages import LeaseInfo
from services.common.redis_conn import read_lua

from ..helpers import run_machine

REGION = "cn-gz"
POOLS = ("pa", "pb")
MIN_STEPS = 4_000
GRACE_S = 30.0  # the outbox sweep republishes entries older than this
EVENT = {"release": "lease.released", "lost": "lease.lost", "preempt": "lease.preempted", "revoke": "lease.revoked",
         "expire": "lease.expired", "fail": "lease.failed", "timeout": "lease.failed"}
_entry = msgspec.json.Decoder(Entry)


class Live(msgspec.Struct):
    pool: str
    units: int
    gen: int
    expiry: float
    deliver: bool
    deadline: float  # delivering leases: failed unless ready by then
    seq: int = 1
    confirmed: bool = False
    ready_at: float | None = None

    @property
    def state(self) -> str:
        if not self.confirmed:
            return "pending"
        return "provisioning" if self.deliver and self.ready_at is None else "ready"


def make_machine(url: str, counter: list[int]) -> type[RuleBasedStateMachine]:
    client = redis.Redis.from_url(url, decode_responses=True)
    scripts = {name: client.register_script(read_lua(package, f"{name}.lua")) for package, name in (
        ("services.registry.lua", "pool"), ("services.broker.lua", "reserve"), ("services.broker.lua", "confirm"),
        ("services.broker.lua", "end_lease"), ("services.broker.lua", "lease_ready"),
        ("services.broker.lua", "renew"), ("services.broker.lua", "restore"))}

    class Delivery(RuleBasedStateMachine):
        @initialize(caps=st.lists(st.integers(4, 16), min_size=2, max_size=2))
        def setup(self, caps: list[int]) -> None:
            self.k = Keys(f"ld{uuid.uuid4().hex[:10]}")
            self.now = 1000.0
            self.rev = 0
            self.cap = dict(zip(POOLS, caps, strict=True))
            self.gen: dict[str, int] = {}
            self.live: dict[str, Live] = {}
            self.known: list[str] = []  # every lease id ever reserved (answers may name ended ones)
            self.ended: dict[str, str] = {}  # lease id -> how it ended
            self.was_ready: set[str] = set()
            self.seqs: dict[str, list[int]] = {}
            # the outbox: event id -> (type, seq, free_after, pending, written at) owed;
            # every id a transition owed; acknowledged ones; lost with Redis; and those
            # whose broker died after the script (only the sweep clears them)
            self.owed: dict[str, tuple[str, int, int, int, float]] = {}
            self.transitions: set[str] = set()
            self.acked: set[str] = set()
            self.lost_with_redis: set[str] = set()
            self.crashed: set[str] = set()
            for p in POOLS:
                self.register(p)
            client.set(self.k.leases_ready(REGION), "1")

        # --- helpers ----------------------------------------------------------------------
        def pool(self, op: str, pool_id: str, *args: object) -> list:
            k = self.k
            return scripts["pool"](keys=[k.pool(REGION, pool_id), k.region_pools(REGION), k.heartbeats(REGION),
                                         k.pool_leases(REGION, pool_id), k.removed_pools(REGION)],
                                   args=[op, self.now, pool_id, "", *args])

        def register(self, pool_id: str) -> None:
            self.rev += 1
            self.gen[pool_id] = self.rev
            raw = self.pool("upsert", pool_id, self.cap[pool_id], "{}", "m", "acme", self.rev, self.rev)
            assert int(raw[0]) == 2, raw

        def leased(self, pool_id: str) -> int:
            return sum(lv.units for lv in self.live.values() if lv.pool == pool_id and lv.gen == self.gen[pool_id])

        def pick(self, data: st.DataObject) -> str:
            live = sorted(self.live)
            if live and data.draw(st.integers(0, 7)):
                return data.draw(st.sampled_from(live))
            return data.draw(st.sampled_from(self.known)) if self.known else "nothing"

        def at(self) -> str:
            return iso(datetime.fromtimestamp(self.now, UTC))

        def end(self, lease_id: str, mode: str, state: str = "") -> list:
            pool_id = self.live[lease_id].pool if lease_id in self.live else "pa"
            k = self.k
            return scripts["end_lease"](
                keys=[k.lease_expiry(REGION), k.lease(REGION, lease_id), k.pool(REGION, pool_id),
                      k.pool_leases(REGION, pool_id), k.interruptible_leases(REGION), k.lease_provisioning(REGION),
                      k.lease_outbox(REGION)],
                args=[lease_id, mode, self.now, state, EVENT[mode], self.at(), '{"reason":"r"}'])

        def owe(self, lease_id: str, seq: int, kind: str, free: int = -1, pending: int = 0) -> str:
            event_id = f"{lease_id}.{seq}"
            assert event_id not in self.transitions, "an event id owed twice"
            self.transitions.add(event_id)
            self.owed[event_id] = (kind, seq, free, pending, self.now)
            return event_id

        def acknowledge(self, event_ids: list[str]) -> None:
            """The events were published and acknowledged: their entries go (HDEL)."""
            if event_ids:
                client.hdel(self.k.lease_outbox(REGION), *event_ids)
            for event_id in event_ids:
                del self.owed[event_id]
                self.acked.add(event_id)

        def ended_as(self, lease_id: str, raw: list, how: str, mode: str = "") -> str:
            lv = self.live.pop(lease_id)
            assert int(raw[0]) == 1 and int(raw[2]) == lv.seq + 1
            self.seqs[lease_id].append(int(raw[2]))
            same = self.gen[lv.pool] == lv.gen
            assert int(raw[3]) == (max(0, self.cap[lv.pool] - self.leased(lv.pool)) if same else -1)
            assert int(raw[4]) == int(not lv.confirmed)
            self.ended[lease_id] = how
            return self.owe(lease_id, int(raw[2]), EVENT[mode or how], int(raw[3]), int(raw[4]))

        def confirm(self, ids: list[str], ttl: float) -> None:
            k = self.k
            keys, args = [k.lease_expiry(REGION), k.lease_provisioning(REGION)], [1, len(ids)]
            for lease_id in ids:
                lv = self.live.get(lease_id)
                keys += [k.lease(REGION, lease_id), k.pool(REGION, lv.pool if lv else "pa")]
                args += [lease_id, self.now + ttl, lv.deadline if lv and lv.deliver else 0]
            [raw] = scripts["confirm"](keys=keys, args=args)
            for lease_id, ok in zip(ids, raw, strict=True):
                lv = self.live.get(lease_id)
                assert int(ok) == int(lv is not None and lv.gen == self.gen[lv.pool])
                if int(ok):
                    lv.expiry, lv.confirmed = self.now + ttl, True

        # --- the broker ---------------------------------------------------------------------
        @rule(pool_id=st.sampled_from(POOLS), units=st.integers(1, 4), deliver=st.booleans(),
              provision=st.integers(5, 60), ttl=st.integers(1, 120), confirmed=st.integers(0, 3))
        def reserve(self, pool_id: str, units: int, deliver: bool, provision: int, ttl: int, confirmed: int) -> None:
            counter[0] += 1
            self._reserve(pool_id, units, deliver, provision, ttl, confirmed)

        @rule(pool_id=st.sampled_from(POOLS), units=st.integers(1, 3), provision=st.integers(5, 60),
              ttl=st.integers(30, 120))
        def reserve_delivering(self, pool_id: str, units: int, provision: int, ttl: int) -> None:
            """As the broker grants a delivering lease (confirmed at once): so that the
            provider's answers meet provisioning leases often."""
            counter[0] += 1
            self._reserve(pool_id, units, True, provision, ttl, 1)

        def _reserve(self, pool_id: str, units: int, deliver: bool, provision: int, ttl: int, confirmed: int) -> None:
            k = self.k
            lease_id = f"l{len(self.known) + 1:05d}"  # deterministic: draws must replay the same
            info = LeaseInfo(lease_id=lease_id, request_id="r", tenant="t", pool_id=pool_id, provider="acme",
                             region=REGION, model="m", units=units, billing="on_demand", unit_price=Decimal(1),
                             granted_at=datetime.now(UTC), expires_at=datetime.now(UTC),
                             delivery="ssh" if deliver else "", provision_timeout_s=provision if deliver else 0)
            [raw] = scripts["reserve"](
                keys=[k.lease_expiry(REGION), k.leases_ready(REGION), k.interruptible_leases(REGION),
                      k.pool(REGION, pool_id), k.pool_leases(REGION, pool_id), k.lease(REGION, lease_id)],
                args=[1, "check", self.now + 30, 1, lease_id, units, msgspec.json.encode(info), 0,
                      self.gen[pool_id], 1000, ""])
            fits = self.cap[pool_id] - self.leased(pool_id) >= units
            assert (int(raw[0]) == 1) == fits, (raw, self.cap, self.live)
            self.known.append(lease_id)
            if not fits:
                return
            self.live[lease_id] = Live(pool_id, units, self.gen[pool_id], self.now + 30, deliver,
                                       self.now + provision if deliver else 0.0)
            self.seqs[lease_id] = [1]
            if confirmed:  # most grants are confirmed at once; some stay pending a while
                self.confirm([lease_id], ttl)

        @rule(data=st.data(), ttl=st.integers(1, 120))
        def broker_confirms(self, data: st.DataObject, ttl: int) -> None:
            counter[0] += 1
            self.confirm([self.pick(data)], ttl)

        @rule(data=st.data(), ttl=st.integers(1, 120))
        def tenant_renews(self, data: st.DataObject, ttl: int) -> None:
            counter[0] += 1
            lease_id = self.pick(data)
            k = self.k
            raw = scripts["renew"](keys=[k.lease_expiry(REGION), k.lease(REGION, lease_id), k.lease_outbox(REGION)],
                                   args=[lease_id, self.now, self.now + ttl, "{}", self.at()])
            lv = self.live.get(lease_id)
            alive = lv is not None and lv.expiry > self.now
            assert (int(raw[0]) == 1) == alive
            if alive:
                lv.expiry, lv.seq = self.now + ttl, lv.seq + 1
                assert int(raw[1]) == lv.seq
                self.seqs[lease_id].append(lv.seq)
                self.owe(lease_id, lv.seq, "lease.renewed")

        @rule(data=st.data(), mode=st.sampled_from(["release", "lost", "preempt", "revoke"]))
        def lease_ends(self, data: st.DataObject, mode: str) -> None:
            """Released by its tenant, lost with its pool, preempted, revoked: from any state."""
            counter[0] += 1
            lease_id = self.pick(data)
            raw = self.end(lease_id, mode)
            assert (int(raw[0]) == 1) == (lease_id in self.live)
            if lease_id in self.live:
                self.ended_as(lease_id, raw, mode)

        @rule(data=st.data(), mode=st.sampled_from(["release", "lost", "revoke"]))
        def broker_dies_after_a_script(self, data: st.DataObject, mode: str) -> None:
            """A lease ends and its broker dies right after the script: nobody will
            publish the event but the sweep (its entry must stay until then)."""
            counter[0] += 1
            lease_id = self.pick(data)
            raw = self.end(lease_id, mode)
            assert (int(raw[0]) == 1) == (lease_id in self.live)
            if lease_id in self.live:
                self.crashed.add(self.ended_as(lease_id, raw, mode))

        @rule(data=st.data())
        def broker_acknowledges(self, data: st.DataObject) -> None:
            """The brokers still alive publish what they owe, acknowledged (some of it)."""
            counter[0] += 1
            alive = sorted(set(self.owed) - self.crashed)
            self.acknowledge([i for i in alive if data.draw(st.booleans())])

        @rule()
        def outbox_sweep(self) -> None:
            """The sweep: entries older than the grace are read back, republished and
            cleared; younger ones stay (their broker may still be publishing)."""
            counter[0] += 1
            _, found = client.hscan(self.k.lease_outbox(REGION), 0, count=10_000)
            due = []
            for event_id, raw in found.items():
                entry = _entry.decode(raw)
                if float(entry.w) <= self.now - GRACE_S:
                    kind, seq, free, pending, _ = self.owed[event_id]
                    assert (entry.k, entry.s, entry.f, entry.p) == (kind, seq, free, pending)
                    due.append(event_id)
            assert set(due) == {i for i, o in self.owed.items() if o[4] <= self.now - GRACE_S}
            self.acknowledge(due)
            self.crashed -= set(due)

        # --- the provider ---------------------------------------------------------------------
        @rule(data=st.data())
        def provider_answers_ready(self, data: st.DataObject) -> None:
            counter[0] += 1
            lease_id = self.pick(data)
            lv = self.live.get(lease_id)
            k = self.k
            raw = scripts["lease_ready"](keys=[k.lease(REGION, lease_id), k.pool(REGION, lv.pool if lv else "pa"),
                                               k.lease_provisioning(REGION), k.lease_outbox(REGION)],
                                         args=[lease_id, self.now, self.at()])
            if lv is None:
                want = "gone"
            elif lv.state != "provisioning":
                want = lv.state
            elif lv.gen != self.gen[lv.pool]:
                want = "generation"
            elif lv.deadline <= self.now:
                want = "deadline"  # late: refused (the broker then fails it)
            else:
                want = ""
            if want:
                assert [int(raw[0]), raw[1]] == [0, want], (lv, raw)
                return
            assert int(raw[0]) == 1 and int(raw[1]) == lv.seq + 1
            lv.seq, lv.ready_at = lv.seq + 1, self.now
            self.seqs[lease_id].append(lv.seq)
            self.was_ready.add(lease_id)
            self.owe(lease_id, lv.seq, "lease.ready")

        @rule(data=st.data(), how=st.sampled_from(["failed", "unhealthy", "timeout"]))
        def provider_fails_or_reports_unhealthy(self, data: st.DataObject, how: str) -> None:
            """failed: provisioning → failed; unhealthy: ready → lost; timeout (a late ready
            seen by the broker): provisioning past its deadline → failed."""
            counter[0] += 1
            lease_id = self.pick(data)
            lv = self.live.get(lease_id)
            mode, need = {"failed": ("fail", "provisioning"), "unhealthy": ("lost", "ready"),
                          "timeout": ("timeout", "")}[how]
            raw = self.end(lease_id, mode, need)
            state_ok = lv is not None and lv.state == (need or "provisioning")
            ok = state_ok and (how != "timeout" or lv.deadline <= self.now)  # type: ignore[union-attr]
            assert (int(raw[0]) == 1) == ok, (how, lv, raw)
            if ok:
                self.ended_as(lease_id, raw, "lost" if how == "unhealthy" else "failed", mode)
            elif lv is not None and not state_ok:
                assert raw[1] == lv.state

        # --- time, sweeps, the registry, Redis ----------------------------------------------------
        @rule(dt=st.integers(1, 30))
        def time_passes(self, dt: int) -> None:
            counter[0] += 1
            self.now += dt

        @rule(data=st.data())
        def time_reaches_a_deadline(self, data: st.DataObject) -> None:
            """Just to (or past) a provisioning lease's deadline, before any sweep: a ready
            now is late."""
            counter[0] += 1
            deadlines = sorted(lv.deadline for lv in self.live.values()
                               if lv.state == "provisioning" and lv.deadline > self.now)
            if deadlines:
                self.now = data.draw(st.sampled_from(deadlines)) + data.draw(st.sampled_from([0, 0.5, 3]))

        @rule()
        def sweeps_run(self) -> None:
            """The expiry sweep, then the provision-timeout sweep (each candidate re-checked)."""
            counter[0] += 1
            k = self.k
            due = set(client.zrangebyscore(k.lease_expiry(REGION), "-inf", self.now))
            assert due == {i for i, lv in self.live.items() if lv.expiry <= self.now}
            for lease_id in sorted(due):
                self.ended_as(lease_id, self.end(lease_id, "expire"), "expired", "expire")
            late = set(client.zrangebyscore(k.lease_provisioning(REGION), "-inf", self.now))
            assert late == {i for i, lv in self.live.items() if lv.state == "provisioning" and lv.deadline <= self.now}
            for lease_id in sorted(late):
                self.ended_as(lease_id, self.end(lease_id, "timeout"), "failed", "timeout")

        @rule(pool_id=st.sampled_from(POOLS))
        def pool_registered_again_unheard(self, pool_id: str) -> None:
            """Removed and registered again (a new generation) while the broker heard
            nothing: its leases live on, holding nothing; ready on them is refused."""
            counter[0] += 1
            raw = self.pool("remove", pool_id, self.gen[pool_id])
            assert int(raw[0]) == 1
            self.register(pool_id)

        @rule()
        def redis_lost_and_restored(self) -> None:
            """Redis flushed; pools back from the registry's record, every unexpired lease
            from the allocation record with its seq and state (pending ones as granted)."""
            counter[0] += 1
            k = self.k
            stale = list(client.scan_iter(match=f"{k.prefix}:*", count=10_000))
            if stale:
                client.delete(*stale)
            # the outbox went with Redis: what it owed never reached the record, which the
            # rebuild restores (this model restores its own state; docs/lifecycle.md, "Outbox")
            self.lost_with_redis |= set(self.owed)
            self.crashed -= set(self.owed)
            self.owed.clear()
            for p in POOLS:
                self.rev += 1  # the record keeps the generation; its revision moves on
                raw = self.pool("upsert", p, self.cap[p], "{}", "m", "acme", self.gen[p], self.rev)
                assert int(raw[0]) == 2
            for lease_id in [i for i, lv in self.live.items() if lv.expiry <= self.now]:
                lv = self.live.pop(lease_id)  # expired meanwhile: the rebuild announces it
                self.seqs[lease_id].append(lv.seq + 1)
                self.ended[lease_id] = "expired"
            keys = [k.lease_expiry(REGION), k.interruptible_leases(REGION), k.lease_provisioning(REGION)]
            args: list[object] = []
            for lease_id, lv in self.live.items():
                lv.confirmed = True
                state = "" if not lv.deliver else ("provisioning" if lv.ready_at is None else "ready")
                keys += [k.pool(REGION, lv.pool), k.pool_leases(REGION, lv.pool), k.lease(REGION, lease_id)]
                args += [lease_id, lv.units, "{}", 0, lv.expiry, lv.seq, lv.gen, state,
                         lv.deadline if state == "provisioning" else 0, lv.ready_at if state == "ready" else "", 1000, ""]
            if self.live:
                assert scripts["restore"](keys=keys, args=args) == len(self.live)
                assert scripts["restore"](keys=keys, args=args) == 0
            client.set(k.leases_ready(REGION), "1")

        # --- invariants -------------------------------------------------------------------------
        @invariant()
        def redis_matches_model(self) -> None:
            k = self.k
            pipe = client.pipeline(transaction=False)
            for p in POOLS:
                pipe.hmget(k.pool(REGION, p), "leased", "free", "generation")
            pipe.zrange(k.lease_provisioning(REGION), 0, -1, withscores=True)
            ids = sorted(self.live)
            for lease_id in ids:
                pipe.hmget(k.lease(REGION, lease_id), "seq", "state", "pending", "units", "generation")
            for lease_id in self.ended:
                pipe.exists(k.lease(REGION, lease_id))
            replies = pipe.execute()
            for p, (leased, free, gen) in zip(POOLS, replies, strict=False):
                assert (int(leased), int(free), int(gen)) == \
                    (self.leased(p), max(0, self.cap[p] - self.leased(p)), self.gen[p]), (p, self.live)
                assert self.leased(p) <= self.cap[p]
            provisioning = dict(replies[len(POOLS)])
            assert provisioning == {i: lv.deadline for i, lv in self.live.items() if lv.state == "provisioning"}
            n = len(POOLS) + 1
            for lease_id, (seq, state, pending, units, gen) in zip(ids, replies[n:n + len(ids)], strict=True):
                lv = self.live[lease_id]
                held = "pending" if pending else (state or "ready")
                assert held == lv.state, (lease_id, held, lv)
                assert (int(seq), int(units), int(gen)) == (lv.seq, lv.units, lv.gen)
            assert not any(replies[n + len(ids):]), "an ended lease is back in Redis"
            for lease_id, seqs in self.seqs.items():
                assert all(a < b for a, b in zip(seqs, seqs[1:])), (lease_id, seqs)
            assert not {i for i, how in self.ended.items() if how == "failed"} & self.was_ready

        @invariant()
        def every_transition_is_owed_or_acknowledged(self) -> None:
            held = {event_id: _entry.decode(raw) for event_id, raw in
                    client.hgetall(self.k.lease_outbox(REGION)).items()}
            assert set(held) == set(self.owed), (sorted(held), sorted(self.owed))
            for event_id, entry in held.items():
                kind, seq, free, pending, written = self.owed[event_id]
                assert (entry.k, entry.s, entry.f, entry.p, float(entry.w)) == (kind, seq, free, pending, written)
                assert entry.t == iso(datetime.fromtimestamp(written, UTC))
            assert set(self.owed) | self.acked | self.lost_with_redis == self.transitions
            assert not set(self.owed) & self.acked and not self.acked & self.lost_with_redis
            assert self.crashed <= set(self.owed), "a dead broker's event cleared by other than the sweep"

        def teardown(self) -> None:
            if hasattr(self, "k"):
                stale = list(client.scan_iter(match=f"{self.k.prefix}:*", count=10_000))
                if stale:
                    client.delete(*stale)

    return Delivery


def test_delivery_states_match_model(redis_url: str) -> None:
    steps = run_machine(make_machine, redis_url, examples=100, steps=60, min_steps=MIN_STEPS)
    assert steps >= MIN_STEPS, f"only {steps} steps ran"
