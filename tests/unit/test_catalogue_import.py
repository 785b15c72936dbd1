"""Real catalogue rows per cloud (tests/fixtures/catalogues, sources in its README): models
with form factor and memory, per-GPU prices, regions from codes and location strings, and
every kind of bad row or file reported, never raised."""

from __future__ import annotations

import csv
from decimal import Decimal
from pathlib import Path

import pytest
from click.testing import CliRunner

from services.cli.main import cli
from services.common.messages import Region
from services.registry.domain.cloud_regions import RegionResolver
from services.registry.domain.importers import ImportResult, RowOutcome, parse_skypilot
from services.registry.domain.offer_formats import gpuhunt_to_skypilot

FIXTURES = Path(__file__).parents[1] / "fixtures" / "catalogues"


def _parse(cloud: str, text: str | None = None, **kw: object) -> ImportResult:
    body = text if text is not None else (FIXTURES / cloud / "vms.csv").read_text("utf-8")
    return parse_skypilot(body, cloud, set(), cloud=cloud, **kw)  # type: ignore[arg-type]


def _row(result: ImportResult, row: int) -> RowOutcome:
    return next(o for o in result.outcomes if o.row == row)


def _lines(cloud: str) -> list[str]:
    return (FIXTURES / cloud / "vms.csv").read_text("utf-8").splitlines()


# --- models, memory per GPU, form factor ------------------------------------------------------
@pytest.mark.parametrize(("cloud", "row", "model", "per_gpu"), [
    ("vast", 9, "nvidia-a100-sxm-40gb", "0.935000"),    # 2 x A100, GpuInfo gives the instance's 80 GB
    ("vast", 8, "nvidia-a100-sxm-80gb", "0.935000"),    # 2 x A100, 160 GB in all
    ("vast", 10, "nvidia-a100-pcie-40gb", "0.665000"),  # A100_PCIE in the instance name
    ("vast", 6, "nvidia-h100-nvl-94gb", "1.980000"),    # H100_NVL, 93.6 GiB
    ("vast", 7, "nvidia-h100-sxm-80gb", "1.867500"),
    ("vast", 4, "nvidia-rtx-pro-6000", "0.930000"),
    ("vast", 11, "nvidia-rtx-4070-ti-super", "0.192500"),  # "RTX4070" at 16 GB per card
    ("vast", 12, "nvidia-rtx-3060-ti", "0.160000"),        # "RTX3060" at 8 GB
    ("vast", 13, "nvidia-rtx-6000-ada", "0.520000"),
    ("vast", 5, "nvidia-h200-sxm-141gb", "2.588750"),
    ("runpod", 1, "nvidia-a100-pcie-80gb", "1.390000"),  # GpuInfo "A100 PCIe", memory written in GB
    ("runpod", 5, "nvidia-a100-pcie-80gb", "1.390000"),
    ("nebius", 2, "nvidia-h100-sxm-80gb", "2.950000"),   # SizeInMiB 0: the name decides
    ("nebius", 5, "nvidia-b200-180gb", "5.500000"),
    ("lambda", 2, "nvidia-v100-sxm2-16gb", "0.790000"),  # SizeInMiB per GPU, "Total" wrong
    ("lambda", 7, "nvidia-a100-pcie-40gb", "1.990000"),  # gpu_1x_a100 is the PCIe card ...
    ("lambda", 8, "nvidia-a100-sxm-40gb", "1.990000"),   # ... gpu_1x_a100_sxm4 the SXM one
    ("lambda", 9, "nvidia-h100-pcie-80gb", "3.290000"),
    ("lambda", 10, "nvidia-h100-sxm-80gb", "3.990000"),
    ("lambda", 11, "nvidia-quadro-rtx-6000", "0.690000"),
    ("lambda", 12, "nvidia-b200-180gb", "6.690000"),
    ("lambda", 13, "nvidia-gh200-96gb", "2.290000"),
    ("aws", 2, "nvidia-a100-sxm-40gb", "4.096575"),      # p4d: 8 x 40 GB, total 320 GB
    ("aws", 3, "nvidia-a100-sxm-80gb", "5.120000"),
    ("aws", 6, "intel-gaudi1", "1.638630"),
    ("aws", 7, "aws-inferentia2", "0.758200"),
    ("cudo", 2, "nvidia-a100-pcie-80gb", "1.529400"),    # epyc-genoa-a100-pcie
    ("cudo", 4, "nvidia-a100-pcie-80gb", "1.396800"),    # intel-ice-lake-a100-pci, 2 GPUs
    ("cudo", 3, "nvidia-h100-sxm-80gb", "1.821400"),
    ("cudo", 5, "nvidia-rtx-a5000", "0.369200"),
    ("gcp", 3, "google-tpu-v6e", "2.700000"),            # tpu-v6e-4: 4 chips for 10.8
    ("gcp", 8, "google-tpu-v6e", "2.970000"),
])
def test_real_rows_resolve_model_memory_and_price(cloud: str, row: int, model: str, per_gpu: str) -> None:
    outcome = _row(_parse(cloud), row)
    assert (outcome.status, outcome.model, outcome.on_demand) == ("ready", model, Decimal(per_gpu)), outcome


