"""``cbroker quote|request|leases|renew|release``: the app side of the broker.

Every command prints a table that fits the terminal, or JSON with ``--json``; bad input
is refused before anything is sent (exit 2), and failures are one line (services/cli/main.py).
An open lease lives by renewals: ``request`` warns when it will expire, ``renew`` extends
it, ``request --keep-alive`` stays in the foreground renewing until interrupted.
"""

from __future__ import annotations

import json
import signal
import threading
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import click
import httpx
import msgspec

from services.broker.client import BrokerApiError, BrokerClient, RequestNotReady
from services.broker.domain.requests import ComputeRequest
from services.broker.records import LeaseView

from .options import data_dir_option, key_option, url_option, with_options
from .term import LocalError, handled, note, print_json, show, waiting
from .tracking import DEFAULT_WAIT_S, WORKLOAD_OPTIONS, show_access, wait_for_ready, workload_body, workload_options
from .tracking import register as register_tracking

LEASE_COLUMNS = ("lease", "state", "pool", "region", "model", "units", "billing", "price", "expires")
BODY_OPTIONS = ("units", "model", "vendor", "region", "min_memory", "share", "tflops", "split", "billing", "duration",
                "max_price", "data_region", "data_gb", "lease_ttl", *WORKLOAD_OPTIONS)


def demo_keys(data_dir: Path) -> dict[str, Any] | None:
    keys_file = data_dir / "demo-keys.json"
    if not keys_file.exists():
        return None
    try:
        keys = json.loads(keys_file.read_text())
        keys["tenants"]  # noqa: B018 - the shape `cbroker up --demo` writes
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LocalError(f"cannot read the demo keys in {keys_file}: {exc}") from None
    return keys


def tenant_key(key: str | None, tenant: str | None, data_dir: Path) -> str:
    if key:
        return key
    keys = demo_keys(data_dir)
    if keys is None:
        raise click.UsageError("give --key (or $CB_KEY), or run from where `cbroker up --demo` wrote its keys")
    if tenant:
        if tenant not in keys["tenants"]:
            raise click.BadParameter(f"no demo tenant {tenant!r}; the demo tenants are "
                                     f"{', '.join(keys['tenants'])}", param_hint="'--tenant'")
        return keys["tenants"][tenant]
    return next(iter(keys["tenants"].values()))


class PriceType(click.ParamType):
    """A price per unit-hour: a positive decimal such as 2.50."""
    name = "price"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            price = Decimal(str(value))
        except InvalidOperation:
            self.fail(f"{value!r} is not a price (a positive decimal such as 2.50)", param, ctx)
        if not price.is_finite() or price <= 0:
            self.fail(f"{value!r} is not a price (a positive decimal such as 2.50)", param, ctx)
        return str(price)


_request_options = [
    click.option("-n", "--units", type=click.IntRange(min=1), help="Accelerator units (default 1)."),
    click.option("--model", multiple=True, help="Acceptable model id (repeat)."),
    click.option("--vendor", multiple=True, help="Acceptable vendor (repeat)."),
    click.option("--region", multiple=True, help="Allowed region (repeat)."),
    click.option("--min-memory", type=click.FloatRange(min=0), default=0,
                 help="GiB per unit (with --share: GiB the share needs)."),
    click.option("--share", type=click.IntRange(1, 999), metavar="MILLI",
                 help="A share of one device in thousandths, e.g. 250 for a quarter (docs/sharing.md)."),
    click.option("--tflops", type=click.FloatRange(min=0, min_open=True),
                 help="Normalised performance: total bf16 TFLOPS instead of units."),
    click.option("--split", is_flag=True, help="Allow several pools and regions."),
    click.option("--billing", type=click.Choice(["on_demand", "reserved_month", "reserved_year", "interruptible"]),
                 default="on_demand", show_default=True),
    click.option("--duration", type=click.IntRange(min=60), help="Seconds (default: an open lease kept by renewals)."),
    click.option("--max-price", type=PriceType(), help="Per unit-hour, e.g. 2.50."),
    click.option("--data-region"), click.option("--data-gb", type=click.FloatRange(min=0), default=0),
    click.option("--lease-ttl", type=click.IntRange(1, 86400), default=None,
                 help="Seconds an open lease lives without a renewal (server default 300)."),
    *workload_options,
    click.option("--body", help="The whole request body as JSON, instead of the options above."),
    click.option("--json", "as_json", is_flag=True, help="Print the result as JSON."),
]


