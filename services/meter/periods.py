"""Billing periods: UTC calendar months, written ``YYYY-MM``. Pure."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_PERIOD_RE = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$")


class BadPeriod(ValueError):
    pass


def parse_period(text: str) -> str:
    """Validate ``YYYY-MM`` (months 01-12, years 2000-9998); returns it unchanged."""
    m = _PERIOD_RE.match(text or "")
    if not m:
        raise BadPeriod(f"period {text!r} is not YYYY-MM (e.g. 2026-03)")
    year = int(m.group(1))
    if not 2000 <= year <= 9998:
        raise BadPeriod(f"period {text!r}: year must be between 2000 and 9998")
    return text


def period_of(at: datetime) -> str:
    at = at.astimezone(UTC) if at.tzinfo else at.replace(tzinfo=UTC)
    return f"{at.year:04d}-{at.month:02d}"


def period_start(period: str) -> datetime:
    year, month = int(period[:4]), int(period[5:7])
    return datetime(year, month, 1, tzinfo=UTC)


def next_period(period: str) -> str:
    year, month = int(period[:4]), int(period[5:7])
    return f"{year + 1:04d}-01" if month == 12 else f"{year:04d}-{month + 1:02d}"


def prev_period(period: str) -> str:
    year, month = int(period[:4]), int(period[5:7])
    return f"{year - 1:04d}-12" if month == 1 else f"{year:04d}-{month - 1:02d}"


def period_end(period: str) -> datetime:
    """First instant after the period (the start of the next month)."""
    return period_start(next_period(period))


def final_at(period: str, grace_s: float) -> datetime:
    """When the period's invoices become final: its end plus the grace window."""
    return period_end(period) + timedelta(seconds=grace_s)


def last_final_period(now: datetime, grace_s: float) -> str:
    """The latest period whose invoices are due to be final at ``now``."""
    p = prev_period(period_of(now))
    while final_at(p, grace_s) > now:
        p = prev_period(p)
    return p
