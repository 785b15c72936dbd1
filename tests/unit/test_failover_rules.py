"""The pure failover decisions (``services/broker/domain/failover.py``): which endings
are replaced, when a replacement stops, what the replacement asks for, and what its
leases carry over from the ended one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from services.broker.domain.failover import (
    attempt_of,
    carry,
    is_replaceable,
    queue_deadline,
    replacement_body,
    stop_reason,
    was_ready,
)
from services.broker.domain.requests import ComputeRequest, Performance, Shape
from services.common.messages import (
    LeaseExpired,
    LeaseFailed,
    LeaseInfo,
    LeaseLost,
    LeasePreempted,
    LeaseReleased,
    LeaseRevoked,
)

NOW = datetime(2026, 12, 6, 12, tzinfo=UTC)


def lease(**over: object) -> LeaseInfo:
    base = dict(lease_id="l1", request_id="r1", tenant="t1", pool_id="a", provider="acme", region="cn-gz",
                model="huawei-ascend-910b", units=4, billing="on_demand", unit_price=Decimal("1.2"),
                granted_at=NOW - timedelta(hours=1), expires_at=NOW + timedelta(hours=1))
    return LeaseInfo(**{**base, **over})  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", [LeaseLost, LeaseFailed])
def test_failed_and_lost_are_replaced(kind: type) -> None:
    assert is_replaceable(kind(id="l1.2", at=NOW, lease=lease(), seq=2))


@pytest.mark.parametrize("kind", [LeasePreempted, LeaseRevoked, LeaseReleased, LeaseExpired])
def test_other_endings_never_are(kind: type) -> None:
    assert not is_replaceable(kind(id="l1.2", at=NOW, lease=lease(), seq=2))


def test_stop_reasons() -> None:
    body = ComputeRequest(units=4)
    assert stop_reason(body, 0, lease(), NOW) is None
    assert stop_reason(body, 1, lease(), NOW) is None
    assert "max_replacements (2)" in (stop_reason(body, 2, lease(), NOW) or "")
    assert "on_failure is fail" in (stop_reason(ComputeRequest(units=4, on_failure="fail"), 0, lease(), NOW) or "")
    assert stop_reason(ComputeRequest(units=4, max_replacements=0), 0, lease(), NOW) is not None
    ending = lease(expires_at=NOW + timedelta(seconds=30))  # a fixed end 30 s away: nothing left to replace
    assert "over" in (stop_reason(body, 0, ending, NOW) or "")
    assert stop_reason(body, 0, lease(expires_at=NOW + timedelta(seconds=30), ttl_s=300), NOW) is None  # open


def test_the_whole_request_or_the_part_the_lease_held() -> None:
    body = ComputeRequest(units=8, shape=Shape(kind="split"))
    assert replacement_body(body, lease(units=4), whole=True) is body
    assert replacement_body(body, lease(units=4), whole=False).units == 4
    perf = ComputeRequest(performance=Performance(min_tflops=5000))
    part = replacement_body(perf, lease(units=4), whole=False)
    assert (part.units, part.performance, part.accelerators.models) == (4, None, ["huawei-ascend-910b"])


def test_the_replacement_carries_attempt_replaces_and_a_fixed_end() -> None:
    old = lease(attempt=2, billing="reserved_month", term_months=1, expires_at=NOW + timedelta(days=20))
    new = lease(lease_id="l2", pool_id="b", expires_at=NOW + timedelta(days=30), granted_at=NOW)
    got = carry(new, old)
    assert (got.attempt, got.replaces, got.expires_at, got.pool_id) == (3, "l1", old.expires_at, "b")
    opened = carry(lease(lease_id="l2", ttl_s=300, expires_at=NOW + timedelta(seconds=300)), lease(ttl_s=300))
    assert opened.expires_at == NOW + timedelta(seconds=300)  # an open lease: a fresh TTL


def test_queue_deadline() -> None:
    assert queue_deadline(ComputeRequest(units=1, lease_ttl_s=60), lease(ttl_s=60), NOW) is None
    assert queue_deadline(ComputeRequest(units=1, deadline_s=600), lease(ttl_s=60), NOW) == NOW + timedelta(minutes=10)
    fixed = lease(expires_at=NOW + timedelta(seconds=300))
    assert queue_deadline(ComputeRequest(units=1, deadline_s=600), fixed, NOW) == NOW + timedelta(seconds=240)


def test_attempts_and_what_was_charged() -> None:
    failed = LeaseFailed(id="l1.2", at=NOW, lease=lease(delivery="ssh"), seq=2, reason="no daemon")
    assert not was_ready(failed)
    attempt = attempt_of(failed)
    assert (attempt.state, attempt.reason, attempt.charged, attempt.ended_at) == ("failed", "no daemon", False, NOW)
    assert was_ready(LeaseLost(id="l1.2", at=NOW, lease=lease(), seq=2))  # capacity only: ready at grant
    assert not was_ready(LeaseLost(id="l1.2", at=NOW, lease=lease(delivery="ssh"), seq=2))  # lost provisioning
    assert was_ready(LeaseLost(id="l1.3", at=NOW, lease=lease(delivery="ssh"), seq=3))  # after its lease.ready