def request_body(ctx: click.Context, kw: dict[str, Any]) -> ComputeRequest:
    """The request the options describe, checked here against the broker's own schema."""
    if kw["body"] is not None:
        flag = {p.name: max(p.opts, key=len) for p in ctx.command.params}
        given = [flag.get(n, n) for n in BODY_OPTIONS
                 if ctx.get_parameter_source(n) is not click.core.ParameterSource.DEFAULT]
        if given:
            raise click.UsageError(f"--body is the whole request; it cannot be combined with {', '.join(given)}")
        try:
            return msgspec.json.decode(kw["body"], type=ComputeRequest)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise click.BadParameter(str(exc), param_hint="'--body'") from None
    if kw["units"] is not None and kw["tflops"] is not None:
        raise click.UsageError("give -n/--units or --tflops, not both")
    share = kw.get("share")
    if share is not None:
        clash = [flag for flag, bad in (("--tflops", kw["tflops"] is not None), ("--split", kw["split"]),
                                        ("-n/--units above 1", (kw["units"] or 1) > 1)) if bad]
        if clash:
            raise click.UsageError(f"--share is a slice of one device; it cannot be combined with {', '.join(clash)}")
    body: dict[str, Any] = {"billing": kw["billing"]}
    if kw["tflops"] is not None:
        body["performance"] = {"min_tflops": kw["tflops"]}
    else:
        body["units"] = kw["units"] or 1
    if share is not None:
        body["share"] = {"milli": share, **({"min_memory_gib": kw["min_memory"]} if kw["min_memory"] else {})}
    acc = {k: v for k, v in (("models", list(kw["model"])), ("vendors", list(kw["vendor"])),
                             ("min_memory_gib", kw["min_memory"] if share is None else 0)) if v}
    if acc:
        body["accelerators"] = acc
    placement = {k: v for k, v in (("regions", list(kw["region"])), ("data_region", kw["data_region"]),
                                   ("data_gb", kw["data_gb"])) if v}
    if placement:
        body["placement"] = placement
    if kw["split"]:
        body["shape"] = {"kind": "split", "max_pools": 8, "max_regions": 3}
    for name, field in (("duration", "duration_s"), ("max_price", "max_price"), ("lease_ttl", "lease_ttl_s")):
        if kw[name] is not None:
            body[field] = kw[name]
    body.update(workload_body(kw))
    try:
        return msgspec.convert(body, ComputeRequest)
    except msgspec.ValidationError as exc:
        raise click.UsageError(f"the request is not valid: {exc}") from None


def until(at: datetime) -> str:
    s = max(0, int((at - datetime.now(UTC)).total_seconds()))
    if s >= 86400:
        return f"{s // 86400}d {s % 86400 // 3600}h"
    return f"{s // 3600}h {s % 3600 // 60}m" if s >= 3600 else f"{s // 60}m {s % 60}s"


def units_text(item: Any) -> str:
    """Units, and the share of each when it is not whole: "1×250/1000" (a lease, an
    allocation of a quote or an assignment as JSON; ``milli`` is absent from views of
    brokers before shares)."""
    if isinstance(item, dict):
        units, milli = item["units"], item.get("milli", 1000)
    else:
        units, milli = item.units, getattr(item, "milli", 1000)
    return str(units) if milli == 1000 else f"{units}×{milli}/1000"


def hour_price(option: Any) -> str:
    """A quote option's price per unit-hour, or for a share what the share costs an hour."""
    share = getattr(option, "share_hour_price", None)
    if share is not None and getattr(option, "milli", 1000) < 1000:
        return f"{share} {option.currency} (share)"
    return f"{option.unit_hour_price} {option.currency}"


