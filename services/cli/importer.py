"""``cbroker import``: register offers from public catalogues and traces through the
registry's HTTP API, and account for every row.

An import is *re-runnable, not all-or-nothing*: pool ids are a pure function of the offer
(provider, region, zone, instance type), so running the same file again updates the same
pools; rows are registered in batches and a batch the registry refuses is retried pool by
pool, so one bad row never sinks the others. Every row ends in the report (``--report``)
with its outcome: created, updated, skipped (no accelerator), rejected (by the importer's
rules, with the reason) or refused (by the registry, with its answer). Exit status: 0 when
every offer was registered or reported, 1 when the registry refused rows or could not be
reached, 2 when the file is not a catalogue of the expected format (one line says why).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import httpx
import msgspec
from rich.console import Console
from rich.table import Table

from services.common.messages import PoolSpec, Region
from services.registry.domain.importers import (
    SKYPILOT_REQUIRED, FileError, ImportResult, RowOutcome, check_columns, parse_alibaba_nodes, parse_skypilot,
    read_catalogue_text, read_csv_rows, reason_kind,
)
from services.registry.domain.offer_formats import GPUHUNT_REQUIRED, gpuhunt_to_skypilot

console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)
BATCH = 500
HEARTBEAT_CHUNK = 10_000


class _Refused(Exception):
    pass


def _client(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def _fail(path: Path, reason: str) -> None:
    """A malformed input file: one line, exit status 2, no traceback."""
    console.print(f"[red]error:[/] {path.name}: {reason}", soft_wrap=True)
    raise SystemExit(2)


def _known_regions(client: httpx.Client) -> set[str]:
    r = client.get("/v1/regions")
    r.raise_for_status()
    return {region["id"] for region in r.json()}


def load_region_map(path: Path) -> dict[str, Region | str]:
    """``--region-map``: JSON ``{"code": "region-id" | {"id", "name", "country", "lat",
    "lon"}}`` or CSV with columns ``code,region`` and optionally ``name,country,lat,lon``
    (then the region is added when missing)."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise FileError(f"cannot read the region map: {exc}") from None
    entries: dict[str, Region | str] = {}
    try:
        if text.lstrip()[:1] == "{":
            data = json.loads(text)
            for code, target in data.items():
                entries[str(code)] = (target if isinstance(target, str)
                                      else msgspec.convert(target, Region))
        else:
            reader = csv.DictReader(text.splitlines())
            check_columns(reader.fieldnames, ("code", "region"), "region map")
            for row in reader:
                if row.get("country"):
                    entries[row["code"]] = msgspec.convert(
                        {"id": row["region"], "name": row.get("name") or row["region"], "country": row["country"],
                         "lat": float(row["lat"]), "lon": float(row["lon"])}, Region)
                else:
                    entries[row["code"]] = row["region"]
    except (ValueError, TypeError, KeyError, AttributeError, msgspec.ValidationError) as exc:
        raise FileError(f"bad region map: {exc}") from None
    return entries


@dataclass
class RowResult:
    """One row of the report: the importer's outcome and what the registry did with it."""

    row: int
    status: str  # created | updated | skipped | rejected | refused | not-attempted
    offer: str
    region: str
    pool_id: str
    model: str
    memory_gib: float | None
    on_demand: str
    interruptible: str
    reason: str


def _row_result(o: RowOutcome, status: str, reason: str = "") -> RowResult:
    return RowResult(o.row, status, o.offer, o.region, o.pool_id, o.model, o.memory_gib,
                     "" if o.on_demand is None else f"{o.on_demand:f}",
                     "" if o.interruptible is None else f"{o.interruptible:f}", reason or o.reason or o.note)


def _add_regions(client: httpx.Client, result: ImportResult, reject: bool) -> dict[str, str]:
    """Add the regions the ready rows need; returns region id -> why it could not be added."""
    needed = {spec.region for _, spec in result.pools} & set(result.new_regions)
    if needed and reject:
        raise click.ClickException(f"unknown regions (rejected by --reject-unknown-regions): "
                                   f"{', '.join(sorted(needed))}; nothing was imported")
    failed: dict[str, str] = {}
    shown = 0
    for rid in sorted(needed):
        region = result.new_regions[rid]
        r = client.put(f"/v1/regions/{rid}", content=msgspec.json.encode(region),
                       headers={"content-type": "application/json"})
        if r.status_code >= 400:
            failed[rid] = (f"region {rid} could not be added: {r.status_code} {r.text[:200]} "
                           "(adding regions needs an admin key)")
            continue
        shown += 1
        if shown <= 10:
            console.print(f"[yellow]note:[/] region {rid} was not in the topology; added as {region.name}, "
                          f"{region.country} with derived network links")
    if shown > 10:
        console.print(f"[yellow]note:[/] ... and {shown - 10} more regions added (GET /v1/regions lists them)")
    return failed


