"""The one wall clock of the services. Use cases take a ``clock`` argument defaulting to
``utcnow`` so that tests can move time; nothing else calls ``datetime.now``."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)
