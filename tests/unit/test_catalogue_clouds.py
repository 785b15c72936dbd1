"""Rows of the SkyPilot catalogues of the smaller clouds (Hyperstack, Prime Intellect, Spheron,
Shadeform, JarvisLabs; tests/fixtures/catalogues, sources in its README) that the importer
misread: the model's form factor, memory per GPU, vendor words and region spellings."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from services.common.messages import Region
from services.registry.domain.cloud_regions import RegionResolver
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
    ("primeintellect", 7, "nvidia-v100-sxm2-16gb", "0.140000"),  # 32768 MiB for 2: the name says 16GB
    ("spheron", 1, "nvidia-h100-sxm-80gb", "2.912400"),   # Region "Finland 3"
    ("spheron", 2, "nvidia-h100-pcie-80gb", "2.626800"),  # H100_PCIE_BAREMETAL
    ("spheron", 3, "nvidia-rtx-5090", "0.924000"),        # RTX5090_PCIE_BAREMETAL
    ("spheron", 4, "nvidia-l40s", "0.910800"),            # L40S_PCIE_BAREMETAL, raleigh-usa-1
    ("spheron", 5, "nvidia-a100-sxm-80gb", "1.636800"),   # desmoines-usa-1
    ("spheron", 8, "nvidia-v100-pcie-32gb", "3.088800"),  # V100_32G_PCIE
    ("spheron", 9, "nvidia-rtx-a6000", "0.468000"),       # A6000_PCIE_LOW_RAM
    ("spheron", 10, "nvidia-rtx-pro-6000", "2.112000"),   # Region TYO4
    ("spheron", 11, "nvidia-a16", "0.673200"),            # Region atl
    ("shadeform", 1, "nvidia-rtx-a6000", "0.570000"),     # kansascity-usa-1
    ("shadeform", 2, "nvidia-a100-sxm-40gb", "1.990000"), # sanjose-usa-2
    ("shadeform", 3, "nvidia-h100-sxm-80gb", "4.290000"), # saltlakecity-usa-1
    ("shadeform", 4, "nvidia-l40", "1.375000"),           # casper-usa-2
    ("jarvislabs", 1, "nvidia-l4", "0.440000"),           # IN2
    ("jarvislabs", 2, "nvidia-rtx-pro-6000", "2.190000"), # IN1
    ("simplepod", 1, "nvidia-rtx-a2000", "0.060000"),     # RTX A2000
    ("simplepod", 2, "nvidia-rtx-3060", "0.070000"),      # Region "North America-CA"
    ("simplepod", 3, "nvidia-rtx-pro-6000", "0.990000"),  # "RTXPRO6000Blackwell"
    ("simplepod", 6, "nvidia-rtx-a2000", "0.060000"),     # 2 GPUs, TotalGpuMemoryInMiB of one
    ("verda", 1, "nvidia-b300-288gb", "6.990000"),
    ("cudo", 7, "nvidia-a800-pcie-80gb", "0.823400"),     # intel-ice-lake-a800-pci
    ("azure", 1, "nvidia-v100-pcie-16gb", "3.458000"),    # NCv3 is V100 PCIe
    ("azure", 2, "nvidia-v100-pcie-16gb", "3.803500"),
    ("azure", 3, "nvidia-v100-sxm2-32gb", "2.754000"),    # ND40rs_v2 has the SXM2 boards
    ("azure", 4, "nvidia-h100-sxm-80gb", "8.193333"),
    ("azure", 5, "nvidia-h100-nvl-94gb", "6.980000"),
    ("azure", 6, "nvidia-a100-pcie-80gb", "4.150000"),
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
    ("jarvislabs", 1, "IN", "India"), ("spheron", 10, "JP", "Tokyo"), ("spheron", 11, "US", "Atlanta"),
    ("simplepod", 2, "CA", "Canada"), ("simplepod", 1, "NO", "Norway"),
])
def test_city_country_codes_are_located(cloud: str, row: int, country: str, name: str) -> None:
    result = _parse(cloud)
    outcome = _row(result, row)
    pool = dict(result.pools)[outcome.pool_id]
    region = result.new_regions[pool.region]
    assert (region.country, region.name) == (country, name)
    assert pool.region != outcome.region  # a location string is never the id


@pytest.mark.parametrize(("cloud", "spot_row", "twin_row", "spot"), [
    ("primeintellect", 3, 5, "0.855000"),  # DataCrunch's 8H100.80S.176V_SPOT, after its twin
    ("spheron", 7, 6, "1.147600"),         # n3-A100x1-spot__CANADA-1
])
def test_spot_only_rows_price_their_on_demand_twin(cloud: str, spot_row: int, twin_row: int, spot: str) -> None:
    """Prime Intellect and Spheron list spot instance types as rows with only a SpotPrice:
    the price is the interruptible price of the same offer's on-demand pool."""
    result = _parse(cloud)
    twin, merged = _row(result, twin_row), _row(result, spot_row)
    assert twin.status == merged.status == "ready" and twin.pool_id == merged.pool_id
    assert twin.interruptible == merged.interruptible == Decimal(spot)
    assert dict(result.pools)[twin.pool_id].prices.interruptible == Decimal(spot)
    assert sum(1 for pool_id, _ in result.pools if pool_id == twin.pool_id) == 1


