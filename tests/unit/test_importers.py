"""Importers: SkyPilot vms.csv and the Alibaba GPU trace node list, parsed into pool specs."""

from __future__ import annotations

import csv
from collections import Counter
from decimal import Decimal
from pathlib import Path

import msgspec
import pytest

from services.common.ids import is_valid_id
from services.common.messages import PoolSpec
from services.registry.domain.catalogue import load_catalogue
from services.registry.domain.importers import (
    ImportResult, default_price, make_pool_id, parse_alibaba_nodes, parse_skypilot, read_csv_rows, sanitise_id,
)

ALIBABA_NODES = (Path(__file__).parents[1] / "data" / "alibaba-gpu-v2023"
                 / "openb_node_list_gpu_node_excerpt.csv")

HEADER = "InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,Price,Region,GpuInfo,SpotPrice"
ROW_A100 = ("gpu_8x_a100,A100,8.0,124.0,1800.0,10.32,us-east-1,\"{'Gpus': [{'Name': 'A100', 'Manufacturer': "
            "'NVIDIA', 'Count': 8.0, 'MemoryInfo': {'SizeInMiB': 40960}}], 'TotalGpuMemoryInMiB': 40960}\",")
ROW_A6000 = ("gpu_1x_a6000,A6000,1.0,14.0,100.0,0.8,us-east-1,\"{'Gpus': [{'Name': 'A6000', 'Manufacturer': "
             "'NVIDIA', 'Count': 1.0, 'MemoryInfo': {'SizeInMiB': 49152}}], 'TotalGpuMemoryInMiB': 49152}\",")
EXAMPLE = "\n".join([HEADER, ROW_A100, ROW_A6000]) + "\n"


def _csv(*rows: str, header: str = HEADER) -> str:
    return "\n".join([header, *rows]) + "\n"


def _assert_ids_ok(result: ImportResult) -> None:
    ids = [pool_id for pool_id, _ in result.pools]
    assert all(is_valid_id(i) for i in ids), [i for i in ids if not is_valid_id(i)]
    assert len(ids) == len(set(ids))


def _roundtrip(spec: PoolSpec) -> PoolSpec:
    return msgspec.json.decode(msgspec.json.encode(spec), type=PoolSpec)


# --- SkyPilot ----------------------------------------------------------------------------------
def test_skypilot_example_rows() -> None:
    result = parse_skypilot(EXAMPLE, "lambda", {"us-east-1"})
    assert result.errors == [] and not result.unmapped and result.unknown_regions == set()
    assert result.skipped_no_accelerator == 0 and result.rows == 2
    pools = dict(result.pools)
    assert set(pools) == {"lambda-us-east-1-gpu_8x_a100", "lambda-us-east-1-gpu_1x_a6000"}
    a100 = pools["lambda-us-east-1-gpu_8x_a100"]
    assert a100.model == "nvidia-a100-sxm-40gb"
    assert (a100.units, a100.units_per_node) == (8, 8)
    assert a100.region == "us-east-1" and a100.zone == "" and a100.provider == "lambda"
    assert a100.host_arch == "x86_64"
    assert a100.prices.currency == "USD"
    assert a100.prices.on_demand == Decimal("1.29") and a100.prices.on_demand.as_tuple().exponent == -6
    assert a100.prices.interruptible is None
    a6000 = pools["lambda-us-east-1-gpu_1x_a6000"]
    assert a6000.model == "nvidia-rtx-a6000"
    assert (a6000.units, a6000.units_per_node) == (1, 1)
    assert a6000.prices.on_demand == Decimal("0.800000")
    for _, spec in result.pools:
        assert _roundtrip(spec) == spec
    _assert_ids_ok(result)


def test_skypilot_accepts_dict_rows_like_text() -> None:
    rows = list(csv.DictReader(EXAMPLE.splitlines()))
    assert parse_skypilot(rows, "lambda", {"us-east-1"}).pools == parse_skypilot(EXAMPLE, "lambda", {"us-east-1"}).pools


def test_skypilot_units_per_offer_multiplies_units_not_node_size() -> None:
    result = parse_skypilot(EXAMPLE, "lambda", {"us-east-1"}, units_per_offer=4)
    pools = dict(result.pools)
    assert (pools["lambda-us-east-1-gpu_8x_a100"].units, pools["lambda-us-east-1-gpu_8x_a100"].units_per_node) == (32, 8)
    assert pools["lambda-us-east-1-gpu_1x_a6000"].units == 4
    with pytest.raises(ValueError):
        parse_skypilot(EXAMPLE, "lambda", set(), units_per_offer=0)


