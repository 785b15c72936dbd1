"""``cbroker usage|invoice``: what the meter has billed, as tables."""

from __future__ import annotations

import json
import os
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from services.meter.client import MeterApiError, MeterClient
from services.meter.model import Invoice, InvoiceLine

console = Console(width=None if sys.stdout.isatty() else 200)  # piped: keep ids whole
GROUPS = ("tenant", "region", "model", "provider", "pool", "billing", "period")


def _key(key: str | None, tenant: str | None, ops: bool, data_dir: Path) -> tuple[str, str | None]:
    """(API key, tenant to ask about or None for the key's own)."""
    if key:
        return key, tenant
    keys_file = data_dir / "demo-keys.json"
    if keys_file.exists():
        keys = json.loads(keys_file.read_text())
        if ops:
            return keys["ops"], tenant
        if tenant:
            if tenant not in keys["tenants"]:
                raise click.UsageError(f"no demo tenant {tenant}; the demo tenants are {', '.join(keys['tenants'])}")
            return keys["tenants"][tenant], None
        return next(iter(keys["tenants"].values())), None
    raise click.UsageError("give --key (or $CB_KEY), or run from where `cbroker up --demo` wrote its keys")


def _fail(exc: MeterApiError) -> None:
    console.print(f"[red]{exc.status}[/] {exc.problem.get('detail', '')}")
    raise SystemExit(1)


def _qty(value: Any) -> str:
    q = Decimal(str(value))
    return f"{q.normalize():f}" if q == q.to_integral_value() else f"{q:.3f}"


def _lines_table(title: str, lines: list[InvoiceLine], currency: str, adjustments: bool = False) -> Table:
    table = Table(title=title, title_justify="left")
    cols = (["for period"] if adjustments else []) + ["billing", "region", "model", "pool", "quantity", "unit price",
                                                      "amount"]
    for col in cols:
        table.add_column(col, justify="right" if col in ("quantity", "unit price", "amount") else "left",
                         no_wrap=col in ("pool", "model"))
    for x in lines:
        row = ([x.period] if adjustments else []) + [
            x.billing, x.region, x.model, x.pool_id, f"{_qty(x.quantity)} {x.unit}{'' if x.quantity == 1 else 's'}",
            f"{x.unit_price} {currency}/{x.unit.removeprefix('unit-')}", f"{x.amount} {currency}"]
        table.add_row(*row)
    return table


def print_invoice(inv: Invoice) -> None:
    status = "[green]final[/]" if inv.status == "final" else "[yellow]draft[/]"
    when = f"issued {inv.issued_at:%Y-%m-%d %H:%M} UTC" if inv.issued_at else \
        f"final after {inv.final_after:%Y-%m-%d %H:%M} UTC"
    console.print(f"[bold]Invoice {inv.tenant} {inv.period}[/] — {status}, {when}, {inv.entries:,} ledger entries")
    if not inv.currencies:
        console.print("  nothing billed in this period")
    for section in inv.currencies:
        if section.lines:
            console.print(_lines_table(f"charges in {section.currency}", section.lines, section.currency))
        if section.adjustments:
            console.print(_lines_table(f"adjustments (late charges of final periods) in {section.currency}",
                                       section.adjustments, section.currency, adjustments=True))
        console.print(f"  subtotal {section.subtotal} + adjustments {section.adjustments_total} = "
                      f"[bold]{section.total} {section.currency}[/]")


def register(cli: click.Group) -> None:
    common = [
        click.option("--meter-url", "url", default=lambda: os.environ.get("CB_METER_URL", "http://127.0.0.1:8083"),
                     show_default="$CB_METER_URL or http://127.0.0.1:8083"),
        click.option("--key", default=lambda: os.environ.get("CB_KEY"), help="API key (default $CB_KEY)."),
        click.option("--tenant", help="Whose bills: with the demo keys file, that demo tenant's key; with an "
                                      "ops/admin key (or --ops), the tenant asked about."),
        click.option("--ops", is_flag=True, help="With the demo keys file: use the ops key."),
        click.option("--data-dir", type=click.Path(path_type=Path), default=Path(".cbroker"), show_default=True),
    ]

    def setup(f):  # noqa: ANN001, ANN202
        for option in reversed(common):
            f = option(f)
        return f

    @cli.command()
    @click.option("--period", help="Service period YYYY-MM.")
    @click.option("--group-by", "group_by", default="period,billing,region,model", show_default=True,
                  help=f"Comma-separated: {', '.join(GROUPS)}.")
    @click.option("--region")
    @click.option("--model")
    @click.option("--provider")
    @click.option("--pool")
    @click.option("--billing", type=click.Choice(["on_demand", "reserved_month", "reserved_year", "interruptible"]))
    @click.option("--csv", "as_csv", is_flag=True, help="Print CSV instead of a table.")
    @setup
    def usage(period, group_by, region, model, provider, pool, billing, as_csv, url, key, tenant, ops,  # noqa: ANN001
              data_dir) -> None:
        """Usage the meter has posted, grouped and filtered."""
        api_key, whose = _key(key, tenant, ops, data_dir)
        groups = [g.strip() for g in group_by.split(",") if g.strip()]
        kw = dict(tenant=whose, period=period, region=region, model=model, provider=provider, pool=pool,
                  billing=billing, group_by=groups)
        try:
            with MeterClient(url, api_key) as meter:
                if as_csv:
                    click.echo(meter.usage_csv(**kw), nl=False)
                    return
                body = meter.usage(**kw)
        except MeterApiError as exc:
            _fail(exc)
        title = f"usage of {body['tenant']}" if body.get("tenant") else "usage"
        table = Table(title=title + (f" in {period}" if period else ""), title_justify="left")
        for g in groups:
            table.add_column(g, no_wrap=g in ("pool", "model"))
        for col in ("unit-hours", "unit-months", "entries", "amount"):
            table.add_column(col, justify="right")
        for row in body["rows"]:
            table.add_row(*[str(row[g]) for g in groups], _qty(row["unit_hours"]), _qty(row["unit_months"]),
                          f"{row['entries']:,}", f"{row['amount']} {row['currency']}")
        console.print(table)
        if not body["rows"]:
            console.print("  nothing billed yet")
        for currency, amount in sorted(body["totals"].items()):
            console.print(f"  total [bold]{amount} {currency}[/]")

    @cli.command()
    @click.argument("period", required=False)
    @setup
    def invoice(period, url, key, tenant, ops, data_dir) -> None:  # noqa: ANN001
        """An invoice (PERIOD as YYYY-MM), or the list of invoices without one."""
        api_key, whose = _key(key, tenant, ops, data_dir)
        try:
            with MeterClient(url, api_key) as meter:
                if period:
                    print_invoice(meter.invoice(period, whose))
                    return
                listing = meter.invoices(whose)
        except MeterApiError as exc:
            _fail(exc)
        table = Table(title=f"invoices of {listing['tenant']}", title_justify="left")
        for col in ("period", "status", "entries", "total"):
            table.add_column(col, justify="right" if col in ("entries", "total") else "left")
        for item in listing["invoices"]:
            total = ", ".join(f"{v} {k}" for k, v in sorted(item["totals"].items())) or "0"
            table.add_row(item["period"], item["status"], f"{item['entries']:,}", total)
        console.print(table)
        if not listing["invoices"]:
            console.print("  no invoices yet")
