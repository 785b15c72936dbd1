"""NATS subject and JetStream stream names, built in one place.

Every name carries the deployment prefix (default ``cb``) so that tests and
side-by-side deployments can share one NATS server without seeing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .settings import Settings

CAPACITY = "capacity"
ALLOC = "alloc"
REQUEST = "request"
BILLING = "billing"
EVENT_KINDS = (CAPACITY, ALLOC, REQUEST, BILLING)
IDEMPOTENCY = "idempotency"  # the broker's KV bucket: the durable copy of each Idempotency-Key


@dataclass(frozen=True, slots=True)
class Subjects:
    prefix: str = "cb"

    def capacity(self, region: str, provider: str) -> str:
        return f"{self.prefix}.events.{CAPACITY}.{region}.{provider}"

    def alloc(self, region: str, tenant: str) -> str:
        return f"{self.prefix}.events.{ALLOC}.{region}.{tenant}"

    def request(self, tenant: str) -> str:
        return f"{self.prefix}.events.{REQUEST}.{tenant}"

    def billing(self, tenant: str) -> str:
        return f"{self.prefix}.events.{BILLING}.{tenant}"

    def events(self, kind: str | None = None) -> str:
        """Wildcard over all events, or over one kind."""
        return f"{self.prefix}.events.{kind}.>" if kind else f"{self.prefix}.events.>"

    def rpc(self, service: str, verb: str) -> str:
        return f"{self.prefix}.rpc.{service}.{verb}"

    def key_revoked(self) -> str:
        """Core NATS broadcast: an API key id was revoked; every replica drops it."""
        return f"{self.prefix}.auth.revoked"

    def stream(self, kind: str) -> str:
        """JetStream stream name for one event kind (stream names allow no dots)."""
        return f"{self.prefix.upper()}_{kind.upper()}"

    def bucket(self, name: str) -> str:
        """JetStream key-value bucket name (the durable records that are not events)."""
        return f"{self.prefix}_{name}"


@dataclass(frozen=True, slots=True)
class MeterNames:
    """Streams, subjects and buckets of the meter's state. ``state`` is a prefix of its own
    so that a fresh meter can replay the same allocation stream into new state."""

    prefix: str  # deployment prefix (the alloc stream's)
    state: str  # meter state prefix
    durable: str

    @classmethod
    def of(cls, settings: Settings) -> MeterNames:
        state = settings.meter_state or settings.prefix
        durable = settings.meter_durable or ("meter" if state == settings.prefix else f"meter_{state}")
        return cls(prefix=settings.prefix, state=state, durable=durable)

    # --- ledger: append-only entries (and period-close markers) ---------------------------
    @property
    def ledger_stream(self) -> str:
        return f"{self.state.upper()}_LEDGER"

    def ledger(self, tenant: str) -> str:
        return f"{self.state}.ledger.{tenant}"

    @property
    def ledger_control(self) -> str:
        """Period-close markers live in the ledger stream itself: their position in the
        stream decides, for every replica alike, which entries a final invoice holds.
        (``_ctl`` can never be a tenant id: ids start with a-z or 0-9.)"""
        return f"{self.state}.ledger._ctl"

    @property
    def ledger_subjects(self) -> str:
        return f"{self.state}.ledger.>"

    # --- dead letters ---------------------------------------------------------------------
    @property
    def dlq_stream(self) -> str:
        return f"{self.state.upper()}_DLQ"

    @property
    def dlq(self) -> str:
        return f"{self.state}.dlq.meter"

    # --- key-value buckets ----------------------------------------------------------------
    @property
    def accounts(self) -> str:
        """``<tenant>.<lease id>`` -> Account (last applied seq, what was billed)."""
        return f"{self.state}_meter_accounts"

    @property
    def invoices(self) -> str:
        """``<tenant>.<period>`` -> the final invoice, written once."""
        return f"{self.state}_invoices"

    @property
    def budgets(self) -> str:
        """``<tenant>`` -> Budget."""
        return f"{self.state}_budgets"