def test_instance_total_memory_is_divided_per_gpu() -> None:
    # 8 x A100-40GB where GpuInfo gives the instance's 320 GB: 40 GB per GPU, never 80.
    row = ("p4d.24xlarge,A100,8,96,1152,32.77,us-east-1,\"{'Gpus': [{'Name': 'A100', 'Manufacturer': 'NVIDIA', "
           "'Count': 8, 'MemoryInfo': {'SizeInMiB': 327680}}], 'TotalGpuMemoryInMiB': 327680}\",")
    header = "InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,Price,Region,GpuInfo,SpotPrice"
    (_, spec), = _parse("aws", f"{header}\n{row}\n").pools
    assert spec.model == "nvidia-a100-sxm-40gb"


def test_tpu_slices_are_chips() -> None:
    result = _parse("gcp")
    spec = dict(result.pools)[_row(result, 8).pool_id]
    assert (spec.units, spec.units_per_node, spec.model) == (256, 8, "google-tpu-v6e")
    assert spec.prices.interruptible == Decimal("0.267300")


def test_gcp_attachable_gpus_without_instance_type_are_offers() -> None:
    result = _parse("gcp")
    t4, l4 = _row(result, 10), _row(result, 11)
    assert (t4.status, t4.model, t4.pool_id) == ("ready", "nvidia-t4", "gcp-us-central1-us-central1-a-t4x1")
    assert (l4.model, l4.on_demand, l4.interruptible) == ("nvidia-l4", Decimal("0.56"), Decimal("0.2"))


@pytest.mark.parametrize(("instance", "name", "model"), [
    ("Standard_NC24ads_A100_v4", "A100-80GB", "nvidia-a100-pcie-80gb"),
    ("Standard_NC40ads_H100_v5", "H100", "nvidia-h100-nvl-94gb"),
    ("Standard_NCC40ads_H100_v5", "H100", "nvidia-h100-nvl-94gb"),
    ("Standard_ND96isr_H100_v5", "H100", "nvidia-h100-sxm-80gb"),
    ("Standard_ND96amsr_A100_v4", "A100-80GB", "nvidia-a100-sxm-80gb"),
])
def test_azure_instance_names_tell_the_form_factor(instance: str, name: str, model: str) -> None:
    header = "InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,Price,Region,GpuInfo,SpotPrice"
    (_, spec), = _parse("azure", f"{header}\n{instance},{name},1,24,220,3.67,eastus,,\n").pools
    assert spec.model == model and spec.region == "azure-eastus"


def test_host_arch_for_arm_parts() -> None:
    result = _parse("aws")
    assert dict(result.pools)[_row(result, 5).pool_id].host_arch == "aarch64"  # g5g: T4g on Graviton
    result = _parse("lambda")
    assert dict(result.pools)[_row(result, 13).pool_id].host_arch == "aarch64"  # GH200: Grace


# --- prices by rule ---------------------------------------------------------------------------
def test_zero_spot_price_means_no_interruptible_price() -> None:
    result = _parse("vast")
    for _, spec in result.pools:
        assert spec.prices.interruptible is None
    assert "SpotPrice 0.00" in _row(result, 1).note


def test_placeholder_and_duplicate_rows_are_reported() -> None:
    result = _parse("gcp")
    assert "placeholder" in _row(result, 5).reason and _row(result, 5).status == "rejected"
    assert _row(result, 4).interruptible is None  # spot 700.0 placeholder dropped, on-demand kept
    assert {o.row for o in result.outcomes if o.status == "rejected"} == {5, 6, 7}