def test_skypilot_memory_from_gpuinfo_picks_the_variant() -> None:
    row = ("p4de.24xlarge,A100,8,96,1152,40.96,us-east-1,\"{'Gpus': [{'Name': 'A100', 'Manufacturer': 'NVIDIA', "
           "'Count': 8, 'MemoryInfo': {'SizeInMiB': 81920}}], 'TotalGpuMemoryInMiB': 655360}\",")
    (pool_id, spec), = parse_skypilot(_csv(row), "aws", {"us-east-1"}).pools
    assert spec.model == "nvidia-a100-sxm-80gb"
    assert spec.prices.on_demand == Decimal("5.120000")
    assert pool_id == "aws-us-east-1-p4de-24xlarge"


def test_skypilot_spot_zone_and_arch() -> None:
    header = HEADER + ",AvailabilityZone,Arch"
    row = "g5g.xlarge,T4g,1,4,8,0.42,us-west-2,,0.1301,us-west-2a,arm64"
    row2 = "g4dn.xlarge,T4,1,4,16,0.526,us-west-2,,0.2,us-west-2b,x86_64"
    result = parse_skypilot(_csv(row, row2, header=header), "aws", {"us-west-2"})
    assert not result.unmapped  # T4g is the T4 on Graviton hosts
    assert result.pools[0][1].model == "nvidia-t4" and result.pools[0][1].host_arch == "aarch64"
    (pool_id, spec) = result.pools[1]
    assert pool_id == "aws-us-west-2-us-west-2b-g4dn-xlarge"
    assert spec.zone == "us-west-2b" and spec.model == "nvidia-t4"
    assert spec.prices.on_demand == Decimal("0.526000")
    assert spec.prices.interruptible == Decimal("0.200000")
    result = parse_skypilot(_csv(row.replace("T4g", "T4"), header=header), "aws", {"us-west-2"})
    assert result.pools[0][1].host_arch == "aarch64"
    assert result.pools[0][1].prices.interruptible == Decimal("0.130100")


def test_skypilot_rows_without_accelerators_are_skipped_and_counted() -> None:
    rows = _csv(
        "m5.large,,,2,8,0.096,us-east-1,,",
        "c5.xlarge,,0,4,8,0.17,us-east-1,,",
        "x.gpu,A100,0.0,4,8,0.17,us-east-1,,",
        ROW_A100,
    )
    result = parse_skypilot(rows, "lambda", {"us-east-1"})
    assert result.skipped_no_accelerator == 3
    assert [spec.model for _, spec in result.pools] == ["nvidia-a100-sxm-40gb"]
    assert result.errors == [] and not result.unmapped


def test_skypilot_unmapped_names_are_reported() -> None:
    rows = _csv(
        "p2.xlarge,Voodoo5,1,4,61,0.9,us-east-1,\"{'Gpus': [{'Name': 'Voodoo5', 'Manufacturer': '3dfx', 'Count': 1}]}\",",
        "p2.8xlarge,Voodoo5,8,32,488,7.2,us-east-1,,",
        "weird.1,FancyChip,2,4,8,1.0,us-east-1,,",
        ROW_A6000,
    )
    result = parse_skypilot(rows, "aws", {"us-east-1"})
    assert result.unmapped == Counter({"Voodoo5": 2, "FancyChip": 1})
    assert len(result.pools) == 1
    assert [e.split(":")[0] for e in result.errors] == ["row 1", "row 2", "row 3"]  # reported by row


def test_skypilot_bad_rows_are_reported_with_row_numbers() -> None:
    rows = _csv(
        ROW_A100,
        "bad.price,A100,8,96,1152,abc,us-east-1,,",
        "neg.price,A100,8,96,1152,-3,us-east-1,,",
        "no.price,A100,8,96,1152,,us-east-1,,",
        "bad.spot,A100,8,96,1152,10,us-east-1,,cheap",
        "frac.count,T4,1.5,4,16,0.3,us-east-1,,",  # 0.5 would be a share of one T4 (a sharing pool)
        "no.region,T4,1,4,16,0.3,,,",
        ROW_A6000,
    )
    result = parse_skypilot(rows, "lambda", {"us-east-1"})
    # an unreadable SpotPrice only drops the interruptible price; an empty Region is the
    # cloud's region of unknown location, not a rejection
    assert len(result.pools) == 4
    spot_row = next(o for o in result.outcomes if o.row == 5)
    assert spot_row.status == "ready" and spot_row.interruptible is None and "SpotPrice" in spot_row.note
    assert next(o for o in result.outcomes if o.row == 7).note == "location unknown: region lambda-unlocated"
    assert len(result.errors) == 4
    joined = "\n".join(result.errors)
    for row_no, word in [(2, "Price"), (3, "Price"), (4, "Price"), (6, "AcceleratorCount")]:
        assert any(e.startswith(f"row {row_no}:") and word in e for e in result.errors), (row_no, joined)


