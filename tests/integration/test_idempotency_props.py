"""Stateful property test of idempotency keys (``services/broker/idempotency.py``): the
real key scripts on a real redis-server, the real durable copy in a JetStream KV bucket,
the real lease scripts for the placement's side effects, and crashes between every
step of an idempotent placement — claim, durable claim, name the leases, reserve,
durable grant, confirm, record the answer (durable, then Redis), answer the client —
plus Redis lost (and rebuilt from the durable record) and time passing.

A crash is an attempt that stops at a step and never runs another line (its task is
left suspended: no cleanup runs, as in a process killed there) — or, later, wakes up and
goes on (a broker stalled past its deadline: fenced off by the key's revision, it must
not answer a second placement nor leave a grant behind). The durable allocation
record is modelled by a list (grants and the ``lease.lost`` endings written at grant
time); everything that decides a transition is real.

Invariants: a key never answers 201 with two different lease sets; after time passes
and every key is retried, each converges to one answer, the live leases are exactly
the answered ones, and every grant not answered is ended at its grant time (billed
nothing)."""

from __future__ import annotations

import asyncio
import contextvars
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import msgspec
import nats.js.errors
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, Phase
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from services.broker.idempotency import Keyring, before_grant
from services.broker.key_grants import LeaseGrants
from services.broker.leases import PENDING_S, LeaseStore
from services.common.errors import BrokerError, Unavailable
from services.common.ids import new_id
from services.common.keys import Keys
from services.common.messages import LeaseInfo
from services.common.nats_conn import connect
from services.registry.store import PoolStore

REGION, POOL, TENANT = "cn-gz", "pa", "t1"
GENERATION = 1  # the pool's registration (its generation), which every lease on it names
KEYS = ("k0", "k1")
STALE_S = 6.0
STEPS = ("durable_claim", "name", "reserve", "grant", "confirm", "finish_durable", "finish_redis", "respond")
DEFAULT_STEPS = int(os.environ.get("CB_IDEM_PROPS_STEPS", "2000"))  # the soak: 20,000


@dataclass
class Attempt:
    key: str
    crash_at: str | None
    parked: asyncio.Event = field(default_factory=asyncio.Event)
    resume: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    task: asyncio.Task | None = None


_attempt: contextvars.ContextVar[Attempt | None] = contextvars.ContextVar("attempt", default=None)


async def gate(step: str) -> None:
    """The crash point: an attempt meant to die here stops (a dead process runs nothing
    more), unless the machine lets it resume much later (a broker stalled past its
    deadline: it must not deliver a second answer, nor leave a grant behind)."""
    attempt = _attempt.get()
    if attempt is not None and attempt.crash_at == step:
        attempt.parked.set()
        await attempt.resume


class GatedKV:
    """The real bucket, with a crash point before the writes that are steps."""

    def __init__(self, kv) -> None:  # noqa: ANN001
        self.kv = kv

    async def create(self, key: str, value: bytes) -> int:
        await gate("durable_claim")
        return await self.kv.create(key, value)

    async def update(self, key: str, value: bytes, last: int) -> int:
        if msgspec.json.decode(value)["state"] == "done":
            await gate("finish_durable")
        return await self.kv.update(key, value, last=last)

    async def get(self, key: str):  # noqa: ANN201
        return await self.kv.get(key)


