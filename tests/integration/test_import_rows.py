"""``cbroker import`` row by row against a real registry process: bad rows never sink good
ones, every row is in the report, and --keep-alive keeps listed supply matchable."""

from __future__ import annotations

import json
import threading
from decimal import Decimal
from pathlib import Path

import httpx
import msgspec
from click.testing import CliRunner

from services.cli.importer import keep_alive
from services.cli.main import cli

from ..helpers import wait_until
from ..procs import service_process

FIXTURES = Path(__file__).parents[1] / "fixtures" / "catalogues"


def _import(registry_url: str, key: str, path: Path, provider: str, *extra: str):
    return CliRunner().invoke(cli, ["import", "skypilot", str(path), "--provider", provider,
                                    "--registry-url", registry_url, "--key", key, *extra])


def _pools(url: str, key: str, provider: str) -> dict[str, dict]:
    r = httpx.get(f"{url}/v1/pools", params={"provider": provider, "limit": 1000},
                  headers={"Authorization": f"Bearer {key}"})
    return {p["pool_id"]: p for p in r.json()["items"]}


def _until(check, timeout: float = 20.0, what: str = "condition"):  # noqa: ANN001, ANN202
    return wait_until(check, timeout=timeout, every=0.05, what=what)


def test_zero_spot_prices_and_location_strings_register_every_offer(settings, nc, tmp_path: Path) -> None:
    # Vast.ai's real rows: SpotPrice 0.00 on every row (one made the registry refuse the
    # whole batch with a 422) and "City, CC, continent" regions.
    report = tmp_path / "report.json"
    with service_process("registry", settings, tmp_path) as registry:
        result = _import(registry.url, settings.admin_key or "", FIXTURES / "vast" / "vms.csv", "vast",
                         "--report", str(report))
        assert result.exit_code == 0, result.output
        assert "14 pools registered, 0 updated (100.0% of offers)" in result.output
        rows = json.loads(report.read_text())
        assert len(rows) == 14 and {r["status"] for r in rows} == {"created"}
        pools = _pools(registry.url, settings.admin_key or "", "vast")
        assert set(pools) == {r["pool_id"] for r in rows}
        assert all(p["spec"]["prices"]["interruptible"] is None for p in pools.values())
        regions = {r["id"]: r for r in httpx.get(f"{registry.url}/v1/regions").json()}
        assert regions["vast-us-oregon"]["country"] == "US" and "vast-dk" in regions

        again = _import(registry.url, settings.admin_key or "", FIXTURES / "vast" / "vms.csv", "vast")
        assert again.exit_code == 0 and "0 pools registered, 14 updated" in again.output  # re-runnable


def test_a_refused_row_does_not_sink_its_batch(settings, nc, tmp_path: Path) -> None:
    admin = {"Authorization": f"Bearer {settings.admin_key}"}
    csv_path = FIXTURES / "lambda" / "vms.csv"
    taken = "lambda-us-midwest-1-gpu_8x_v100"  # the pool id row 3 gets
    with service_process("registry", settings, tmp_path) as registry:
        # another provider already owns that pool id: the registry refuses row 3 (403)
        body = {"region": "us-east", "model": "nvidia-t4", "units": 1, "units_per_node": 1,
                "prices": {"on_demand": "0.5"}, "provider": "someone-else"}
        assert httpx.put(f"{registry.url}/v1/pools/{taken}", json=body, headers=admin).status_code == 201
        report = tmp_path / "report.csv"
        result = _import(registry.url, settings.admin_key or "", csv_path, "lambda", "--report", str(report))
        assert result.exit_code == 1, result.output  # something was refused: say so
        assert "11 pools registered" in result.output and "refused by the registry" in result.output
        lines = report.read_text().splitlines()
        refused = [line for line in lines if ",refused," in line]
        assert len(refused) == 1 and taken in refused[0] and "403" in refused[0]
        pools = _pools(registry.url, settings.admin_key or "", "lambda")
        assert len(pools) == 11 and taken not in pools

        # --json: the same summary as one JSON object on stdout, and the same exit status
        report2 = tmp_path / "report2.json"
        as_json = _import(registry.url, settings.admin_key or "", csv_path, "lambda", "--report", str(report2),
                          "--json")
        assert as_json.exit_code == 1, as_json.output
        summary = json.loads(as_json.stdout)
        assert summary["provider"] == "lambda" and list(summary["clouds"]) == ["lambda"]
        counts = summary["clouds"]["lambda"]
        assert counts["registered"] == counts["updated"] == 11 and counts["created"] == 0
        assert counts["pools_updated"] == 11 and counts["refused"] == 1
        assert counts["rows"] == len(json.loads(report2.read_text()))
        assert summary["report"] == {"path": str(report2), "rows": counts["rows"]}
        assert summary["error"] is None and sum(summary["not_registered_by_reason"].values()) >= 1


