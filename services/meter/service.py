"""The meter's domain behind the HTTP API: who may see what, invoices (drafts, final
snapshots, issuing), usage, statements, budgets, dead letters."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError, NotFoundError
from nats.js.kv import KeyValue

from services.common.auth import KeyRecord, Principal
from services.common.clock import utcnow
from services.common.errors import BadRequest, Forbidden, NotFound, Unavailable, Unprocessable
from services.common.ids import is_valid_id
from services.common.jetstream import follow_bucket, unfollow
from services.common.messages import InvoiceIssued
from services.common.nats_conn import publish_event, read_stream
from services.common.settings import Settings
from services.common.subjects import MeterNames, Subjects

from .aggregate import Aggregate
from .budgets import Budgets
from .consumer import AllocConsumer, Poison
from .invoices import GROUPS, build_invoice, usage_rows, usage_totals
from .ledger import Ledger, encode
from .model import BudgetBody, BudgetView, DeadLetter, Invoice, PeriodsClosed, StoredInvoice
from .periods import BadPeriod, final_at, last_final_period, parse_period
from .pricing import minor_places

log = logging.getLogger("meter")
_stored = msgspec.json.Decoder(StoredInvoice)
_key_record = msgspec.json.Decoder(KeyRecord)
_dead = msgspec.json.Decoder(DeadLetter)
CURRENCY_PATTERN = "^[A-Z]{3}$"


def period_param(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return parse_period(value)
    except BadPeriod as exc:
        raise BadRequest(str(exc)) from exc


def id_param(name: str, value: str | None) -> str | None:
    if value is not None and not is_valid_id(value):
        raise BadRequest(f"{name} {value!r} is not an id (1-63 of a-z 0-9 _ -, starting with a letter or digit)")
    return value


class TenantDirectory:
    """Tenants that exist: those with a tenant key (the keys bucket, watched) or any
    ledger entry."""

    def __init__(self, js: JetStreamContext, bucket: str) -> None:
        self.js, self.bucket = js, bucket
        self.tenants: set[str] = set()
        self._sub: JetStreamContext.PushSubscription | None = None

    async def start(self) -> None:
        """Returns once every key of the bucket is in."""
        self._sub = await follow_bucket(self.js, self.bucket, self._on_key)

    async def stop(self) -> None:
        await unfollow(self._sub)

    def _on_key(self, key: str, value: bytes | None, revision: int) -> None:
        if value:
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                record = _key_record.decode(value)
                if record.role == "tenant" and record.subject:
                    self.tenants.add(record.subject)


class Meter:
    def __init__(self, *, js: JetStreamContext, names: MeterNames, subjects: Subjects, settings: Settings,
                 ledger: Ledger, consumer: AllocConsumer, budgets: Budgets, invoices_kv: KeyValue,
                 directory: TenantDirectory, clock: Callable[[], datetime] = utcnow) -> None:
        self.js, self.names, self.subjects, self.settings = js, names, subjects, settings
        self.ledger, self.consumer, self.budgets = ledger, consumer, budgets
        self.invoices_kv, self.directory, self.clock = invoices_kv, directory, clock
        self._stored_keys: set[str] | None = None
        self._issue_lock = asyncio.Lock()
        self._closed_at: dict[str, datetime] = {}

    @property
    def aggregate(self) -> Aggregate:
        return self.ledger.aggregate

    def require_ready(self) -> None:
        if not self.ledger.ready.is_set():
            done, target = self.ledger.progress
            raise Unavailable(f"the meter is rebuilding its ledger aggregate ({done} of {target}); retry shortly")

    # --- scoping ------------------------------------------------------------------------------
    def tenant_scope(self, who: Principal, tenant: str | None, *, required: bool) -> str | None:
        """A tenant sees its own; ops and admin anyone (``tenant=``); another tenant's is 404."""
        id_param("tenant", tenant)
        if who.role == "tenant":
            if tenant is not None and tenant != who.subject:
                raise NotFound(f"no tenant {tenant}")
            return who.subject
        if who.role in ("admin", "ops"):
            if required and tenant is None:
                raise BadRequest("give ?tenant=<tenant id>")
            return tenant
        raise Forbidden(f"role {who.role} has no invoices or usage (providers: GET /v1/statements)")

    def known_tenant(self, tenant: str) -> bool:
        return tenant in self.directory.tenants or self.aggregate.knows_tenant(tenant)

    # --- usage --------------------------------------------------------------------------------
    def usage(self, who: Principal, *, tenant: str | None, period: str | None, region: str | None,
              model: str | None, provider: str | None, pool: str | None, billing: str | None,
              group_by: Sequence[str]) -> dict[str, Any]:
        tenant = self.tenant_scope(who, tenant, required=False)
        for name, value in (("region", region), ("model", model), ("provider", provider), ("pool", pool)):
            id_param(name, value)
        period = period_param(period)
        for g in group_by:
            if g not in GROUPS:
                raise BadRequest(f"cannot group by {g!r}; choose from {', '.join(GROUPS)}")
        if len(set(group_by)) != len(group_by):
            raise BadRequest("group_by names a field twice")
        self.require_ready()
        rows = usage_rows(self.aggregate.cells(tenant), group_by,
                          {"period": period, "region": region, "model": model, "provider": provider,
                           "pool": pool, "billing": billing})
        return {"tenant": tenant, "period": period, "group_by": list(group_by), "rows": rows,
                "totals": usage_totals(rows)}

    # --- statements ---------------------------------------------------------------------------
    def statements(self, who: Principal, provider: str | None, period: str | None) -> dict[str, Any]:
        id_param("provider", provider)
        if who.role == "provider":
            if provider is not None and provider != who.subject:
                raise NotFound(f"no provider {provider}")
            provider = who.subject
        elif who.role in ("admin", "ops"):
            if provider is None:
                raise BadRequest("give ?provider=<provider id>")
        else:
            raise Forbidden("statements are for providers (and ops, admin)")
        period = period_param(period)
        self.require_ready()
        rows = usage_rows(self.aggregate.cells(), ["period", "pool", "billing"],
                          {"provider": provider, "period": period})
        periods: dict[str, dict[str, Any]] = {}
        for row in rows:
            p = periods.setdefault(row["period"], {"period": row["period"], "pools": [], "totals": {}})
            p["pools"].append({k: row[k] for k in ("pool", "billing", "currency", "amount", "unit_hours",
                                                   "unit_months", "entries")})
            p["totals"][row["currency"]] = p["totals"].get(row["currency"], Decimal(0)) + row["amount"]
        return {"provider": provider, "periods": [periods[k] for k in sorted(periods)]}

    # --- invoices -----------------------------------------------------------------------------
    def _draft(self, tenant: str, period: str) -> Invoice:
        return build_invoice(tenant, period, self.aggregate.invoice_cells(tenant, period),
                             final=False, final_after=final_at(period, self.settings.invoice_grace_s),
                             attempts=self.aggregate.invoice_attempts(tenant, period))

    async def invoice(self, who: Principal, period: str, tenant: str | None) -> Invoice:
        period = period_param(period)  # type: ignore[assignment]
        tenant = self.tenant_scope(who, tenant, required=True)
        assert tenant is not None and period is not None
        self.require_ready()
        if not self.known_tenant(tenant):
            raise NotFound(f"no tenant {tenant}")
        if self.aggregate.is_final(period):
            stored = await self._stored(tenant, period)
            if stored is not None:
                return stored.invoice
            return self._final_from_aggregate(tenant, period)
        return self._draft(tenant, period)

    def _final_from_aggregate(self, tenant: str, period: str) -> Invoice:
        return build_invoice(tenant, period, self.aggregate.invoice_cells(tenant, period), final=True,
                             final_after=final_at(period, self.settings.invoice_grace_s),
                             issued_at=self._closed_at.get(period),
                             attempts=self.aggregate.invoice_attempts(tenant, period))

    async def invoices(self, who: Principal, tenant: str | None) -> dict[str, Any]:
        tenant = self.tenant_scope(who, tenant, required=True)
        assert tenant is not None
        self.require_ready()
        if not self.known_tenant(tenant):
            raise NotFound(f"no tenant {tenant}")
        out = []
        for period in reversed(self.aggregate.invoice_periods(tenant)):
            inv = build_invoice(tenant, period, self.aggregate.invoice_cells(tenant, period),
                                final=self.aggregate.is_final(period),
                                final_after=final_at(period, self.settings.invoice_grace_s),
                                attempts=self.aggregate.invoice_attempts(tenant, period))
            out.append({"period": period, "status": inv.status, "totals": inv.totals, "entries": inv.entries,
                        "uncharged": len(inv.uncharged), "final_after": inv.final_after})
        return {"tenant": tenant, "invoices": out}

    async def _stored(self, tenant: str, period: str) -> StoredInvoice | None:
        try:
            entry = await self.invoices_kv.get(f"{tenant}.{period}")
        except KeyNotFoundError:
            return None
        return _stored.decode(entry.value)

    # --- closing periods ----------------------------------------------------------------------
    async def finalize_due(self) -> str | None:
        """Close every period whose grace has passed (a marker in the ledger stream; every
        replica may try, JetStream keeps one per period)."""
        if not self.ledger.ready.is_set():
            return None
        agg = self.aggregate
        target = last_final_period(self.clock(), self.settings.invoice_grace_s)
        if agg.first_period is None or agg.first_period > target:
            return None
        if agg.closed_through is not None and agg.closed_through >= target:
            return None
        await self.ledger.close_through(target, self.clock())
        return target

    async def on_closed(self, periods: list[str], marker: PeriodsClosed) -> None:
        """The fold passed a close marker: snapshot the final invoices of those periods
        (the cells of a closed invoice period never change again) and announce them."""
        agg = self.aggregate
        snapshots = []
        for period in periods:
            self._closed_at[period] = marker.at
            for tenant in agg.tenants_with_invoice(period):
                inv = build_invoice(tenant, period, agg.invoice_cells(tenant, period), final=True,
                                    final_after=final_at(period, self.settings.invoice_grace_s), issued_at=marker.at,
                                    attempts=agg.invoice_attempts(tenant, period))
                snapshots.append(inv)
        if snapshots:
            task = asyncio.create_task(self._store_and_issue(snapshots))
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    async def _store_and_issue(self, invoices: list[Invoice]) -> None:
        async with self._issue_lock:
            if self._stored_keys is None:
                try:
                    self._stored_keys = set(await self.invoices_kv.keys())
                except NoKeysError:
                    self._stored_keys = set()
            for inv in invoices:
                key = f"{inv.tenant}.{inv.period}"
                if key in self._stored_keys:
                    continue
                for attempt in range(5):
                    try:
                        await self._issue(key, inv)
                        break
                    except Exception:
                        log.exception("invoice %s not stored (attempt %d)", key, attempt + 1)
                        await asyncio.sleep(0.5 * (attempt + 1))

    async def _issue(self, key: str, inv: Invoice) -> None:
        try:
            revision = await self.invoices_kv.create(key, encode(StoredInvoice(invoice=inv)))
            stored = StoredInvoice(invoice=inv)
        except KeyWrongLastSequenceError:
            entry = await self.invoices_kv.get(key)
            revision, stored = entry.revision, _stored.decode(entry.value)
        if not stored.issued:
            event = InvoiceIssued(id=f"invoice.{inv.tenant}.{inv.period}", at=inv.issued_at or self.clock(),
                                  tenant=inv.tenant, period=inv.period, totals=stored.invoice.totals)
            await publish_event(self.js, self.subjects.billing(inv.tenant), event)
            with contextlib.suppress(KeyWrongLastSequenceError):
                await self.invoices_kv.update(key, encode(msgspec.structs.replace(stored, issued=True)),
                                              last=revision)
        assert self._stored_keys is not None
        self._stored_keys.add(key)

    # --- budgets ------------------------------------------------------------------------------
    async def put_budget(self, who: Principal, tenant: str, body: BudgetBody) -> BudgetView:
        if who.role != "admin":
            raise Forbidden("only admin sets budgets")
        id_param("tenant", tenant)
        self.require_ready()
        if not re.match(CURRENCY_PATTERN, body.currency):
            raise BadRequest(f"currency {body.currency!r} is not an ISO 4217 code such as USD")
        if not self.known_tenant(tenant):
            raise NotFound(f"no tenant {tenant}: it has no tenant key and no usage")
        amount = body.amount
        if not amount.is_finite():
            raise Unprocessable("amount must be a finite number")
        if amount < 0:
            raise Unprocessable(f"amount must be >= 0, got {amount}")
        if amount > Decimal("1e12"):
            raise Unprocessable("amount must be at most 1000000000000")
        places = minor_places(body.currency)
        exponent = amount.as_tuple().exponent
        if isinstance(exponent, int) and -exponent > places:
            raise Unprocessable(f"amount {amount} has more than {places} decimal places for {body.currency}")
        billed_in = self.aggregate.currencies(tenant)
        if billed_in and body.currency not in billed_in:
            raise Unprocessable(f"tenant {tenant} is billed in {', '.join(sorted(billed_in))}, not {body.currency}")
        budget = await self.budgets.put(tenant, body.kind, amount, body.currency)
        return self.budgets.view(budget)

    async def get_budget(self, who: Principal, tenant: str) -> BudgetView:
        id_param("tenant", tenant)
        if who.role == "provider":
            raise Forbidden("budgets are for tenants (and ops, admin)")
        if who.role == "tenant" and who.subject != tenant:
            raise NotFound(f"no budget for {tenant}")
        self.require_ready()
        found = await self.budgets.get(tenant)
        if found is None:
            raise NotFound(f"no budget for {tenant}")
        await self.budgets.leases_loaded(tenant)
        return self.budgets.view(found[1])

    # --- dead letters and status --------------------------------------------------------------
    def require_ops(self, who: Principal) -> None:
        if who.role not in ("admin", "ops"):
            raise Forbidden("dead letters and meter status are for ops and admin")

    async def dead_letters(self, who: Principal, limit: int) -> dict[str, Any]:
        self.require_ops(who)
        info = await self.js.stream_info(self.names.dlq_stream)
        total, last = info.state.messages, info.state.last_seq
        items: list[dict[str, Any]] = []
        if total:
            start = max(info.state.first_seq, last - limit + 1)
            async with contextlib.aclosing(read_stream(self.js, self.names.dlq_stream, self.names.dlq,
                                                       batch=min(limit, 500), start=start)) as letters:
                async for seq, data in letters:
                    items.append({"seq": seq, **msgspec.to_builtins(_dead.decode(data))})
                    if len(items) >= limit:
                        break
        return {"total": total, "items": items}

    async def retry_dead_letter(self, who: Principal, stream_seq: int) -> dict[str, Any]:
        if who.role != "admin":
            raise Forbidden("only admin retries dead letters")
        try:
            outcome = await self.consumer.retry(stream_seq)
        except Poison as exc:
            raise Unprocessable(f"still cannot be applied: {exc}") from exc
        except NotFoundError as exc:
            raise NotFound(f"no allocation event at stream sequence {stream_seq}") from exc
        return {"stream_seq": stream_seq, "outcome": outcome}

    async def status(self, who: Principal) -> dict[str, Any]:
        self.require_ops(who)
        pending, ack_pending = await self.consumer.pending()
        done, target = self.ledger.progress
        return {"ready": self.ledger.ready.is_set(), "consumer": self.names.durable, "pending": pending,
                "ack_pending": ack_pending, "ledger_seq": done, "ledger_target": target,
                "entries": self.aggregate.entries, "closed_through": self.aggregate.closed_through,
                "processed": dict(self.consumer.stats), "budgets": len(self.budgets.records)}