def test_spot_only_row_without_twin_is_reported() -> None:
    outcome = _row(_parse("primeintellect"), 6)
    assert outcome.status == "rejected" and "spot-only" in outcome.reason and "on-demand" in outcome.reason


@pytest.mark.parametrize(("row", "spot"), [(4, "8.193333"), (5, "6.980000")])
def test_spot_equal_to_on_demand_is_kept(row: int, spot: str) -> None:
    """Azure lists the H100 v5 sizes with SpotPrice = Price; for 12 GPUs the per-GPU price
    rounds below the spot share, which must not read as "spot above on-demand"."""
    outcome = _row(_parse("azure"), row)
    assert outcome.interruptible == Decimal(spot) and "above" not in outcome.note, outcome


def test_row_without_price_is_reported() -> None:
    outcome = _row(_parse("azure"), 7)
    assert outcome.status == "rejected" and "missing Price" in outcome.reason


@pytest.mark.parametrize(("cloud", "code", "country", "name"), [
    ("oci", "uk-cardiff-1", "GB", "Cardiff"), ("oci", "sa-bogota-1", "CO", "Bogota"),
    ("oci", "eu-jovanovac-1", "RS", "Jovanovac"), ("oci", "mx-monterrey-1", "MX", "Monterrey"),
    ("azure", "austriaeast", "AT", "Vienna"), ("azure", "newzealandnorth", "NZ", "Auckland"),
    ("azure", "uaecentral", "AE", "Abu Dhabi"), ("spheron", "london-uk-1", "GB", "London"),
])
def test_provider_regions_the_table_lacked(cloud: str, code: str, country: str, name: str) -> None:
    found = RegionResolver(cloud, set()).locate(code)
    assert not isinstance(found, str) and found.region is not None, found
    assert (found.region.country, found.region.name) == (country, name)


def test_same_name_different_price_are_two_offers_ranked_by_price() -> None:
    """SimplePod lists gpu_4x_rtx4090_128 in Europe-PL twice (two hosts, 1.28 and 1.36): two
    pools; the cheaper keeps the plain id whatever the row order, so re-imports update them."""
    result = _parse("simplepod")
    cheap, dear = _row(result, 4), _row(result, 5)
    assert (cheap.status, dear.status) == ("ready", "ready")
    assert dear.pool_id == cheap.pool_id + "-2" and (cheap.on_demand, dear.on_demand) == (Decimal("0.32"), Decimal("0.34"))
    lines = (FIXTURES / "simplepod" / "vms.csv").read_text("utf-8").splitlines()
    swapped = "\n".join([lines[0], lines[5], lines[4]])
    again = {o.on_demand: o.pool_id for o in parse_skypilot(swapped, "simplepod", set(), cloud="simplepod").outcomes}
    assert again == {cheap.on_demand: cheap.pool_id, dear.on_demand: dear.pool_id}


def test_spot_only_offer_without_on_demand_is_reported() -> None:
    """Verda sells 2B300.60V as spot only: no on-demand price, so no pool (the wire contract
    prices pools on-demand first); the row says why."""
    outcome = _row(_parse("verda"), 2)
    assert outcome.status == "rejected" and "spot-only" in outcome.reason


def test_empty_region_is_reported_and_can_be_mapped() -> None:
    """Seeweb lists GPU plans with no Region: reported by row, and an operator can place
    them with a --region-map entry for the empty code."""
    text = (FIXTURES / "seeweb" / "vms.csv").read_text("utf-8")
    plain = parse_skypilot(text, "seeweb", set(), cloud="seeweb")
    assert [o.status for o in plain.outcomes] == ["rejected", "rejected", "ready"]
    assert all(o.reason == "empty Region" for o in plain.outcomes[:2])
    site = Region(id="seeweb-frosinone", name="Frosinone", country="IT", lat=41.64, lon=13.35)
    mapped = parse_skypilot(text, "seeweb", set(), cloud="seeweb", region_map={"": site})
    assert [o.status for o in mapped.outcomes] == ["ready", "ready", "ready"]
    assert dict(mapped.pools)[mapped.outcomes[0].pool_id].region == "seeweb-frosinone"