def test_keep_alive_keeps_imported_pools_online(settings, nc, tmp_path: Path) -> None:
    fast = msgspec.structs.replace(settings, heartbeat_ttl_s=1.0, sweep_interval_s=0.1)
    key = settings.admin_key or ""
    with service_process("registry", fast, tmp_path) as registry:
        assert _import(registry.url, key, FIXTURES / "nebius" / "vms.csv", "nebius").exit_code == 0
        assert _import(registry.url, key, FIXTURES / "lambda" / "vms.csv", "lambda").exit_code == 0
        kept = list(_pools(registry.url, key, "nebius"))
        stop = threading.Event()
        with httpx.Client(base_url=registry.url, headers={"Authorization": f"Bearer {key}"}) as client:
            beat = threading.Thread(target=keep_alive, args=(client, kept, 0.2, stop), daemon=True)
            beat.start()
            try:
                # the pools nobody heartbeats go offline after the TTL ...
                _until(lambda: all(p["status"] == "offline" for p in _pools(registry.url, key, "lambda").values()),
                       what="un-kept pools offline")
                # ... while the kept ones are still online
                assert {p["status"] for p in _pools(registry.url, key, "nebius").values()} == {"online"}
            finally:
                stop.set()
                beat.join(timeout=5)
        _until(lambda: all(p["status"] == "offline" for p in _pools(registry.url, key, "nebius").values()),
               what="pools offline once the heartbeats stop")


def test_placeless_and_spot_only_offers_register(settings, nc, tmp_path: Path) -> None:
    # Daytona's rows say Region "earth"; Verda sells 2B300.60V as spot only. Both were
    # rejected; now they are pools: in Daytona's region of unknown location (added with
    # located: false and no links), and interruptible-only.
    with service_process("registry", settings, tmp_path) as registry:
        key = settings.admin_key or ""
        result = _import(registry.url, key, FIXTURES / "daytona" / "vms.csv", "daytona")
        assert result.exit_code == 0, result.output
        assert "3 pools registered" in result.output and "unknown location" in result.output
        pools = _pools(registry.url, key, "daytona")
        assert len(pools) == 3 and {p["spec"]["region"] for p in pools.values()} == {"daytona-unlocated"}
        regions = {r["id"]: r for r in httpx.get(f"{registry.url}/v1/regions").json()}
        assert regions["daytona-unlocated"]["located"] is False
        assert httpx.get(f"{registry.url}/v1/network", params={"dst": "daytona-unlocated"}).json() == []
        result = _import(registry.url, key, FIXTURES / "verda" / "vms.csv", "verda")
        assert result.exit_code == 0, result.output
        prices = {p["spec"]["prices"]["on_demand"]: p["spec"]["prices"]["interruptible"]
                  for p in _pools(registry.url, key, "verda").values()}
        assert Decimal(prices[None]) == Decimal("2.4465")


def test_shares_of_one_gpu_register_as_sharing_pools(settings, nc, tmp_path: Path) -> None:
    # AWS's real g6f/gr6f rows (1/8, 1/4, 1/2 of an L4) were rejected as "fractional
    # AcceleratorCount"; through the CLI's bulk path they are now memory-sharing pools.
    report = tmp_path / "report.json"
    with service_process("registry", settings, tmp_path) as registry:
        key = settings.admin_key or ""
        result = _import(registry.url, key, FIXTURES / "aws-v9" / "vms.csv", "aws", "--report", str(report))
        assert result.exit_code == 0, result.output
        pools = _pools(registry.url, key, "aws")
        shares = {pid: p["spec"] for pid, p in pools.items() if p["spec"]["sharing"]["mode"] != "none"}
        assert {pid: (s["sharing"]["mode"], s["sharing"]["min_milli"], s["units"]) for pid, s in shares.items()} == {
            "aws-us-east-1-use1-az1-g6f-large": ("memory", 125, 1),
            "aws-us-east-1-use1-az1-g6f-xlarge": ("memory", 125, 1),
            "aws-us-east-1-use1-az1-g6f-2xlarge": ("memory", 250, 1),
            "aws-us-east-1-use1-az1-g6f-4xlarge": ("memory", 500, 1),
            "aws-us-east-1-use1-az1-gr6f-4xlarge": ("memory", 500, 1)}
        assert Decimal(shares["aws-us-east-1-use1-az1-g6f-large"]["prices"]["on_demand"]) == Decimal("1.616")
        assert pools["aws-us-east-1-use1-az1-g6f-large"]["accelerator"]["memory_gib"] == 24.0
        rows = {r["pool_id"]: r for r in json.loads(report.read_text()) if r.get("pool_id")}
        assert rows["aws-us-east-1-use1-az1-g6f-large"]["status"] == "created"