def test_skypilot_malformed_gpuinfo_falls_back_to_the_name() -> None:
    for info in ('"{\'Gpus\': [{\'Name\'"', '"not a dict"', '"[1, 2, 3]"', '"__import__(\'os\')"', ""):
        row = f"gpu_8x_a100,A100,8.0,124.0,1800.0,10.32,us-east-1,{info},"
        result = parse_skypilot(_csv(row), "lambda", {"us-east-1"})
        assert [s.model for _, s in result.pools] == ["nvidia-a100-sxm-40gb"], info
        assert result.errors == []


def test_skypilot_gpuinfo_name_is_a_fallback() -> None:
    row = ("odd.type,Accel-X,1,4,16,2.0,us-east-1,\"{'Gpus': [{'Name': 'L4', 'Manufacturer': 'NVIDIA', "
           "'Count': 1, 'MemoryInfo': {'SizeInMiB': 23034}}]}\",")
    (_, spec), = parse_skypilot(_csv(row), "gcp", {"us-east-1"}).pools
    assert spec.model == "nvidia-l4"


def test_skypilot_unknown_regions_are_reported_by_row() -> None:
    rows = _csv(ROW_A100, ROW_A100.replace("us-east-1", "mars-north-1"))
    result = parse_skypilot(rows, "lambda", {"us-east-1"})
    assert result.unknown_regions == {"mars-north-1"}
    assert [spec.region for _, spec in result.pools] == ["us-east-1"]
    assert result.errors[0].startswith("row 2:") and "--region-map" in result.errors[0]
    _assert_ids_ok(result)


def test_skypilot_pool_ids_are_deterministic_valid_and_unique() -> None:
    long_type = "Standard_ND96amsr_A100_v4_" + "X" * 80
    rows = _csv(
        ROW_A100,
        ROW_A100.replace("gpu_8x_a100", "p4d.24xlarge"),
        ROW_A100.replace("gpu_8x_a100", "p4d-24xlarge"),  # sanitises to the same id as the row above
        ROW_A100.replace("gpu_8x_a100", long_type),
        ROW_A100.replace("gpu_8x_a100", "gpu_8x_a100").replace("us-east-1", "us-west-1"),
    )
    first = parse_skypilot(rows, "lambda", set())
    assert first.errors == []
    assert len(first.pools) == 5
    _assert_ids_ok(first)
    ids = [pool_id for pool_id, _ in first.pools]
    assert max(len(i) for i in ids) <= 63
    assert "lambda-us-east-1-gpu_8x_a100" in ids and "lambda-us-west-1-gpu_8x_a100" in ids
    collided = [i for i in ids if i.startswith("lambda-us-east-1-p4d-24xlarge")]
    assert len(collided) == 2 and all(i != "lambda-us-east-1-p4d-24xlarge" for i in collided)
    # same input -> same ids; order of rows does not change which raw key gets which id
    assert parse_skypilot(rows, "lambda", set()).pools == first.pools
    lines = rows.strip().splitlines()
    reordered = parse_skypilot("\n".join([lines[0], *reversed(lines[1:])]) + "\n", "lambda", set())
    assert dict(reordered.pools).keys() == dict(first.pools).keys()


def test_skypilot_duplicate_offer_is_reported_once() -> None:
    result = parse_skypilot(_csv(ROW_A100, ROW_A100), "lambda", {"us-east-1"})
    assert len(result.pools) == 1
    assert len(result.errors) == 1 and result.errors[0].startswith("row 2:") and "duplicate" in result.errors[0]


def test_skypilot_rejects_an_invalid_provider() -> None:
    with pytest.raises(ValueError):
        parse_skypilot(EXAMPLE, "Lambda Labs", set())


def test_read_csv_rows_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "vms.csv"
    path.write_text("\ufeff" + EXAMPLE, encoding="utf-8")
    rows = list(read_csv_rows(path))
    assert [r["InstanceType"] for r in rows] == ["gpu_8x_a100", "gpu_1x_a6000"]
    assert parse_skypilot(read_csv_rows(path), "lambda", {"us-east-1"}).pools == \
        parse_skypilot(EXAMPLE, "lambda", {"us-east-1"}).pools


def test_id_helpers() -> None:
    assert sanitise_id("  US East (1)  ") == "us-east-1"
    assert sanitise_id("---") == ""
    long_id = make_pool_id("p", "r" * 100)
    assert len(long_id) <= 63 and is_valid_id(long_id)
    assert long_id != make_pool_id("p", "r" * 101)
    assert make_pool_id("aws", "us-east-1", "", "p4d.24xlarge") == "aws-us-east-1-p4d-24xlarge"


