"""``cbroker import`` against a registry process over real HTTP."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import httpx
from click.testing import CliRunner

from services.cli.main import cli

from ..procs import service_process

SKYPILOT = '''InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,Price,Region,GpuInfo,SpotPrice
gpu_8x_a100,A100,8.0,124.0,1800.0,10.32,us-east-1,"{'Gpus': [{'Name': 'A100', 'Manufacturer': 'NVIDIA', 'Count': 8.0, 'MemoryInfo': {'SizeInMiB': 40960}}], 'TotalGpuMemoryInMiB': 40960}",
gpu_8x_a100_80gb,A100-80GB,8.0,124.0,1800.0,14.32,us-east-1,"{'Gpus': [{'Name': 'A100', 'Manufacturer': 'NVIDIA', 'Count': 8.0, 'MemoryInfo': {'SizeInMiB': 81920}}], 'TotalGpuMemoryInMiB': 655360}",4.0
gpu_1x_a6000,A6000,1.0,14.0,100.0,0.8,us-east-1,"{'Gpus': [{'Name': 'A6000', 'Manufacturer': 'NVIDIA', 'Count': 1.0, 'MemoryInfo': {'SizeInMiB': 49152}}], 'TotalGpuMemoryInMiB': 49152}",
cpu_4x,,,4.0,16.0,0.2,us-east-1,,
gpu_1x_mystery,Quantum9000,1.0,8.0,64.0,3.0,us-east-1,,
gpu_1x_h100,H100,1.0,26.0,200.0,2.49,mars-north-1,,
gpu_2x_h100,H100,2.0,52.0,400.0,4.98,us-east,,
'''


def test_import_skypilot(settings, nc, tmp_path: Path) -> None:
    csv_path = tmp_path / "vms.csv"
    csv_path.write_text(SKYPILOT)
    with service_process("registry", settings, tmp_path) as registry:
        result = CliRunner().invoke(cli, ["import", "skypilot", str(csv_path), "--provider", "lambda",
                                          "--registry-url", registry.url, "--key", settings.admin_key or ""])
        assert result.exit_code == 0, result.output
        out = result.output
        assert "4 pools registered" in out  # 3 in Lambda's us-east-1 (added) + 1 in us-east (known)
        assert "Quantum9000" in out  # unmapped names are reported, never dropped silently
        assert "lambda-us-east-1 was not in the topology" in out
        assert "mars-north-1 is unknown" in out
        assert "1 rows without an accelerator skipped" in out
        admin = {"Authorization": f"Bearer {settings.admin_key}"}
        pools = httpx.get(f"{registry.url}/v1/pools", params={"provider": "lambda"}, headers=admin).json()["items"]
        by_model = {p["model"]: p for p in pools}
        assert set(by_model) == {"nvidia-a100-sxm-40gb", "nvidia-a100-sxm-80gb", "nvidia-rtx-a6000",
                                 "nvidia-h100-sxm-80gb"}
        a100 = by_model["nvidia-a100-sxm-40gb"]
        assert a100["region"] == "lambda-us-east-1" and a100["capacity"] == 8
        assert Decimal(a100["spec"]["prices"]["on_demand"]) == Decimal("1.29")  # 10.32 / 8
        assert Decimal(by_model["nvidia-a100-sxm-80gb"]["spec"]["prices"]["interruptible"]) == Decimal("0.5")
        regions = {r["id"] for r in httpx.get(f"{registry.url}/v1/regions").json()}
        assert "lambda-us-east-1" in regions and not any("mars" in r for r in regions)

        # re-import is idempotent: same pools, updated not duplicated
        again = CliRunner().invoke(cli, ["import", "skypilot", str(csv_path), "--provider", "lambda",
                                         "--registry-url", registry.url, "--key", settings.admin_key or ""])
        assert again.exit_code == 0 and "0 pools registered, 4 updated" in again.output

        # --reject-unknown-regions changes nothing
        csv2 = tmp_path / "vms2.csv"
        csv2.write_text(SKYPILOT.replace("us-east-1", "europe-central-1"))
        rejected = CliRunner().invoke(cli, ["import", "skypilot", str(csv2), "--provider", "lambda2", "--cloud", "lambda",
                                            "--registry-url", registry.url, "--key", settings.admin_key or "",
                                            "--reject-unknown-regions"])
        assert rejected.exit_code != 0 and "lambda-europe-central-1" in rejected.output
        assert httpx.get(f"{registry.url}/v1/pools", params={"provider": "lambda2"},
                         headers=admin).json()["total"] == 0


def test_import_alibaba_trace(settings, nc, tmp_path: Path) -> None:
    nodes = Path(__file__).parents[1] / "data" / "alibaba-gpu-v2023" / "openb_node_list_gpu_node_excerpt.csv"
    with service_process("registry", settings, tmp_path) as registry:
        result = CliRunner().invoke(cli, ["import", "alibaba-trace", str(nodes), "--provider", "alibaba",
                                          "--region", "cn-yrd", "--registry-url", registry.url,
                                          "--key", settings.admin_key or ""])
        assert result.exit_code == 0, result.output
        assert "26 pools registered" in result.output and "G2" in result.output and "G3" in result.output
        admin = {"Authorization": f"Bearer {settings.admin_key}"}
        page = httpx.get(f"{registry.url}/v1/pools", params={"provider": "alibaba", "limit": 1000},
                         headers=admin).json()
        assert page["total"] == 26  # the excerpt's nodes of disclosed models (G1-G3 are not)
        assert {p["model"] for p in page["items"]} >= {"nvidia-t4", "nvidia-p100-pcie-16gb"}


def test_spot_only_rows_register_one_pool_with_both_prices(settings, nc, tmp_path: Path) -> None:
    """Spheron's ``n3-A100x1-spot__CANADA-1`` prices its on-demand twin: 11 rows, 10 pools."""
    fixture = Path(__file__).parents[1] / "fixtures" / "catalogues" / "spheron" / "vms.csv"
    with service_process("registry", settings, tmp_path) as registry:
        result = CliRunner().invoke(cli, ["import", "skypilot", str(fixture), "--provider", "spheron",
                                          "--registry-url", registry.url, "--key", settings.admin_key or ""])
        assert result.exit_code == 0, result.output
        assert "10 pools registered" in result.output, result.output
        admin = {"Authorization": f"Bearer {settings.admin_key}"}
        pools = httpx.get(f"{registry.url}/v1/pools", params={"provider": "spheron"}, headers=admin).json()["items"]
        a100 = next(p for p in pools if p["pool_id"] == "spheron-canada-1-n3-a100x1__canada-1")
        prices = a100["spec"]["prices"]
        assert (Decimal(prices["on_demand"]), Decimal(prices["interruptible"])) == (Decimal("1.4327"), Decimal("1.1476"))
