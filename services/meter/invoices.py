"""Invoices, usage tables and provider statements from aggregate cells. Pure.

An invoice of a tenant for a period holds the cells whose *invoice period* is that
period (see ``aggregate``): its own charges as lines and late charges of earlier, already
final periods as adjustments (debit notes: charges are never negative, releases refund
nothing). One section per currency; amounts are never converted.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from services.common.messages import MILLI

from .aggregate import (
    K_BILLING,
    K_CURRENCY,
    K_INVOICE,
    K_MILLI,
    K_MODEL,
    K_PERIOD,
    K_POOL,
    K_PRICE,
    K_PROVIDER,
    K_REGION,
    K_TENANT,
    Cell,
    CellKey,
)
from .model import CurrencySection, Invoice, InvoiceLine, UnchargedAttempt, UnchargedLine
from .pricing import RESERVED, round_money

GROUPS = ("tenant", "region", "model", "provider", "pool", "billing", "period", "milli")
_GROUP_INDEX = {"tenant": K_TENANT, "region": K_REGION, "model": K_MODEL, "provider": K_PROVIDER, "pool": K_POOL,
                "billing": K_BILLING, "period": K_PERIOD, "milli": K_MILLI}  # milli: the share (1000 = whole)
FILTERS = ("tenant", "period", "region", "model", "provider", "pool", "billing")


def _line(key: CellKey, cell: Cell) -> InvoiceLine:
    return InvoiceLine(billing=key[K_BILLING], region=key[K_REGION], model=key[K_MODEL], provider=key[K_PROVIDER],
                       pool_id=key[K_POOL], unit_price=key[K_PRICE],
                       unit="unit-month" if key[K_BILLING] in RESERVED else "unit-hour",
                       quantity=cell.quantity, milli=key[K_MILLI], share=share_label(key[K_MILLI]),
                       amount=cell.amount, entries=cell.entries, period=key[K_PERIOD])


def share_label(milli: int) -> str:
    return "whole" if milli == MILLI else f"{milli}/{MILLI}"


def _order(line: InvoiceLine) -> tuple:
    return (line.period, line.billing, line.region, line.model, line.provider, line.pool_id, line.unit_price,
            -line.milli)


def uncharged_line(a: UnchargedAttempt) -> UnchargedLine:
    return UnchargedLine(lease_id=a.lease_id, request_id=a.request_id, pool_id=a.pool_id, provider=a.provider,
                         region=a.region, model=a.model, billing=a.billing, delivery=a.delivery, attempt=a.attempt,
                         reason=a.reason, ended=a.ended, granted_at=a.granted_at, ended_at=a.ended_at,
                         currency=a.currency)


def build_invoice(tenant: str, period: str, cells: Iterable[tuple[CellKey, Cell]], *, final: bool,
                  final_after: datetime, issued_at: datetime | None = None,
                  attempts: Iterable[UnchargedAttempt] = ()) -> Invoice:
    by_currency: dict[str, tuple[list[InvoiceLine], list[InvoiceLine]]] = {}
    entries = 0
    for key, cell in cells:
        if key[K_TENANT] != tenant or key[K_INVOICE] != period:
            continue
        lines, adjustments = by_currency.setdefault(key[K_CURRENCY], ([], []))
        (lines if key[K_PERIOD] == period else adjustments).append(_line(key, cell))
        entries += cell.entries
    sections = []
    for currency in sorted(by_currency):
        lines, adjustments = by_currency[currency]
        lines.sort(key=_order)
        adjustments.sort(key=_order)
        subtotal = round_money(sum((x.amount for x in lines), Decimal(0)), currency)
        adj = round_money(sum((x.amount for x in adjustments), Decimal(0)), currency)
        sections.append(CurrencySection(currency=currency, lines=lines, adjustments=adjustments, subtotal=subtotal,
                                        adjustments_total=adj, total=subtotal + adj))
    uncharged = sorted((uncharged_line(a) for a in attempts if a.tenant == tenant),
                       key=lambda x: (x.ended_at, x.lease_id))
    return Invoice(tenant=tenant, period=period, status="final" if final else "draft", final_after=final_after,
                   issued_at=issued_at, currencies=sections, totals={s.currency: s.total for s in sections},
                   entries=entries, uncharged=uncharged)


def usage_rows(cells: Iterable[tuple[CellKey, Cell]], group_by: Sequence[str],
               filters: dict[str, str | None]) -> list[dict[str, Any]]:
    """Posted usage summed by ``group_by`` (and always by currency), filtered by service
    period, region, model, provider, pool, billing, tenant."""
    want = [(_GROUP_INDEX[f], v) for f, v in filters.items() if v is not None]
    idx = [_GROUP_INDEX[g] for g in group_by]
    rows: dict[tuple, list] = {}
    for key, cell in cells:
        if any(key[i] != v for i, v in want):
            continue
        group = (*(key[i] for i in idx), key[K_CURRENCY])
        row = rows.get(group)
        if row is None:
            row = rows[group] = [Decimal(0), Decimal(0), Decimal(0), 0]
        row[0] += cell.amount
        if key[K_BILLING] in RESERVED:
            row[2] += cell.quantity
        else:
            row[1] += cell.quantity
        row[3] += cell.entries
    out = []
    for group in sorted(rows):
        amount, hours, months, n = rows[group]
        item: dict[str, Any] = dict(zip(group_by, group[:-1], strict=True))
        item.update(currency=group[-1], amount=amount, unit_hours=hours, unit_months=months, entries=n)
        out.append(item)
    return out


def usage_totals(rows: Iterable[dict[str, Any]]) -> dict[str, Decimal]:
    out: dict[str, Decimal] = {}
    for row in rows:
        out[row["currency"]] = out.get(row["currency"], Decimal(0)) + row["amount"]
    return out


def to_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for row in rows:
        w.writerow([str(row[c]) for c in columns])
    return buf.getvalue()
