"""``cbroker quote|request|leases|release``: the app side of the broker, as tables."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from services.broker.client import BrokerApiError, BrokerClient

console = Console(width=None if sys.stdout.isatty() else 200)  # piped: keep ids whole


def _key(key: str | None, tenant: str | None, data_dir: Path) -> str:
    if key:
        return key
    keys_file = data_dir / "demo-keys.json"
    if keys_file.exists():
        keys = json.loads(keys_file.read_text())
        if tenant:
            return keys["tenants"][tenant]
        return next(iter(keys["tenants"].values()))
    raise click.UsageError("give --key (or $CB_KEY), or run from where `cbroker up --demo` wrote its keys")


def _client(ctx: click.Context) -> BrokerClient:
    o = ctx.obj
    return BrokerClient(o["url"], _key(o["key"], o["tenant"], o["data_dir"]))


def _request_body(units: int | None, model: tuple[str, ...], vendor: tuple[str, ...], region: tuple[str, ...],
                  min_memory: float, tflops: float | None, split: bool, billing: str, duration: int | None,
                  max_price: str | None, data_region: str | None, data_gb: float, raw: str | None) -> dict[str, Any]:
    if raw:
        return json.loads(raw)
    body: dict[str, Any] = {"billing": billing}
    if tflops:
        body["performance"] = {"min_tflops": tflops}
    else:
        body["units"] = units or 1
    acc = {k: v for k, v in (("models", list(model)), ("vendors", list(vendor)),
                             ("min_memory_gib", min_memory)) if v}
    if acc:
        body["accelerators"] = acc
    placement = {k: v for k, v in (("regions", list(region)), ("data_region", data_region),
                                   ("data_gb", data_gb)) if v}
    if placement:
        body["placement"] = placement
    if split:
        body["shape"] = {"kind": "split", "max_pools": 8, "max_regions": 3}
    if duration:
        body["duration_s"] = duration
    if max_price:
        body["max_price"] = max_price
    return body


_request_options = [
    click.option("-n", "--units", type=int, help="Accelerator units (default 1)."),
    click.option("--model", multiple=True, help="Acceptable model id (repeat)."),
    click.option("--vendor", multiple=True, help="Acceptable vendor (repeat)."),
    click.option("--region", multiple=True, help="Allowed region (repeat)."),
    click.option("--min-memory", type=float, default=0, help="GiB per unit."),
    click.option("--tflops", type=float, help="Normalised performance: total bf16 TFLOPS instead of units."),
    click.option("--split", is_flag=True, help="Allow several pools and regions."),
    click.option("--billing", type=click.Choice(["on_demand", "reserved_month", "reserved_year", "interruptible"]),
                 default="on_demand", show_default=True),
    click.option("--duration", type=int, help="Seconds (default: an open lease kept by renewals)."),
    click.option("--max-price", help="Per unit-hour."),
    click.option("--data-region"), click.option("--data-gb", type=float, default=0),
    click.option("--json", "raw", help="The whole request body as JSON instead."),
]


def _with(options):  # noqa: ANN001, ANN202
    def deco(f):  # noqa: ANN001, ANN202
        for option in reversed(options):
            f = option(f)
        return f
    return deco


def _fail(exc: BrokerApiError) -> None:
    console.print(f"[red]{exc.status}[/] {exc.problem.get('detail', '')}")
    for reason in exc.reasons:
        console.print(f"  • {reason}")
    raise SystemExit(1)


def _lease_table(leases: list, title: str) -> Table:
    table = Table(title=title)
    for col in ("lease", "pool", "region", "model", "units", "billing", "price", "expires"):
        table.add_column(col, no_wrap=col in ("lease", "pool"))
    for lease in leases:
        basis = "/unit-month" if lease.price_basis == "unit_month" else "/unit-h"
        table.add_row(lease.lease_id, lease.pool_id, lease.region, lease.model, str(lease.units), lease.billing,
                      f"{lease.unit_price} {lease.currency}{basis}", lease.expires_at.isoformat(timespec="seconds"))
    return table


def register(cli: click.Group) -> None:
    common = [
        click.option("--broker-url", "url", default=lambda: os.environ.get("CB_BROKER_URL", "http://127.0.0.1:8082"),
                     show_default="$CB_BROKER_URL or http://127.0.0.1:8082"),
        click.option("--key", default=lambda: os.environ.get("CB_KEY"), help="Tenant API key (default $CB_KEY)."),
        click.option("--tenant", help="With the demo keys file: which demo tenant."),
        click.option("--data-dir", type=click.Path(path_type=Path), default=Path(".cbroker"), show_default=True),
    ]

    def setup(f):  # noqa: ANN001, ANN202
        f = click.pass_context(f)
        for option in reversed(common):
            f = option(f)
        return f

    def obj(ctx: click.Context, url: str, key: str | None, tenant: str | None, data_dir: Path) -> None:
        ctx.obj = {"url": url, "key": key, "tenant": tenant, "data_dir": data_dir}

    @cli.command()
    @setup
    @_with(_request_options)
    def quote(ctx, url, key, tenant, data_dir, **kw) -> None:  # noqa: ANN001
        """Ranked placement options with prices; reserves nothing."""
        obj(ctx, url, key, tenant, data_dir)
        try:
            q = _client(ctx).quote(_request_body(**kw))
        except BrokerApiError as exc:
            _fail(exc)
        table = Table(title="placement options" if q.options else "no placement now")
        for col in ("#", "pools", "units", "per unit-h", "compute", "transfer", "total", "start"):
            table.add_column(col)
        for i, o in enumerate(q.options, 1):
            pools = ", ".join(f"{a.pool_id}×{a.units}" for a in o.allocations)
            table.add_row(str(i), pools, str(o.units), f"{o.unit_hour_price} {o.currency}", str(o.compute_cost),
                          str(o.transfer_cost), str(o.total_cost), f"{o.expected_start_s:.0f}s")
        console.print(table)
        for reason in q.reasons:
            console.print(f"  • {reason}")

    @cli.command("request")
    @setup
    @_with(_request_options)
    def request_cmd(ctx, url, key, tenant, data_dir, **kw) -> None:  # noqa: ANN001
        """Ask for compute: prints the lease(s), or the queue position and reasons."""
        obj(ctx, url, key, tenant, data_dir)
        try:
            view = _client(ctx).request(_request_body(**kw))
        except BrokerApiError as exc:
            _fail(exc)
        if view.state == "placed":
            console.print(_lease_table(view.leases, f"request {view.request_id}: placed"))
        else:
            console.print(f"request {view.request_id}: [yellow]{view.state}[/] at position {view.queue_position}")
            for reason in view.reasons:
                console.print(f"  • {reason}")

    @cli.command()
    @setup
    def leases(ctx, url, key, tenant, data_dir) -> None:  # noqa: ANN001
        """Your active leases."""
        obj(ctx, url, key, tenant, data_dir)
        try:
            console.print(_lease_table(_client(ctx).leases(), "active leases"))
        except BrokerApiError as exc:
            _fail(exc)

    @cli.command()
    @click.argument("lease_ids", nargs=-1, required=True)
    @setup
    def release(ctx, lease_ids, url, key, tenant, data_dir) -> None:  # noqa: ANN001
        """Give leased units back."""
        obj(ctx, url, key, tenant, data_dir)
        client = _client(ctx)
        for lease_id in lease_ids:
            try:
                client.release(lease_id)
                console.print(f"released {lease_id}")
            except BrokerApiError as exc:
                _fail(exc)