def lease_rows(leases: list[LeaseView]) -> list[list[str]]:
    rows = []
    for lease in leases:
        basis = "/unit-month" if lease.price_basis == "unit_month" else "/unit-h"
        state = f"{lease.state} ({lease.delivery})" if lease.delivery else lease.state
        rows.append([lease.lease_id, state, lease.pool_id, lease.region, lease.model, units_text(lease), lease.billing,
                     f"{lease.unit_price} {lease.currency}{basis}", lease.expires_at.isoformat(timespec="seconds")])
    return rows


def show_leases(leases: list[LeaseView], title: str) -> None:
    show(title, LEASE_COLUMNS, lease_rows(leases), right=("units",))


def warn_expiry(leases: list[LeaseView]) -> None:
    for lease in leases:
        if lease.renewable:
            note(f"[yellow]warning:[/] lease {lease.lease_id} expires at "
                 f"{lease.expires_at.isoformat(timespec='seconds')} (in {until(lease.expires_at)}) unless renewed: "
                 f"`cbroker renew {lease.lease_id}`, or ask with --keep-alive")


def renew_until_interrupted(client: BrokerClient, leases: list[LeaseView]) -> None:
    """Renew every open lease at a third of its remaining time until Ctrl-C; then say
    when each will expire. The first Ctrl-C is taken between renewals, never in the
    middle of one (a KeyboardInterrupt raised inside the HTTP client could leave its
    connection pool locked, and the command would hang on exit); a second one
    interrupts whatever is running."""
    live = {lease.lease_id: lease for lease in leases if lease.renewable}
    if not live:
        note("nothing to keep alive: these leases run for a fixed term")
        return
    note(f"keeping {len(live)} lease(s) alive; Ctrl-C stops renewing (they then expire)")
    stop = threading.Event()

    def first_interrupt(signum: int, frame: object) -> None:
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, first_interrupt)
    try:
        while not stop.is_set():
            soonest = min(lease.expires_at for lease in live.values())
            if stop.wait(max(0.2, (soonest - datetime.now(UTC)).total_seconds() / 3)):
                break
            for lease_id in list(live):
                if stop.is_set():
                    break
                try:
                    live[lease_id] = lease = client.renew(lease_id)
                except (httpx.TransportError, BrokerApiError) as exc:  # a blip: try again before it expires
                    if isinstance(exc, BrokerApiError) and exc.status < 500:
                        raise  # the lease is gone or not ours: say so and stop
                    note(f"[yellow]warning:[/] could not renew {lease_id} ({exc or type(exc).__name__}); "
                         f"trying again")
                    continue
                note(f"renewed {lease_id} until {lease.expires_at.isoformat(timespec='seconds')}")
    except KeyboardInterrupt:  # the second Ctrl-C
        pass
    finally:
        signal.signal(signal.SIGINT, previous)
    for lease in live.values():
        note(f"stopped renewing; lease {lease.lease_id} expires at "
             f"{lease.expires_at.isoformat(timespec='seconds')} (in {until(lease.expires_at)})")