@pytest.mark.parametrize(("price", "spot", "status", "word"), [
    ("1e400", "", "rejected", "absurd Price"),
    ("0", "", "rejected", "Price is 0"),
    ("0.00", "0.00", "rejected", "Price is 0"),
    ("nan", "", "rejected", "Price"),
    ("inf", "", "rejected", "Price"),
    ("9000", "", "rejected", "absurd Price"),    # 1125 per GPU-hour
    ("16", "1e400", "ready", "SpotPrice"),       # absurd spot: dropped, offer kept
    ("16", "-1", "ready", "SpotPrice"),
    ("16", "cheap", "ready", "SpotPrice"),
    ("16", "20", "ready", "above on-demand"),
    ("0.0000001", "", "rejected", "below 0.000001"),
])
def test_price_rules(price: str, spot: str, status: str, word: str) -> None:
    header, first = _lines("lambda")[0], _lines("lambda")[2]
    fields = next(csv.reader([first]))
    fields[5], fields[8] = price, spot
    text = header + "\n" + ",".join(f'"{f}"' for f in fields) + "\n"
    outcome = _parse("lambda", text).outcomes[0]
    assert outcome.status == status
    assert word in (outcome.reason or outcome.note), outcome


# --- row-level problems never raise ------------------------------------------------------------
def test_bad_gpuinfo_and_empty_instance_type_are_row_level() -> None:
    header, a6000 = _lines("lambda")[0], _lines("lambda")[4]
    rows = [
        a6000.replace("{'Gpus'", "{'Gpus': [[[", 1),      # GpuInfo that is no literal
        a6000.replace("gpu_4x_a6000", "", 1),              # empty InstanceType: an offer of 4 x A6000
        a6000.replace("A6000,4.0", "A6000,0.5", 1),        # a share of a GPU: a sharing pool
        a6000.replace("asia-northeast-1", "default", 1),   # a region that names no place
    ]
    result = _parse("lambda", "\n".join([header, *rows]) + "\n")
    bad_info, no_type, share, default = (_row(result, n) for n in (1, 2, 3, 4))
    assert bad_info.status == "ready" and "GpuInfo" in bad_info.note
    assert no_type.status == "ready" and no_type.pool_id.endswith("a6000x4")
    assert share.status == "ready" and dict(result.pools)[share.pool_id].sharing.min_milli == 500
    assert share.memory_gib == 48.0  # GpuInfo gives the card's memory here (AWS gives the slice's)
    assert default.status == "ready" and "location unknown" in default.note
    assert dict(result.pools)[default.pool_id].region == "lambda-unlocated"
    assert result.unknown_regions == set()


# --- regions ---------------------------------------------------------------------------------
def test_location_strings_are_located_never_ids() -> None:
    result = _parse("vast")
    regions = {spec.region for _, spec in result.pools}
    assert "vast-dk" in regions and "vast-us-oregon" in regions and "vast-ca" in regions
    assert not any("," in r or " " in r for r in regions)
    oregon = result.new_regions["vast-us-oregon"]
    assert (oregon.country, round(oregon.lat), round(oregon.lon)) == ("US", 46, -121)


def test_provider_codes_from_the_table_are_scoped_by_cloud() -> None:
    nebius = _parse("nebius").new_regions["nebius-us-central1"]
    gcp = RegionResolver("gcp", set()).locate("us-central1")
    assert nebius.name == "Kansas City" and gcp.region is not None and gcp.region.name == "Iowa"


@pytest.mark.parametrize(("cloud", "code", "zone", "country"), [
    ("runpod", "US", "US-TX-3", "US"), ("x", "fin-01", "", "FI"), ("x", "eu-amsterdam-1", "", "NL"),
    ("x", "denmark-dk-eu", "", "DK"), ("fluidstack", "FINLAND", "", "FI"), ("x", "Iowa", "", "US"),
])
def test_codes_the_table_lacks_are_derived(cloud: str, code: str, zone: str, country: str) -> None:
    found = RegionResolver(cloud, set()).locate(code, zone)
    assert not isinstance(found, str) and found.region is not None and found.region.country == country
    assert found.id != code and found.id.startswith(cloud)


