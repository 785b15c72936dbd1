"""``cbroker usage|invoice``: what the meter has billed, as tables that fit the terminal,
CSV or JSON."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import click

from services.meter.client import MeterClient
from services.meter.model import Invoice, InvoiceLine

from .apps import demo_keys
from .options import data_dir_option, key_option, url_option, with_options
from .term import handled, out, print_json, show, table

GROUPS = ("tenant", "region", "model", "provider", "pool", "billing", "period", "milli")


def _key(key: str | None, tenant: str | None, ops: bool, data_dir: Path) -> tuple[str, str | None]:
    """(API key, tenant to ask about or None for the key's own)."""
    if key:
        return key, tenant
    keys = demo_keys(data_dir)
    if keys is not None:
        if ops:
            return keys["ops"], tenant
        if tenant:
            if tenant not in keys["tenants"]:
                raise click.BadParameter(f"no demo tenant {tenant!r}; the demo tenants are "
                                         f"{', '.join(keys['tenants'])}", param_hint="'--tenant'")
            return keys["tenants"][tenant], None
        return next(iter(keys["tenants"].values())), None
    raise click.UsageError("give --key (or $CB_KEY), or run from where `cbroker up --demo` wrote its keys")


def _qty(value: Any) -> str:
    q = Decimal(str(value))
    return f"{q.normalize():f}" if q == q.to_integral_value() else f"{q:.3f}"


def _lines_table(title: str, lines: list[InvoiceLine], currency: str, width: int, adjustments: bool = False):  # noqa: ANN202
    cols = (["for period"] if adjustments else []) + ["billing", "region", "model", "pool", "share", "quantity",
                                                      "unit price", "amount"]
    rows = [([x.period] if adjustments else []) + [
        x.billing, x.region, x.model, x.pool_id, x.share,
        f"{_qty(x.quantity)} {x.unit}{'' if x.quantity == 1 else 's'}",
        f"{x.unit_price} {currency}/{x.unit.removeprefix('unit-')}", f"{x.amount} {currency}"] for x in lines]
    return table(title, cols, rows, width=width, right=("quantity", "unit price", "amount"))


def print_invoice(inv: Invoice) -> None:
    console = out()
    status = "[green]final[/]" if inv.status == "final" else "[yellow]draft[/]"
    when = f"issued {inv.issued_at:%Y-%m-%d %H:%M} UTC" if inv.issued_at else \
        f"final after {inv.final_after:%Y-%m-%d %H:%M} UTC"
    console.print(f"[bold]Invoice {inv.tenant} {inv.period}[/] — {status}, {when}, {inv.entries:,} ledger entries")
    if not inv.currencies:
        console.print("  nothing billed in this period")
    for section in inv.currencies:
        if section.lines:
            console.print(_lines_table(f"charges in {section.currency}", section.lines, section.currency,
                                       console.width))
        if section.adjustments:
            console.print(_lines_table(f"adjustments (late charges of final periods) in {section.currency}",
                                       section.adjustments, section.currency, console.width, adjustments=True))
        console.print(f"  subtotal {section.subtotal} + adjustments {section.adjustments_total} = "
                      f"[bold]{section.total} {section.currency}[/]")
    if inv.uncharged:
        rows = [[x.lease_id, x.pool_id, x.provider, x.reason, f"{x.ended_at:%Y-%m-%d %H:%M}", x.charge]
                for x in inv.uncharged]
        console.print(table("attempts that never became ready", ["lease", "pool", "provider", "reason", "ended",
                                                                  "charge"], rows, width=console.width))


def register(cli: click.Group) -> None:
    common = [
        url_option("meter"),
        key_option("API key (default $CB_KEY)."),
        click.option("--tenant", help="Whose bills: with the demo keys file, that demo tenant's key; with an "
                                      "ops/admin key (or --ops), the tenant asked about."),
        click.option("--ops", is_flag=True, help="With the demo keys file: use the ops key."),
        data_dir_option,
    ]
    setup = with_options(common)

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
    @click.option("--json", "as_json", is_flag=True, help="Print the meter's answer as JSON.")
    @setup
    @handled
    def usage(period, group_by, region, model, provider, pool, billing, as_csv, as_json, url, key, tenant,  # noqa: ANN001
              ops, data_dir) -> None:
        """Usage the meter has posted, grouped and filtered."""
        if as_csv and as_json:
            raise click.UsageError("give --csv or --json, not both")
        groups = [g.strip() for g in group_by.split(",") if g.strip()]
        unknown = [g for g in groups if g not in GROUPS]
        if unknown or not groups:
            raise click.BadParameter(f"{', '.join(unknown) or 'nothing'} is not one of {', '.join(GROUPS)}",
                                     param_hint="'--group-by'")
        api_key, whose = _key(key, tenant, ops, data_dir)
        kw = dict(tenant=whose, period=period, region=region, model=model, provider=provider, pool=pool,
                  billing=billing, group_by=groups)
        with MeterClient(url, api_key) as meter:
            if as_csv:
                click.echo(meter.usage_csv(**kw), nl=False)
                return
            body = meter.usage(**kw)
        if as_json:
            print_json(body)
            return
        title = f"usage of {body['tenant']}" if body.get("tenant") else "usage"
        rows = [[*[str(row[g]) for g in groups], _qty(row["unit_hours"]), _qty(row["unit_months"]),
                 f"{row['entries']:,}", f"{row['amount']} {row['currency']}"] for row in body["rows"]]
        show(title + (f" in {period}" if period else ""), [*groups, "unit-hours", "unit-months", "entries", "amount"],
             rows, right=("unit-hours", "unit-months", "entries", "amount"))
        console = out()
        if not body["rows"]:
            console.print("  nothing billed yet")
        for currency, amount in sorted(body["totals"].items()):
            console.print(f"  total [bold]{amount} {currency}[/]")

    @cli.command()
    @click.argument("period", required=False)
    @click.option("--json", "as_json", is_flag=True, help="Print the invoice (or the list) as JSON.")
    @setup
    @handled
    def invoice(period, as_json, url, key, tenant, ops, data_dir) -> None:  # noqa: ANN001
        """An invoice (PERIOD as YYYY-MM), or the list of invoices without one."""
        api_key, whose = _key(key, tenant, ops, data_dir)
        with MeterClient(url, api_key) as meter:
            if period:
                inv = meter.invoice(period, whose)
                if as_json:
                    print_json(inv)
                else:
                    print_invoice(inv)
                return
            listing = meter.invoices(whose)
        if as_json:
            print_json(listing)
            return
        rows = [[item["period"], item["status"], f"{item['entries']:,}",
                 ", ".join(f"{v} {k}" for k, v in sorted(item["totals"].items())) or "0"]
                for item in listing["invoices"]]
        show(f"invoices of {listing['tenant']}", ("period", "status", "entries", "total"), rows,
             right=("entries", "total"))
        if not listing["invoices"]:
            out().print("  no invoices yet")