def _registry_reason(r: httpx.Response) -> str:
    try:
        body = r.json()
        detail = body.get("detail") or body.get("title") or r.text
    except ValueError:
        detail = r.text
    return f"registry answered {r.status_code}: {str(detail)[:300]}"


def register(client: httpx.Client, pools: list[tuple[str, PoolSpec]], existing: set[str],
             progress: Callable[[int], None] = lambda n: None) -> dict[str, tuple[str, str]]:
    """Register pools; returns pool id -> (status, reason). A refused batch is retried
    pool by pool so that only the bad rows fail; a 5xx or a lost connection stops the
    import (pools already written stay written: a re-run updates them)."""
    results: dict[str, tuple[str, str]] = {}
    for start in range(0, len(pools), BATCH):
        batch = pools[start:start + BATCH]
        body = [{"pool_id": pool_id, **msgspec.to_builtins(spec)} for pool_id, spec in batch]
        r = client.post("/v1/pools/bulk", content=msgspec.json.encode(body),
                        headers={"content-type": "application/json"})
        if r.status_code >= 500:
            raise _Refused(_registry_reason(r))
        if r.status_code < 400:
            for pool_id, _ in batch:
                results[pool_id] = ("updated" if pool_id in existing else "created", "")
        else:
            for pool_id, spec in batch:
                one = client.put(f"/v1/pools/{pool_id}", content=msgspec.json.encode(spec),
                                 headers={"content-type": "application/json"})
                if one.status_code >= 500:
                    raise _Refused(_registry_reason(one))
                results[pool_id] = ({200: "updated", 201: "created"}.get(one.status_code, "refused"),
                                    "" if one.status_code < 400 else _registry_reason(one))
        progress(len(batch))
    return results


def existing_pools(client: httpx.Client, provider: str) -> set[str]:
    """Ids of the provider's pools before the import, so each row can say created or updated."""
    found: set[str] = set()
    cursor: str | None = None
    while True:
        params: dict[str, str | int] = {"provider": provider, "limit": 1000}
        if cursor:
            params["cursor"] = cursor
        r = client.get("/v1/pools", params=params)
        r.raise_for_status()
        page = r.json()
        found.update(item["pool_id"] for item in page["items"])
        cursor = page.get("next_cursor")
        if not cursor:
            return found


def _write_report(path: Path, rows: list[RowResult]) -> None:
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps([asdict(r) for r in rows], indent=1), encoding="utf-8")
        return
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(RowResult.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)


def _summary(rows: list[RowResult], regions_added: int) -> None:
    counts = Counter(r.status for r in rows)
    offers = len(rows) - counts["skipped"]
    registered = counts["created"] + counts["updated"]
    table = Table(title="import summary")
    table.add_column("rows")
    table.add_column("count", justify="right")
    table.add_row("read", str(len(rows)))
    table.add_row("not accelerator offers (skipped)", str(counts["skipped"]))
    table.add_row("accelerator offers", str(offers))
    table.add_row("registered: created", str(counts["created"]))
    table.add_row("registered: updated", str(counts["updated"]))
    table.add_row("rejected by the importer's rules", str(counts["rejected"]))
    table.add_row("refused by the registry", str(counts["refused"]))
    table.add_row("not attempted (registry failed)", str(counts["not-attempted"]))
    table.add_row("regions added to the topology", str(regions_added))
    out.print(table)
    reasons = Counter(reason_kind(r.reason) for r in rows if r.status in {"rejected", "refused", "not-attempted"})
    if reasons:
        why = Table(title="offers not registered, by reason (every row is in --report)")
        why.add_column("reason")
        why.add_column("rows", justify="right")
        for reason, n in reasons.most_common(15):
            why.add_row(reason, str(n))
        out.print(why)
    pct = f" ({100 * registered / offers:.1f}% of offers)" if offers else ""
    # a spot-only row shares its on-demand twin's pool: count pools, not rows
    pools = {status: len({r.pool_id for r in rows if r.status == status}) for status in ("created", "updated")}
    out.print(f"{pools['created']} pools registered, {pools['updated']} updated{pct}; "
              f"{counts['skipped']} rows without an accelerator skipped")
    out.print("pool ids are the same on every run: re-running this import updates these pools")