def register(cli: click.Group) -> None:
    common = [
        url_option("broker"),
        key_option("Tenant API key (default $CB_KEY)."),
        click.option("--tenant", help="With the demo keys file: which demo tenant."),
        data_dir_option,
    ]
    json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")

    def setup(f):  # noqa: ANN001, ANN202
        return with_options(common)(click.pass_context(f))

    def client(url: str, key: str | None, tenant: str | None, data_dir: Path) -> BrokerClient:
        return BrokerClient(url, tenant_key(key, tenant, data_dir))

    @cli.command()
    @setup
    @with_options(_request_options)
    @handled
    def quote(ctx, url, key, tenant, data_dir, as_json, **kw) -> None:  # noqa: ANN001
        """Ranked placement options with prices; reserves nothing."""
        body = request_body(ctx, kw)
        with client(url, key, tenant, data_dir) as broker, waiting("asking the broker"):
            q = broker.quote(body)
        if as_json:
            print_json(q)
            return
        rows = [[str(i), ", ".join(f"{a.pool_id}×{units_text(a)}" for a in o.allocations), units_text(o),
                 hour_price(o), str(o.compute_cost), str(o.transfer_cost), str(o.total_cost),
                 f"{o.expected_start_s:.0f}s"] for i, o in enumerate(q.options, 1)]
        show("placement options" if q.options else "no placement now",
             ("#", "pools", "units", "per unit-h", "compute", "transfer", "total", "start"), rows,
             right=("#", "units", "compute", "transfer", "total", "start"))
        for reason in q.reasons:
            click.echo(f"  • {reason}")

    @cli.command("request")
    @setup
    @with_options(_request_options)
    @click.option("--wait", type=click.FloatRange(min=0), is_flag=False, flag_value=DEFAULT_WAIT_S, default=0,
                  metavar="[SECONDS]", help=f"Wait until placed and every lease is ready (at most SECONDS, default "
                  f"{DEFAULT_WAIT_S:.0f}), showing progress; then print how to reach it.")
    @url_option("registry", dest="registry_url")
    @click.option("--keep-alive", is_flag=True,
                  help="Stay in the foreground renewing the open leases until Ctrl-C.")
    @handled
    def request_cmd(ctx, url, key, tenant, data_dir, as_json, wait, registry_url, keep_alive,  # noqa: ANN001
                    **kw) -> None:
        """Ask for compute: prints the lease(s), or the queue position and reasons; with
        --wait, waits until it is ready and prints how to reach it."""
        body = request_body(ctx, kw)
        with BrokerClient(url, tenant_key(key, tenant, data_dir), events_url=registry_url) as broker:
            with waiting("asking the broker"):
                view = broker.request(body)
            if wait > 0 and view.state in ("queued", "placed"):
                try:
                    view = wait_for_ready(broker, view, wait)
                except RequestNotReady as exc:
                    if as_json and exc.view is not None:
                        print_json(exc.view)  # where it stands, for a script; the error follows on stderr
                    raise
            if as_json:
                print_json(view)
            elif view.state == "placed":
                show_leases(view.leases, f"request {view.request_id}: placed")
                if any(lease.delivery for lease in view.leases):
                    show_access(view)
                    if wait == 0 and any(lease.state != "ready" for lease in view.leases):
                        note(f"follow it with `cbroker status {view.request_id}`, or ask with --wait")
            else:
                where = f" at position {view.queue_position}" if view.queue_position is not None else ""
                click.echo(f"request {view.request_id}: {view.state}{where}")
                for reason in view.reasons:
                    click.echo(f"  • {reason}")
            if view.state == "placed":
                if keep_alive:
                    renew_until_interrupted(broker, view.leases)
                else:
                    warn_expiry(view.leases)

    @cli.command()
    @setup
    @json_option
    @handled
    def leases(ctx, url, key, tenant, data_dir, as_json) -> None:  # noqa: ANN001
        """Your active leases."""
        with client(url, key, tenant, data_dir) as broker, waiting("asking the broker"):
            found = broker.leases()
        if as_json:
            print_json(found)
        else:
            show_leases(found, "active leases")

    @cli.command()
    @click.argument("lease_ids", nargs=-1, required=True)
    @setup
    @json_option
    @handled
    def renew(ctx, lease_ids, url, key, tenant, data_dir, as_json) -> None:  # noqa: ANN001
        """Keep open leases alive for another TTL; says when each now expires."""
        with client(url, key, tenant, data_dir) as broker:
            renewed = [broker.renew(lease_id) for lease_id in lease_ids]
        if as_json:
            print_json(renewed)
            return
        show_leases(renewed, "renewed")
        warn_expiry(renewed)

    @cli.command()
    @click.argument("lease_ids", nargs=-1, required=True)
    @setup
    @json_option
    @handled
    def release(ctx, lease_ids, url, key, tenant, data_dir, as_json) -> None:  # noqa: ANN001
        """Give leased units back."""
        released = []
        with client(url, key, tenant, data_dir) as broker:
            try:
                for lease_id in lease_ids:
                    broker.release(lease_id)
                    released.append(lease_id)
                    if not as_json:
                        click.echo(f"released {lease_id}")
            finally:
                if as_json:
                    print_json({"released": released})

    register_tracking(cli, setup, json_option, client)