def test_region_map_places_what_nothing_else_can() -> None:
    header, row = _lines("lambda")[0], _lines("lambda")[2].replace("europe-central-1", "default")
    text = f"{header}\n{row}\n"
    assert [s.region for _, s in _parse("lambda", text).pools] == ["lambda-unlocated"]  # unless mapped
    mapped = _parse("lambda", text, region_map={"default": Region(id="lambda-tx", name="Texas", country="US",
                                                                   lat=32.8, lon=-96.8)})
    assert [s.region for _, s in mapped.pools] == ["lambda-tx"] and "lambda-tx" in mapped.new_regions
    known = parse_skypilot(text, "lambda", {"us-east"}, region_map={"default": "us-east"})
    assert [s.region for _, s in known.pools] == ["us-east"] and not known.new_regions


# --- another public format -------------------------------------------------------------------
def test_gpuhunt_rows_merge_on_demand_and_spot() -> None:
    with (FIXTURES / "gpuhunt" / "runpod.csv").open(encoding="utf-8") as f:
        rows = gpuhunt_to_skypilot(csv.DictReader(f))
    result = parse_skypilot(rows, "runpod", set(), cloud="runpod")
    h100, a100, rtx, l40s = result.outcomes
    assert (h100.model, h100.on_demand, h100.interruptible) == ("nvidia-h100-sxm-80gb", Decimal("2.99"),
                                                              Decimal("1.99"))
    assert a100.model == "nvidia-a100-pcie-80gb" and rtx.interruptible == Decimal("0.34")
    # spot-only: an interruptible-only pool
    assert (l40s.status, l40s.on_demand, l40s.interruptible) == ("ready", None, Decimal("0.79"))


# --- malformed files: exit 2, one line, no traceback (nothing is sent to a registry) -----------
@pytest.mark.parametrize(("name", "content", "words"), [
    ("latin1.csv", "InstanceType,AcceleratorName\nx,Caf\xe9\n".encode("latin-1"), "not UTF-8"),
    ("offers.json", b'[{"InstanceType": "p4d.24xlarge"}]', "looks like JSON"),
    ("wrong.csv", b"name,gpus,price\np4d,8,32\n", "missing column"),
    ("missing.csv", b"InstanceType,AcceleratorName,AcceleratorCount,Region\np4d,A100,8,us-east-1\n",
     "missing column(s) Price"),
    ("empty.csv", b"", "empty"),
    ("nul.csv", b"InstanceType,AcceleratorName,AcceleratorCount,Price,Region\nx\0y,A100,1,1,us\n", ""),
])
def test_malformed_files_exit_2_with_one_line(tmp_path: Path, name: str, content: bytes, words: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    result = CliRunner().invoke(cli, ["import", "skypilot", str(path), "--provider", "p",
                                      "--registry-url", "http://127.0.0.1:9", "--key", "k"])
    if name == "nul.csv":  # a NUL inside a field is still CSV: the row goes to the registry step
        assert result.exit_code != 0 and "Traceback" not in result.output
        return
    assert result.exit_code == 2, result.output
    assert words in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


# --- listed supply says so in quotes -----------------------------------------------------------
def test_quotes_say_imported_supply_is_listed_not_live() -> None:
    from datetime import UTC, datetime

    import msgspec

    from services.broker.matching import Ask, Engine
    from services.broker.world import pool_state
    from services.common.messages import Pool
    from services.registry.domain.catalogue import load_catalogue
    from services.registry.domain.topology import default_topology

    (pool_id, spec), *_ = _parse("nebius").pools
    assert all(s.availability == "listed" for _, s in _parse("vast").pools)
    spec = msgspec.structs.replace(spec, region="eu-central")  # a region of the default topology
    now = datetime.now(UTC)
    acc = load_catalogue()[spec.model]
    listed = Pool(pool_id=pool_id, provider="nebius", spec=spec, accelerator=acc, created_at=now, updated_at=now)
    live = Pool(pool_id="agent-1", provider="acme", spec=msgspec.structs.replace(spec, availability="live"),
                accelerator=acc, created_at=now, updated_at=now)
    engine = Engine(default_topology())
    for pool in (listed, live):
        engine.upsert(pool_state(pool, "DE", pool.spec.units))
    said = {a.pool_id: a.availability for o in engine.match(Ask(units=8), limit=5).options for a in o.allocations}
    assert said == {pool_id: "listed", "agent-1": "live"}
