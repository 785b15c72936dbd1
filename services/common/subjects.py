"""NATS subject and JetStream stream names, built in one place.

Every name carries the deployment prefix (default ``cb``) so that tests and
side-by-side deployments can share one NATS server without seeing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

CAPACITY = "capacity"
ALLOC = "alloc"
REQUEST = "request"
BILLING = "billing"
EVENT_KINDS = (CAPACITY, ALLOC, REQUEST, BILLING)


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
