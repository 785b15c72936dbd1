"""Stateful property test of failover's request scripts (``claim_replacement.lua``,
``settle_replacement.lua``) with the queue pass's (``claim_request.lua``,
``settle_request.lua``) against a real redis-server, in any interleaving of:

* the leases of a split request failing (each ending event then pending in the durable
  consumer until acknowledged), and grants given back before the request held them;
* two broker replicas taking pending events (a redelivery may reach either, even one
  already holding it), claiming, and settling each claim as replaced, stopped, queued or
  given up; acknowledging afterwards, or crashing before the acknowledgement;
* a replica crashing while it holds a claim (the claim expires; the event comes back),
  or stalling past its claim's expiry while the other takes the event over;
* time passing; a queue pass placing a replacement that waited for capacity.

Invariants after every step: Redis holds what a plain model says (state, leases held,
the outcome recorded per lease); no lease is replaced twice; a lease whose outcome is
recorded is never held again. At the end every pending event is delivered until it is
acknowledged, and then every lease that failed has its outcome recorded: a crash never
loses a replacement."""

from __future__ import annotations

import itertools
import uuid
from collections import Counter
from datetime import UTC, datetime

import msgspec
import pytest
import redis
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from services.broker.domain.requests import ComputeRequest
from services.broker.records import RequestRecord
from services.common.keys import Keys
from services.common.redis_conn import read_lua

from ..helpers import own_db

CLAIM_S = 10.0
REPLICAS = (0, 1)
OUTCOMES = ("replaced", "stopped", "queued", "give_up")
T0 = datetime(2026, 1, 1, tzinfo=UTC)


class Claim(msgspec.Struct):
    token: str
    lease: str
    record: bytes  # the record the claim read: what its settle writes back, changed


