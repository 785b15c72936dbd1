"""``cbroker import``: register offers from public catalogues and traces through the
registry's HTTP API (bulk endpoint), reporting everything that did not map."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import click
import httpx
import msgspec
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from services.common.messages import PoolSpec
from services.registry.domain.importers import ImportResult, parse_alibaba_nodes, parse_skypilot, read_csv_rows

from .cloud_regions import CLOUD_REGIONS

console = Console(stderr=True)
BATCH = 500


def _client(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def _known_regions(client: httpx.Client) -> set[str]:
    r = client.get("/v1/regions")
    r.raise_for_status()
    return {region["id"] for region in r.json()}


def _add_cloud_regions(client: httpx.Client, result: ImportResult, reject: bool) -> set[str]:
    """Add unknown regions that have a known location; returns regions still unknown."""
    if not result.unknown_regions:
        return set()
    if reject:
        raise click.ClickException(f"unknown regions (rejected by --reject-unknown-regions): "
                                   f"{', '.join(sorted(result.unknown_regions))}; nothing was imported")
    missing = set()
    for region in sorted(result.unknown_regions):
        if region not in CLOUD_REGIONS:
            missing.add(region)
            continue
        name, country, lat, lon = CLOUD_REGIONS[region]
        body = {"id": region, "name": name, "country": country, "lat": lat, "lon": lon, "kind": "cloud"}
        r = client.put(f"/v1/regions/{region}", json=body)
        if r.status_code >= 400:
            raise click.ClickException(f"cannot add region {region}: {r.status_code} {r.text} "
                                       "(adding regions needs an admin key, or pass --reject-unknown-regions)")
        console.print(f"[yellow]warning:[/] region {region} was not in the topology; added as {name}, {country} "
                      "with derived network links")
    for region in sorted(missing):
        console.print(f"[red]warning:[/] region {region} is unknown and has no known location; its offers "
                      "are not imported (add it with PUT /v1/regions/{id})")
    return missing


def register(client: httpx.Client, pools: Iterable[tuple[str, PoolSpec]], total: int) -> tuple[int, int]:
    created = updated = 0
    batch: list[dict] = []
    with Progress(console=console, transient=False) as progress:
        task = progress.add_task("registering pools", total=total)

        def flush() -> None:
            nonlocal created, updated
            r = client.post("/v1/pools/bulk", content=msgspec.json.encode(batch),
                            headers={"content-type": "application/json"})
            if r.status_code >= 400:
                raise click.ClickException(f"registry refused a batch: {r.status_code} {r.text}")
            created += r.json()["created"]
            updated += r.json()["updated"]
            progress.advance(task, len(batch))
            batch.clear()

        for pool_id, spec in pools:
            batch.append({"pool_id": pool_id, **msgspec.to_builtins(spec)})
            if len(batch) >= BATCH:
                flush()
        if batch:
            flush()
    return created, updated


def report(result: ImportResult, created: int, updated: int, dropped: int) -> None:
    console.print(f"[green]{created} pools registered, {updated} updated[/]; "
                  f"{result.skipped_no_accelerator} rows without an accelerator skipped; "
                  f"{dropped} offers in unknown regions not imported")
    if result.unmapped:
        table = Table(title="accelerator names that did not map to the catalogue (not imported)")
        table.add_column("name")
        table.add_column("rows", justify="right")
        for name, n in result.unmapped.most_common():
            table.add_row(name, str(n))
        console.print(table)
    for error in result.errors:
        console.print(f"[red]row error:[/] {error}")


def _run(client: httpx.Client, result: ImportResult, reject: bool) -> None:
    missing = _add_cloud_regions(client, result, reject)
    pools = [(p, s) for p, s in result.pools if s.region not in missing]
    created, updated = register(client, pools, len(pools))
    report(result, created, updated, len(result.pools) - len(pools))


_common = [
    click.option("--registry-url", default=lambda: os.environ.get("CB_REGISTRY_URL", "http://127.0.0.1:8081"),
                 show_default="$CB_REGISTRY_URL or http://127.0.0.1:8081"),
    click.option("--key", default=lambda: os.environ.get("CB_KEY"), required=True,
                 help="API key (admin, or the provider's own); default $CB_KEY"),
    click.option("--provider", required=True, help="Provider id the pools belong to."),
]


def _with_common(f):  # noqa: ANN001, ANN202
    for option in reversed(_common):
        f = option(f)
    return f


@click.group("import")
def import_group() -> None:
    """Register capacity from public catalogues and traces."""


@import_group.command("skypilot")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_with_common
@click.option("--units-per-offer", type=click.IntRange(1, 100_000), default=1, show_default=True,
              help="How many instances of each offer the provider has.")
@click.option("--reject-unknown-regions", is_flag=True, help="Fail instead of adding unknown regions.")
def skypilot(file: Path, registry_url: str, key: str, provider: str, units_per_offer: int,
             reject_unknown_regions: bool) -> None:
    """Import a SkyPilot catalogue file (vms.csv format)."""
    with _client(registry_url, key) as client:
        result = parse_skypilot(read_csv_rows(file), provider, _known_regions(client),
                                units_per_offer=units_per_offer)
        _run(client, result, reject_unknown_regions)


@import_group.command("alibaba-trace")
@click.argument("nodes_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_with_common
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
        _run(client, result, reject=True)
