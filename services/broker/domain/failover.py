"""Failover, decided without any server: whether a lease that ended is replaced, what
its replacement asks for, and how the replacement's leases take the ended one's place
(docs/lifecycle.md, "Failover"). The broker's ``failover`` module acts on it."""

from __future__ import annotations

from datetime import datetime, timedelta

import msgspec

from services.common.delivery import Attempt
from services.common.messages import AllocEvent, LeaseFailed, LeaseInfo, LeaseLost

from .requests import ComputeRequest

REPLACED_ON = (LeaseFailed, LeaseLost)  # preempted, revoked, released, expired: never replaced
MIN_TERM_LEFT_S = 60  # a fixed-end lease this close to its end is not worth replacing


def is_replaceable(event: AllocEvent) -> bool:
    return isinstance(event, REPLACED_ON)


def was_ready(event: LeaseFailed | LeaseLost) -> bool:
    """Whether the ended lease was ever billed. A failed lease never was (it fails only
    from provisioning); a capacity-only lease is ready at grant; a delivered one became
    ready at its seq 2 (``lease.ready``), so one lost at seq 2 ended while provisioning."""
    if isinstance(event, LeaseFailed):
        return False
    return not event.lease.delivery or event.seq > 2


def attempt_of(event: LeaseFailed | LeaseLost) -> Attempt:
    lease = event.lease
    return Attempt(lease_id=lease.lease_id, pool_id=lease.pool_id, provider=lease.provider, region=lease.region,
                   state="failed" if isinstance(event, LeaseFailed) else "lost", granted_at=lease.granted_at,
                   ended_at=event.at, reason=event.reason, charged=was_ready(event))


def stop_reason(body: ComputeRequest, replacements: int, lease: LeaseInfo, now: datetime) -> str | None:
    """Why the ended lease is not replaced, or None when it is."""
    if body.on_failure == "fail":
        return "not replaced: on_failure is fail"
    if replacements >= body.max_replacements:
        return f"not replaced: max_replacements ({body.max_replacements}) reached"
    if lease.ttl_s == 0 and lease.expires_at <= now + timedelta(seconds=MIN_TERM_LEFT_S):
        return "not replaced: its term or duration was over"
    return None


def replacement_body(body: ComputeRequest, lease: LeaseInfo, whole: bool) -> ComputeRequest:
    """The request again when the ended lease was its only one; otherwise its part: the
    ended lease's units (of the same model for a request asked as performance, so that
    the part delivers what it did)."""
    if whole:
        return body
    if body.performance is not None:
        accelerators = msgspec.structs.replace(body.accelerators, models=[lease.model])
        return msgspec.structs.replace(body, units=lease.units, performance=None, accelerators=accelerators)
    return msgspec.structs.replace(body, units=lease.units)


def carry(new: LeaseInfo, old: LeaseInfo) -> LeaseInfo:
    """The replacement's lease: the next attempt, naming what it replaces; a fixed end
    (reserved term, duration) is kept, so the replacement runs the remaining term only."""
    expires = old.expires_at if old.ttl_s == 0 else new.expires_at
    return msgspec.structs.replace(new, attempt=old.attempt + 1, replaces=old.lease_id, expires_at=expires)


def queue_deadline(body: ComputeRequest, lease: LeaseInfo, now: datetime) -> datetime | None:
    """How long a replacement waits for capacity: the request's ``deadline_s`` from now,
    and never past a fixed-end lease's end (there is nothing left to replace then)."""
    ends = [now + timedelta(seconds=body.deadline_s)] if body.deadline_s else []
    if lease.ttl_s == 0:
        ends.append(lease.expires_at - timedelta(seconds=MIN_TERM_LEFT_S))
    return min(ends) if ends else None