def make_machine(url: str, seen: Counter[str]) -> type[RuleBasedStateMachine]:
    client = redis.Redis.from_url(url)
    claim_r = client.register_script(read_lua("services.broker.lua", "claim_replacement.lua"))
    settle_r = client.register_script(read_lua("services.broker.lua", "settle_replacement.lua"))
    claim_q = client.register_script(read_lua("services.broker.lua", "claim_request.lua"))
    settle_q = client.register_script(read_lua("services.broker.lua", "settle_request.lua"))
    decode = msgspec.json.Decoder(RequestRecord)

    class FailoverScripts(RuleBasedStateMachine):
        @initialize(n=st.integers(1, 3))
        def setup(self, n: int) -> None:
            self.key = Keys(f"fo{uuid.uuid4().hex[:10]}").request("r")
            self.ids = itertools.count()
            self.now = 1000.0
            self.state = "placed"
            self.held = [f"l{next(self.ids)}" for _ in range(n)]
            self.failed: set[str] = set()  # every lease that failed (its event was published)
            self.pending: set[str] = set()  # events not acknowledged
            self.outcomes: dict[str, str] = {}
            self.replaced: Counter[str] = Counter()
            self.claims: dict[int, Claim] = {}  # what each replica holds (it may have been taken over)
            self.owner: tuple[str, float] | None = None  # the request's live claim: token, until
            self.queue_claim: tuple[str, float] | None = None
            record = RequestRecord(request_id="r", tenant="t", state="placed", created_at=T0, updated_at=T0,
                                   body=ComputeRequest(units=n), lease_ids=list(self.held))
            client.hset(self.key, mapping={"state": "placed", "updated_at": T0.isoformat(),
                                           "record": msgspec.json.encode(record)})

        def teardown(self) -> None:
            if not hasattr(self, "key"):
                return
            try:
                self.drain()
            finally:
                client.delete(self.key)

        # --- helpers ---------------------------------------------------------------------------
        def expected_claim(self, lease: str) -> int:
            if lease in self.outcomes:
                return 2
            if self.state == "replacing":
                assert self.owner is not None
                if self.owner[1] > self.now or lease not in self.held:
                    return 0
                return 1
            if self.state in ("queued", "placing"):
                return 0
            if self.state != "placed" or lease not in self.held:
                return 3
            return 1

        def claim(self, replica: int, lease: str) -> int:
            """claim_replacement.lua; the model says what it must answer."""
            token = uuid.uuid4().hex
            code, payload = claim_r(keys=[self.key], args=[lease, token, self.now, self.now + CLAIM_S])
            code = int(code)
            assert code == self.expected_claim(lease), (code, lease, self.state, self.held, self.outcomes)
            seen[f"claim {code}"] += 1
            if code == 1:
                self.state, self.owner = "replacing", (token, self.now + CLAIM_S)
                self.claims[replica] = Claim(token, lease, payload)
            return code

        def settle(self, replica: int, outcome: str) -> bool:
            claim = self.claims.pop(replica)
            record = decode.decode(claim.record)
            kept = [i for i in record.lease_ids if i != claim.lease]
            new = f"l{next(self.ids)}"
            state, result = {"replaced": ("placed", {"by": [[new, "b"]]}),
                             "stopped": ("placed" if kept else "failed", {"reason": "x"}),
                             "queued": ("queued", {}), "give_up": ("placed", None)}[outcome]
            if outcome != "give_up":
                record.lease_ids = [*kept, new] if outcome == "replaced" else kept
                result = {"outcome": outcome, **result}
            raw = settle_r(keys=[self.key], args=[claim.token, claim.lease, state, T0.isoformat(),
                                                  msgspec.json.encode(record) if result is not None else "",
                                                  msgspec.json.encode(result) if result is not None else ""])
            ok = self.state == "replacing" and self.owner is not None and self.owner[0] == claim.token
            assert int(raw[0]) == int(ok), (raw, outcome, self.state)
            seen[f"settle {outcome} {ok}"] += 1
            seen["settle refused"] += not ok
            if not ok:
                return False
            self.state, self.owner = state, None
            if result is not None:
                self.outcomes[claim.lease] = outcome
                self.held = record.lease_ids
                self.replaced[claim.lease] += outcome == "replaced"
            return True

        def queue_pass(self) -> bool:
            """The queue pass places a replacement that waited (claim, then settle placed)."""
            token = uuid.uuid4().hex
            raw = claim_q(keys=[self.key], args=[token, self.now, self.now + 60])
            ok = self.state == "queued" or (self.state == "placing" and self.queue_claim is not None
                                            and self.queue_claim[1] <= self.now)
            assert int(raw[0]) == int(ok), (raw, self.state)
            if not ok:
                return False
            record = decode.decode(raw[1])
            record.lease_ids = [*record.lease_ids, f"l{next(self.ids)}"]
            assert settle_q(keys=[self.key], args=[token, "placed", T0.isoformat(),
                                                   msgspec.json.encode(record)]) == [1]
            self.state, self.held, self.queue_claim = "placed", record.lease_ids, None
            seen["queue pass"] += 1
            return True

        def drain(self) -> None:
            """Every pending event delivered until acknowledged, by a replica that never
            crashes again; then every failed lease has its outcome."""
            self.claims.clear()
            self.now += 10 * CLAIM_S
            for _ in range(20):
                if not self.pending:
                    break
                for lease in sorted(self.pending):
                    code = self.claim(0, lease)
                    if code == 1:
                        self.settle(0, "replaced")
                        self.pending.discard(lease)
                    elif code in (2, 3):
                        self.pending.discard(lease)
                    elif self.state in ("queued", "placing"):
                        self.now += 100
                        self.queue_pass()
            assert not self.pending
            assert self.failed <= set(self.outcomes), (self.failed, self.outcomes)
            self.redis_matches_model()

        # --- rules -----------------------------------------------------------------------------
        @precondition(lambda self: any(i not in self.failed for i in self.held))
        @rule(data=st.data())
        def a_lease_fails(self, data: st.DataObject) -> None:
            lease = data.draw(st.sampled_from([i for i in self.held if i not in self.failed]))
            self.failed.add(lease)
            self.pending.add(lease)

        @precondition(lambda self: not any(i.startswith("g") for i in self.pending))
        @rule()
        def a_grant_given_back_is_lost(self) -> None:
            """``lease.lost`` of a lease the request never held (a grant retracted before
            its request was settled): nothing to replace."""
            self.pending.add(f"g{next(self.ids)}")

        @precondition(lambda self: bool(self.pending))
        @rule(replica=st.sampled_from(REPLICAS), data=st.data())
        def a_replica_takes_an_event(self, replica: int, data: st.DataObject) -> None:
            if replica in self.claims:
                return  # it is busy with its claim
            lease = data.draw(st.sampled_from(sorted(self.pending)))
            code = self.claim(replica, lease)
            if code in (2, 3):
                self.pending.discard(lease)  # acknowledged: nothing to do (again)

        @precondition(lambda self: bool(self.claims))
        @rule(data=st.data(), outcome=st.sampled_from(OUTCOMES), acked=st.booleans())
        def a_replica_settles(self, data: st.DataObject, outcome: str, acked: bool) -> None:
            replica = data.draw(st.sampled_from(sorted(self.claims)))
            lease = self.claims[replica].lease
            if self.settle(replica, outcome) and outcome != "give_up" and acked:
                self.pending.discard(lease)

        @precondition(lambda self: len(self.claims) == 1)
        @rule()
        def a_stalled_replica_is_overtaken(self) -> None:
            """Its claim expires while it stalls, and the event comes back to the other one."""
            [(replica, claim)] = self.claims.items()
            self.now += CLAIM_S + 1
            self.claim(1 - replica, claim.lease)

        @precondition(lambda self: bool(self.claims))
        @rule(data=st.data())
        def a_replica_crashes(self, data: st.DataObject) -> None:
            self.claims.pop(data.draw(st.sampled_from(sorted(self.claims))))
            seen["crash"] += 1

        @rule(dt=st.sampled_from([1.0, CLAIM_S / 2, CLAIM_S + 1]))
        def time_passes(self, dt: float) -> None:
            self.now += dt

        @precondition(lambda self: self.state in ("queued", "placing"))
        @rule()
        def the_queue_places_the_replacement(self) -> None:
            self.queue_pass()

        @invariant()
        def redis_matches_model(self) -> None:
            if not hasattr(self, "key"):
                return
            fields = {k.decode(): v for k, v in client.hgetall(self.key).items()}
            assert fields["state"].decode() == self.state
            assert decode.decode(fields["record"]).lease_ids == self.held
            ended = {k.removeprefix("ended:"): msgspec.json.decode(v)["outcome"]
                     for k, v in fields.items() if k.startswith("ended:")}
            assert ended == self.outcomes
            assert all(n <= 1 for n in self.replaced.values())
            assert not set(self.held) & set(self.outcomes)
            assert ("claim" in fields) == (self.state in ("replacing", "placing"))

    return FailoverScripts


@pytest.mark.timeout(600)
def test_failover_scripts_match_model(redis_url: str) -> None:
    seen: Counter[str] = Counter()
    machine = make_machine(own_db(redis_url), seen)
    machine.TestCase.settings = hsettings(max_examples=300, stateful_step_count=40, deadline=None)
    machine.TestCase().runTest()
    # the interleavings that matter were met
    for what in ("claim 0", "claim 1", "claim 2", "claim 3", "settle replaced True", "settle refused",
                 "settle queued True", "settle give_up True", "crash", "queue pass"):
        assert seen[what], (what, seen)