def _run(client: httpx.Client, result: ImportResult, provider: str, reject: bool, report: Path | None) -> list[str]:
    """Register a parsed import, print the summary, write the report; returns the ids of
    the pools registered."""
    failed_regions = _add_regions(client, result, reject)
    by_id = dict(result.pools)
    to_register = [(p, s) for p, s in result.pools if s.region not in failed_regions]
    error = ""
    registered: dict[str, tuple[str, str]] = {}
    try:
        registered = register(client, to_register, existing_pools(client, provider))
    except _Refused as exc:
        error = str(exc)
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"
    rows: list[RowResult] = []
    for o in result.outcomes:
        if o.status != "ready":
            rows.append(_row_result(o, o.status))
            continue
        spec = by_id.get(o.pool_id)
        if spec is not None and spec.region in failed_regions:
            rows.append(_row_result(o, "refused", failed_regions[spec.region]))
        elif o.pool_id in registered:
            status, reason = registered[o.pool_id]
            rows.append(_row_result(o, status, reason))
        else:
            rows.append(_row_result(o, "not-attempted", error or "not sent"))
    for region in sorted(result.unknown_regions):
        n = sum(1 for r in rows if r.region == region and r.status == "rejected")
        console.print(f"[red]warning:[/] region {region} is unknown ({n} rows not imported; "
                      "give it a location with --region-map)")
    _summary(rows, len({s.region for _, s in to_register} & set(result.new_regions)))
    if report:
        _write_report(report, rows)
        out.print(f"report: {report} ({len(rows)} rows)")
    if error:
        raise click.ClickException(f"registry failed: {error}; pools registered before it stay registered "
                                   "(re-run the import to finish: it updates them)")
    if any(r.status == "refused" for r in rows):
        raise SystemExit(1)
    return [r.pool_id for r in rows if r.status in {"created", "updated"}]


def keep_alive(client: httpx.Client, pool_ids: list[str], interval_s: float,
               stop: threading.Event | None = None) -> None:
    """Heartbeat imported pools until stopped: listed supply nobody else heartbeats stays
    matchable (docs/matching.md: availability from a catalogue, not live)."""
    stop = stop or threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(sig, lambda *_: stop.set())
        except ValueError:  # not the main thread (tests)
            pass
    console.print(f"keeping {len(pool_ids)} imported pools alive every {interval_s:g}s "
                  "(listed supply: availability is from the catalogue, not live); Ctrl-C stops")
    while not stop.is_set():
        for start in range(0, len(pool_ids), HEARTBEAT_CHUNK):
            try:
                r = client.post("/v1/heartbeats", json={"pools": pool_ids[start:start + HEARTBEAT_CHUNK]})
                if r.status_code >= 400:
                    console.print(f"[red]heartbeat refused:[/] {_registry_reason(r)}")
            except httpx.HTTPError as exc:
                console.print(f"[red]heartbeat failed:[/] {exc}")
        stop.wait(interval_s)


_common = [
    click.option("--registry-url", default=lambda: os.environ.get("CB_REGISTRY_URL", "http://127.0.0.1:8081"),
                 show_default="$CB_REGISTRY_URL or http://127.0.0.1:8081"),
    click.option("--key", default=lambda: os.environ.get("CB_KEY"), required=True,
                 help="API key (admin, or the provider's own); default $CB_KEY"),
    click.option("--provider", required=True, help="Provider id the pools belong to."),
]

_catalogue_options = [
    click.option("--cloud", default=None,
                 help="Whose region codes these are (aws, gcp, azure, lambda, runpod, vast, ...); "
                      "default: the provider id."),
    click.option("--units-per-offer", type=click.IntRange(1, 100_000), default=1, show_default=True,
                 help="How many instances of each offer the provider has."),
    click.option("--region-map", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                 help="Regions the table does not know: JSON {code: region-id | {id,name,country,lat,lon}} "
                      "or CSV code,region[,name,country,lat,lon]."),
    click.option("--reject-unknown-regions", is_flag=True,
                 help="Fail (import nothing) instead of adding regions the topology lacks."),
    click.option("--report", type=click.Path(dir_okay=False, path_type=Path),
                 help="Write every row's outcome here (.json for JSON, else CSV)."),
    click.option("--keep-alive", is_flag=True,
                 help="Stay running and heartbeat the imported pools so they stay matchable."),
    click.option("--keep-alive-interval", type=click.FloatRange(0.5, 3600), default=10.0, show_default=True,
                 help="Seconds between heartbeats (below the registry's heartbeat TTL, 30 s by default)."),
]


def _options(options: list) -> Callable:
    def decorate(f):  # noqa: ANN001, ANN202
        for option in reversed(options):
            f = option(f)
        return f
    return decorate


@click.group("import")
def import_group() -> None:
    """Register capacity from public catalogues and traces."""


