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
FAILOVER = "failover"  # the broker's failover work queue (not an event kind): stream(FAILOVER)
EVENT_KINDS = (CAPACITY, ALLOC, REQUEST, BILLING)
IDEMPOTENCY = "idempotency"  # the broker's KV bucket: the durable copy of each Idempotency-Key
ACCESS = "access"  # the broker's KV bucket: each delivered lease's access details (never in an event)


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

    def failover_work(self, region: str | None = None) -> str:
        """JetStream work queue of the broker's failover: every ``lease.failed`` and
        ``lease.lost`` again, so that failover reads only what it must act on instead of
        every allocation event (docs/decisions.md, "Failover reads a work queue").
        Internal to the broker: no other service publishes or reads it."""
        return f"{self.prefix}.work.{FAILOVER}.{region}" if region else f"{self.prefix}.work.{FAILOVER}.>"

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


# --- keys of the topology bucket (``Subjects.bucket("regions")``) -------------------------
# One key per region (its id, as since the bucket's first version) and one per published
# link; derived links are never stored (``services.common.network``).
LINK_KEY = "link"


def region_key(region_id: str) -> str:
    """Key of a region's record (``Region`` JSON)."""
    return region_id


def link_key(src: str, dst: str) -> str:
    """Key of a published link ``src -> dst`` (``Link`` JSON). Region ids have no dots."""
    return f"{LINK_KEY}.{src}.{dst}"


def parse_topology_key(key: str) -> tuple[str, str] | str | None:
    """A region id, a ``(src, dst)`` pair for a link key, or None for a key of neither shape."""
    parts = key.split(".")
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 3 and parts[0] == LINK_KEY:
        return parts[1], parts[2]
    return None


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

    def ledger(self, tenant: str, entry_id: str) -> str:
        """One subject per entry: appending is create-only on it (``meter/ledger.py``)."""
        return f"{self.state}.ledger.{tenant}.{entry_id}"

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