class Harness:
    """What ``LeaseGrants`` needs of a broker: the live leases (real scripts) and the
    durable allocation record (a list of grants and of endings at grant time)."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis, self.keys = redis, keys
        self.leases = LeaseStore(redis, keys)
        self.granted: dict[str, LeaseInfo] = {}
        self.lost_at_grant: set[str] = set()

    async def record(self, request_id: str) -> None:
        return None  # this model's placements never queue

    async def announce_end(self, kind: type, ended, at: datetime, **extra: object) -> None:  # noqa: ANN001
        assert at == ended.lease.granted_at, "a rollback ends a lease at its grant time"
        self.lost_at_grant.add(ended.lease.lease_id)


def make_machine(redis_url: str, nats_url: str, counter: list[int]) -> type[RuleBasedStateMachine]:
    class IdempotentPlacements(RuleBasedStateMachine):
        @initialize()
        def setup(self) -> None:
            self.loop = asyncio.new_event_loop()
            self.keys = Keys(f"ip{uuid.uuid4().hex[:10]}")
            self.bucket = f"{self.keys.prefix}_idem"
            self.now = 1_000_000.0  # the keys' clock (staleness); lease expiries use the real one
            self.delivered: dict[str, set[bytes]] = {}  # key -> every 201 body a client heard
            self.tried: set[str] = set()
            self.suspended: list[Attempt] = []
            self.run(self._setup())

        async def _setup(self) -> None:
            self.redis = aioredis.Redis.from_url(redis_url)
            self.nc = await connect(nats_url, "idem-props")
            js = self.nc.jetstream(timeout=5)
            from nats.js.api import KeyValueConfig
            kv = await js.create_key_value(KeyValueConfig(bucket=self.bucket, history=1))
            self.harness = Harness(self.redis, self.keys)
            self.keyring = Keyring(self.redis, self.keys, GatedKV(kv), LeaseGrants(self.harness),  # type: ignore[arg-type]
                                   stale_s=STALE_S, clock=lambda: self.now)
            finish = self.keyring._finish

            async def gated_finish(keys: list, args: list) -> object:
                if args[1] == "done":
                    await gate("finish_redis")
                return await finish(keys=keys, args=args)

            self.keyring._finish = gated_finish  # type: ignore[assignment]
            await self._pool()

        async def _pool(self) -> None:
            pool = (REGION, POOL, "acme", 10_000, b"{}", "m", GENERATION, GENERATION)
            await PoolStore(self.redis, self.keys).upsert_many([pool], time.time())
            await self.harness.leases.mark_ready([REGION])

        def run(self, coro):  # noqa: ANN001, ANN201
            return self.loop.run_until_complete(coro)

        def teardown(self) -> None:
            async def close() -> None:
                tasks = [attempt.task for attempt in self.suspended if attempt.task is not None]
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                keys = [k async for k in self.redis.scan_iter(match=f"{self.keys.prefix}:*", count=10_000)]
                if keys:
                    await self.redis.delete(*keys)
                try:
                    await self.nc.jetstream().delete_key_value(self.bucket)
                except nats.js.errors.NotFoundError:
                    pass
                await self.nc.drain()
                await self.redis.aclose()

            if hasattr(self, "redis"):
                self.run(close())
            self.loop.close()

        # --- one attempt of an idempotent placement ---------------------------------------------
        async def _place(self, request_id: str) -> tuple[int, bytes]:
            now = datetime.now(UTC)
            lease = LeaseInfo(lease_id=new_id("lease"), request_id=request_id, tenant=TENANT, pool_id=POOL,
                              provider="acme", region=REGION, model="m", units=1, billing="on_demand",
                              unit_price=Decimal(1), granted_at=now, expires_at=now + timedelta(days=1),
                              pool_generation=GENERATION)
            await gate("name")
            await before_grant([lease])
            await gate("reserve")
            ok, _ = await self.harness.leases.reserve(REGION, [lease], time.time() + PENDING_S)
            assert ok
            await gate("grant")
            self.harness.granted[lease.lease_id] = lease
            await gate("confirm")
            if await self.harness.leases.confirm([lease]):
                # as the broker (``_reserve``): the grant failed, its durable copy is ended at its
                # grant time (retracted), the client hears 503
                self.harness.lost_at_grant.add(lease.lease_id)
                raise Unavailable("the lease expired (or was rolled back) before its grant was confirmed")
            return 201, msgspec.json.encode({"request_id": request_id, "leases": [lease.lease_id]})

        @staticmethod
        async def _adopt(request_id: str, leases: list[LeaseInfo]) -> tuple[int, bytes]:
            return 201, msgspec.json.encode({"request_id": request_id,
                                             "leases": sorted(lease.lease_id for lease in leases)})

        async def _attempt(self, key: str, crash_at: str | None) -> tuple[int, bytes] | BrokerError | None:
            attempt = Attempt(key, crash_at)

            async def go() -> tuple[int, bytes]:
                _attempt.set(attempt)
                answer = await self.keyring.run(TENANT, key, b'{"units":1}', self._place, self._adopt)
                await gate("respond")
                return answer

            attempt.task = asyncio.ensure_future(go())
            return await self._until_parked_or_done(attempt)

        async def _until_parked_or_done(self, attempt: Attempt) -> tuple[int, bytes] | BrokerError | None:
            assert attempt.task is not None
            parked = asyncio.ensure_future(attempt.parked.wait())
            await asyncio.wait({attempt.task, parked}, return_when=asyncio.FIRST_COMPLETED)
            parked.cancel()
            if not attempt.task.done():
                self.suspended.append(attempt)
                return None
            try:
                return attempt.task.result()
            except BrokerError as exc:
                return exc

        async def _resume(self, attempt: Attempt) -> tuple[int, bytes] | BrokerError | None:
            attempt.crash_at = None
            attempt.parked.clear()
            attempt.resume.set_result(None)
            return await self._until_parked_or_done(attempt)

        def _heard(self, key: str, outcome: tuple[int, bytes] | BrokerError | None) -> None:
            if isinstance(outcome, tuple):
                status, body = outcome
                assert status == 201
                self.delivered.setdefault(key, set()).add(body)
            elif isinstance(outcome, BrokerError):
                assert outcome.status in (409, 503), (outcome.status, outcome.detail)
                if outcome.status == 409:  # busy: only while an owner is within its deadline
                    assert 0 < outcome.extra["retry_after"] <= STALE_S + 1

        # --- rules --------------------------------------------------------------------------------
        @rule(key=st.sampled_from(KEYS), crash_at=st.none() | st.sampled_from(STEPS))
        def request(self, key: str, crash_at: str | None) -> None:
            counter[0] += 1
            self.tried.add(key)
            self._heard(key, self.run(self._attempt(key, crash_at)))

        @precondition(lambda self: bool(getattr(self, "suspended", None)))
        @rule(which=st.integers(0, 100))
        def stalled_owner_resumes(self, which: int) -> None:
            counter[0] += 1
            attempt = self.suspended.pop(which % len(self.suspended))
            self._heard(attempt.key, self.run(self._resume(attempt)))

        @rule(seconds=st.sampled_from([1.0, STALE_S + 0.5]))
        def time_passes(self, seconds: float) -> None:
            counter[0] += 1
            self.now += seconds

        @rule()
        def sweep(self) -> None:
            """The broker's sweep: a reservation never confirmed (its broker died first)
            ends at its provisional expiry, in the record at its grant time."""
            counter[0] += 1
            self.run(self._sweep())

        async def _sweep(self) -> None:
            store = self.harness.leases
            for lease in await store.expired_in([REGION], time.time() + PENDING_S + 1):
                ended = await store.end(lease, "expire", time.time() + PENDING_S + 1)
                assert ended is not None and ended.pending, "only unconfirmed reservations expire here"
                if lease.lease_id in self.harness.granted:
                    self.harness.lost_at_grant.add(lease.lease_id)

        @rule()
        def redis_lost(self) -> None:
            """Redis loses everything; the broker rebuilds the live leases from the durable
            record (grants not ended), as ``rebuild_if_lost`` does."""
            counter[0] += 1
            self.run(self._redis_lost())

        async def _redis_lost(self) -> None:
            keys = [k async for k in self.redis.scan_iter(match=f"{self.keys.prefix}:*", count=10_000)]
            if keys:
                await self.redis.delete(*keys)
            await self._pool()
            open_ = [lease for lease_id, lease in self.harness.granted.items()
                     if lease_id not in self.harness.lost_at_grant]
            await self.harness.leases.restore([(lease, 1) for lease in open_])

        # --- invariants ---------------------------------------------------------------------------
        @invariant()
        def one_answer_per_key(self) -> None:
            if hasattr(self, "delivered"):
                for key, bodies in self.delivered.items():
                    assert len(bodies) == 1, f"key {key} answered two different placements: {bodies}"

        async def _live(self) -> set[str]:
            ids = await self.redis.zrange(self.keys.lease_expiry(REGION), 0, -1)
            return {i.decode() for i in ids}

        def teardown_check(self) -> None:
            """Time passes, the sweep runs, every key is retried: each converges."""
            self.now += STALE_S + 1
            self.run(self._sweep())
            answered: set[str] = set()
            for key in sorted(self.tried):
                outcome = None
                for _ in range(3):
                    outcome = self.run(self._attempt(key, None))
                    self._heard(key, outcome)
                    if isinstance(outcome, tuple):
                        break
                assert isinstance(outcome, tuple), f"key {key} did not converge: {outcome!r}"
                answered |= set(msgspec.json.decode(outcome[1])["leases"])
            self.one_answer_per_key()
            self.run(self._sweep())
            live = self.run(self._live())
            assert live == answered, f"live {sorted(live)} != answered {sorted(answered)}"
            for lease_id in set(self.harness.granted) - answered:
                assert lease_id in self.harness.lost_at_grant, f"grant {lease_id} never answered yet not ended"

    class Checked(IdempotentPlacements):
        def teardown(self) -> None:
            try:
                if hasattr(self, "redis"):
                    self.teardown_check()
            finally:
                super().teardown()

    return Checked


def _run(redis_url: str, nats_url: str, steps: int) -> int:
    counter = [0]
    machine = make_machine(redis_url, nats_url, counter)
    examples = 0
    while counter[0] < steps:
        examples += 1
        test = machine.TestCase
        test.settings = hsettings(max_examples=max(10, steps // 40), stateful_step_count=40, deadline=None,
                                  suppress_health_check=list(HealthCheck), database=None,
                                  # real servers and timing: a replay while shrinking is not exact, and a
                                  # failure reported at once (with its steps) beats one shrunk past the timeout
                                  phases=[Phase.generate])
        test("runTest").runTest()
    return counter[0]


@pytest.mark.parametrize("resume", [False, True], ids=["dead", "stalled"])
@pytest.mark.parametrize("lose_redis", [False, True], ids=["redis-kept", "redis-lost"])
@pytest.mark.parametrize("crash_at", STEPS)
def test_every_crash_point(redis_url: str, nats_url: str, crash_at: str, lose_redis: bool, resume: bool) -> None:
    """Each single crash systematically (the random walk below meets them only by
    chance): a placement stops at ``crash_at``; Redis is lost or not; its deadline
    passes; a retry comes; the stalled owner wakes up (or never does). The retry and the
    owner never answer two placements, and the key converges to one lease."""
    machine = make_machine(redis_url, nats_url, [0])()
    try:
        machine.setup()
        machine.request(key="k0", crash_at=crash_at)
        if lose_redis:
            machine.redis_lost()
        machine.time_passes(STALE_S + 0.5)
        machine.request(key="k0", crash_at=None)
        if resume and machine.suspended:
            machine.stalled_owner_resumes(0)
        machine.one_answer_per_key()
    except BaseException:
        machine.teardown()
        raise
    machine.teardown()  # converges: every key retried, live leases are the answered ones


def test_idempotency_keys_converge_through_crashes_and_redis_loss(redis_url: str, nats_url: str) -> None:
    steps = _run(redis_url, nats_url, DEFAULT_STEPS)
    assert steps >= DEFAULT_STEPS


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_idempotency_keys_soak(redis_url: str, nats_url: str) -> None:
    steps = _run(redis_url, nats_url, 20_000)
    assert steps >= 20_000