def _catalogue_rows(path: Path, required: Iterable[str], what: str) -> list[dict[str, str]]:
    try:
        text = read_catalogue_text(path.read_bytes(), what)
        reader = csv.DictReader(text.splitlines(keepends=True))
        check_columns(reader.fieldnames, required, what)
        return list(reader)
    except FileError as exc:
        _fail(path, str(exc))
    except csv.Error as exc:
        _fail(path, f"not a readable CSV: {exc}")
    raise AssertionError("unreachable")


def _import_catalogue(rows: list[dict[str, str]], registry_url: str, key: str, provider: str, cloud: str | None,
                      units_per_offer: int, region_map: Path | None, reject_unknown_regions: bool,
                      report: Path | None, keep: bool, interval: float) -> None:
    try:
        mapping = load_region_map(region_map) if region_map else None
    except FileError as exc:
        _fail(region_map or Path("region-map"), str(exc))
    with _client(registry_url, key) as client:
        try:
            known = _known_regions(client)
        except httpx.HTTPError as exc:
            raise click.ClickException(f"cannot read the registry's regions at {registry_url}: {exc}") from None
        result = parse_skypilot(rows, provider, known, units_per_offer=units_per_offer, cloud=cloud,
                                region_map=mapping)
        pool_ids = _run(client, result, provider, reject_unknown_regions, report)
        if keep and pool_ids:
            keep_alive(client, pool_ids, interval)


@import_group.command("skypilot")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_options(_common + _catalogue_options)
def skypilot(file: Path, registry_url: str, key: str, provider: str, cloud: str | None, units_per_offer: int,
             region_map: Path | None, reject_unknown_regions: bool, report: Path | None, keep_alive: bool,
             keep_alive_interval: float) -> None:
    """Import a SkyPilot catalogue file (vms.csv format)."""
    rows = _catalogue_rows(file, SKYPILOT_REQUIRED, "SkyPilot vms.csv")
    _import_catalogue(rows, registry_url, key, provider, cloud, units_per_offer, region_map,
                      reject_unknown_regions, report, keep_alive, keep_alive_interval)


@import_group.command("gpuhunt")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_options(_common + _catalogue_options)
def gpuhunt(file: Path, registry_url: str, key: str, provider: str, cloud: str | None, units_per_offer: int,
            region_map: Path | None, reject_unknown_regions: bool, report: Path | None, keep_alive: bool,
            keep_alive_interval: float) -> None:
    """Import a dstack gpuhunt catalogue CSV (one provider's file, e.g. runpod.csv)."""
    rows = _catalogue_rows(file, GPUHUNT_REQUIRED, "gpuhunt catalogue CSV")
    _import_catalogue(gpuhunt_to_skypilot(rows), registry_url, key, provider, cloud, units_per_offer, region_map,
                      reject_unknown_regions, report, keep_alive, keep_alive_interval)


@import_group.command("alibaba-trace")
@click.argument("nodes_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_options(_common)
@click.option("--region", default="cn-yrd", show_default=True, help="Region the cluster's nodes are in.")
@click.option("--assume", multiple=True, metavar="CODE=MODEL",
              help="Map an undisclosed model code (G1, G2, G3) to a catalogue model id.")
def alibaba_trace(nodes_csv: Path, registry_url: str, key: str, provider: str, region: str,
                  assume: tuple[str, ...]) -> None:
    """Import the node list of Alibaba's GPU cluster trace (one pool per node)."""
    mapping = {}
    for item in assume:
        code, sep, model = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r}: use CODE=MODEL", param_hint="--assume")
        mapping[code.strip()] = model.strip()
    with _client(registry_url, key) as client:
        result = parse_alibaba_nodes(read_csv_rows(nodes_csv), provider, region, assume=mapping)
        try:
            registered = register(client, result.pools, existing_pools(client, provider))
        except (_Refused, httpx.HTTPError) as exc:
            raise click.ClickException(f"registry failed: {exc}") from None
        counts = Counter(status for status, _ in registered.values())
        out.print(f"{counts['created']} pools registered, {counts['updated']} updated; "
                  f"{result.skipped_no_accelerator} rows without an accelerator skipped")
        if result.unmapped:
            table = Table(title="accelerator names that did not map to the catalogue (not imported)")
            table.add_column("name")
            table.add_column("rows", justify="right")
            for name, n in result.unmapped.most_common():
                table.add_row(name, str(n))
            out.print(table)
        for error in result.errors:
            out.print(f"[red]row error:[/] {error}")
        if counts["refused"]:
            for pool_id, (status, reason) in registered.items():
                if status == "refused":
                    out.print(f"[red]refused:[/] {pool_id}: {reason}")
            raise SystemExit(1)


__all__ = ["existing_pools", "import_group", "keep_alive", "load_region_map", "register"]
