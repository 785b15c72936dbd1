"""The meter's own settings and the names of its durable state.

TODO(common): these belong in ``services/common/settings.py`` (fields of ``Settings``) and
``services/common/subjects.py`` (the ledger/DLQ subjects and stream names); until the lead
moves them there they are read here from the same ``CB_*`` environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from services.common.settings import Settings


# TODO(common): fields of services.common.settings.Settings
class MeterSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``CB_<FIELD>`` in the environment (e.g. ``CB_MIN_BILL_S=60``)."""

    min_bill_s: int = 60  # minimum billed increment of a per-second lease
    invoice_grace_s: float = 3 * 86400.0  # a period's invoices are final this long after it ends
    meter_state: str = ""  # prefix of the meter's own state (ledger, accounts, ...); "" = the deployment prefix
    meter_durable: str = ""  # durable consumer name on the alloc stream; "" = "meter" (or "meter_<state>")
    meter_batch: int = 1000  # events fetched per pull
    meter_ack_wait_s: float = 30.0  # unacked events are redelivered after this (e.g. the meter died)
    meter_max_attempts: int = 5  # failed processing attempts before an event is dead-lettered
    finalize_interval_s: float = 5.0  # how often a replica checks whether a period is due to be final
    budget_interval_s: float = 5.0  # how often budgets are evaluated (and on every posted entry)
    ledger_dup_window_s: float = 7 * 86400.0  # Nats-Msg-Id de-duplication window of the ledger


def meter_env_name(field: str) -> str:
    return f"CB_{field.upper()}"


def meter_settings_from_env(environ: Mapping[str, str] | None = None, **overrides: Any) -> MeterSettings:
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    for field in MeterSettings.__struct_fields__:
        name = meter_env_name(field)
        if environ.get(name):
            raw[field] = environ[name]
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return msgspec.convert(raw, MeterSettings, strict=False)


def meter_settings_to_env(ms: MeterSettings) -> dict[str, str]:
    return {meter_env_name(f): str(getattr(ms, f)) for f in MeterSettings.__struct_fields__
            if getattr(ms, f) not in ("", None)}


# TODO(common): builders of services.common.subjects.Subjects
@dataclass(frozen=True, slots=True)
class MeterNames:
    """Streams, subjects and buckets of the meter's state. ``state`` is a prefix of its own
    so that a fresh meter can replay the same allocation stream into new state."""

    prefix: str  # deployment prefix (the alloc stream's)
    state: str  # meter state prefix
    durable: str

    @classmethod
    def of(cls, settings: Settings, ms: MeterSettings) -> MeterNames:
        state = ms.meter_state or settings.prefix
        durable = ms.meter_durable or ("meter" if state == settings.prefix else f"meter_{state}")
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