# --- Alibaba GPU trace -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def node_rows() -> list[dict[str, str]]:
    assert ALIBABA_NODES.is_file(), f"test data missing: {ALIBABA_NODES}"
    with open(ALIBABA_NODES, newline="") as f:
        return list(csv.DictReader(f))


def test_alibaba_real_trace_without_assume(node_rows: list[dict[str, str]]) -> None:
    assert len(node_rows) == 38  # every model of the trace: six nodes of each, both A10s
    codes = Counter(r["model"] for r in node_rows if r["model"].startswith("G"))
    assert codes and set(codes) <= {"G1", "G2", "G3"}
    result = parse_alibaba_nodes(read_csv_rows(ALIBABA_NODES), "alibaba", "cn-hangzhou")
    assert result.rows == len(node_rows) and result.errors == []
    assert result.unmapped == codes  # undisclosed codes are reported, never guessed
    assert len(result.pools) + result.skipped_no_accelerator + sum(codes.values()) == len(node_rows)
    disclosed = sum(int(r["gpu"]) for r in node_rows if not r["model"].startswith("G"))
    assert result.units == disclosed
    expected = {"V100M16": "nvidia-v100-sxm2-16gb", "V100M32": "nvidia-v100-sxm2-32gb", "P100": "nvidia-p100-pcie-16gb",
                "T4": "nvidia-t4", "A10": "nvidia-a10"}
    by_sn = {r["sn"]: r for r in node_rows}
    for pool_id, spec in result.pools:
        sn = pool_id.removeprefix("alibaba-cn-hangzhou-")
        assert spec.model == expected[by_sn[sn]["model"]]
        assert spec.units == spec.units_per_node == int(by_sn[sn]["gpu"])
        assert spec.region == "cn-hangzhou" and spec.provider == "alibaba"
        assert spec.prices.on_demand > 0
    _assert_ids_ok(result)


def test_alibaba_real_trace_with_assume(node_rows: list[dict[str, str]]) -> None:
    assume = {"G1": "nvidia-a100-sxm-40gb", "G2": "nvidia-a10", "G3": "nvidia-a100-sxm-80gb"}
    result = parse_alibaba_nodes(read_csv_rows(ALIBABA_NODES), "alibaba", "cn-hangzhou", assume=assume)
    assert not result.unmapped and result.errors == []
    nonzero = [r for r in node_rows if int(r["gpu"]) > 0]
    assert len(result.pools) == len(nonzero) == len(node_rows) - result.skipped_no_accelerator
    assert result.units == sum(int(r["gpu"]) for r in node_rows)
    models = Counter(spec.model for _, spec in result.pools)
    g2 = sum(1 for r in nonzero if r["model"] == "G2")
    assert g2 > 0 and models["nvidia-a10"] == g2 + sum(1 for r in nonzero if r["model"] == "A10")
    _assert_ids_ok(result)
    for _, spec in result.pools[:50]:
        assert _roundtrip(spec) == spec


def test_alibaba_synthetic_rows() -> None:
    text = ("sn,cpu_milli,memory_mib,gpu,model\n"
            "n-1,64000,262144,2,P100\n"
            "n-2,64000,262144,0,T4\n"
            "n-3,64000,262144,two,T4\n"
            "n-4,64000,262144,8,G1\n"
            "n-5,64000,262144,4,v100m32\n"
            ",64000,262144,4,T4\n")
    result = parse_alibaba_nodes(text, "ali", "cn-beijing", prices={"nvidia-p100-pcie-16gb": Decimal("0.5")})
    assert result.skipped_no_accelerator == 1
    assert result.unmapped == Counter({"G1": 1})
    assert [e.split(":")[0] for e in result.errors] == ["row 3", "row 6"]
    pools = dict(result.pools)
    assert pools["ali-cn-beijing-n-1"].prices.on_demand == Decimal("0.500000")
    assert pools["ali-cn-beijing-n-5"].model == "nvidia-v100-sxm2-32gb"
    assert pools["ali-cn-beijing-n-5"].prices.on_demand == Decimal("3.900000")


def test_alibaba_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        parse_alibaba_nodes("sn,gpu,model\n", "ali", "cn-beijing", assume={"G2": "no-such-model"})
    with pytest.raises(ValueError):
        parse_alibaba_nodes("sn,gpu,model\n", "ali", "CN Beijing")


def test_default_prices_are_positive_for_every_model() -> None:
    for acc in load_catalogue().values():
        price = default_price(acc)
        assert price > 0 and -price.as_tuple().exponent <= 6, acc.model
