"""Rows of the SkyPilot catalogues of the smaller clouds (Hyperstack, Prime Intellect, Spheron,
Shadeform, JarvisLabs; tests/fixtures/catalogues, sources in its README) that the importer
misread: the model's form factor, memory per GPU, vendor words and region spellings."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from services.registry.domain.importers import ImportResult, RowOutcome, parse_skypilot

FIXTURES = Path(__file__).parents[1] / "fixtures" / "catalogues"


def _parse(cloud: str) -> ImportResult:
    return parse_skypilot((FIXTURES / cloud / "vms.csv").read_text("utf-8"), cloud, set(), cloud=cloud)


def _row(result: ImportResult, row: int) -> RowOutcome:
    return next(o for o in result.outcomes if o.row == row)


@pytest.mark.parametrize(("cloud", "row", "model", "per_gpu"), [
    ("hyperstack", 1, "nvidia-a100-pcie-80gb", "1.350000"),
    ("hyperstack", 2, "nvidia-a100-pcie-80gb", "1.400000"),  # "A100-80G-PCIe-NVLink": PCIe cards, bridged
    ("hyperstack", 3, "nvidia-h100-pcie-80gb", "1.950000"),  # "H100-80G-PCIe-NVLink"
    ("hyperstack", 4, "nvidia-h100-sxm-80gb", "2.400000"),
    ("primeintellect", 1, "nvidia-h100-sxm-80gb", "2.990000"),  # SizeInMiB 655360 is the 8 GPUs' total
    ("primeintellect", 2, "nvidia-h100-sxm-80gb", "1.900000"),  # 163840 for 2 GPUs
    ("primeintellect", 4, "nvidia-h200-sxm-141gb", "2.000000"),
    ("spheron", 1, "nvidia-h100-sxm-80gb", "2.912400"),   # Region "Finland 3"
    ("spheron", 2, "nvidia-h100-pcie-80gb", "2.626800"),  # H100_PCIE_BAREMETAL
    ("spheron", 3, "nvidia-rtx-5090", "0.924000"),        # RTX5090_PCIE_BAREMETAL
    ("spheron", 4, "nvidia-l40s", "0.910800"),            # L40S_PCIE_BAREMETAL, raleigh-usa-1
    ("spheron", 5, "nvidia-a100-sxm-80gb", "1.636800"),   # desmoines-usa-1
    ("shadeform", 1, "nvidia-rtx-a6000", "0.570000"),     # kansascity-usa-1
    ("shadeform", 2, "nvidia-a100-sxm-40gb", "1.990000"), # sanjose-usa-2
    ("shadeform", 3, "nvidia-h100-sxm-80gb", "4.290000"), # saltlakecity-usa-1
    ("shadeform", 4, "nvidia-l40", "1.375000"),           # casper-usa-2
    ("jarvislabs", 1, "nvidia-l4", "0.440000"),           # IN2
    ("jarvislabs", 2, "nvidia-rtx-pro-6000", "2.190000"), # IN1
])
def test_rows_register_the_right_model_and_price(cloud: str, row: int, model: str, per_gpu: str) -> None:
    outcome = _row(_parse(cloud), row)
    assert (outcome.status, outcome.model, outcome.on_demand) == ("ready", model, Decimal(per_gpu)), outcome


def test_hyperstack_null_manufacturer_still_reads_gpuinfo() -> None:
    """GpuInfo with JSON's ``null`` inside a Python literal: the memory is read, no warning."""
    result = _parse("hyperstack")
    assert all("GpuInfo" not in o.note for o in result.outcomes), [o.note for o in result.outcomes]


@pytest.mark.parametrize(("cloud", "row", "country", "name"), [
    ("shadeform", 1, "US", "Kansas City"), ("shadeform", 2, "US", "San Jose"),
    ("shadeform", 3, "US", "Salt Lake City"), ("shadeform", 4, "US", "Casper"),
    ("spheron", 1, "FI", "Finland"), ("spheron", 4, "US", "Raleigh"), ("spheron", 5, "US", "Des Moines"),
    ("jarvislabs", 1, "IN", "India"),
])
def test_city_country_codes_are_located(cloud: str, row: int, country: str, name: str) -> None:
    result = _parse(cloud)
    outcome = _row(result, row)
    pool = dict(result.pools)[outcome.pool_id]
    region = result.new_regions[pool.region]
    assert (region.country, region.name) == (country, name)
    assert pool.region != outcome.region  # a location string is never the id


def test_spot_only_rows_are_reported_not_dropped() -> None:
    """Prime Intellect lists DataCrunch's spot instance types as rows with only a SpotPrice."""
    outcome = _row(_parse("primeintellect"), 3)
    assert outcome.status == "rejected" and "Price" in outcome.reason
