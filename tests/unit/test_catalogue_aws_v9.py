"""Rows of SkyPilot's current AWS catalogue (catalogs/v9, read whole for its accelerator
rows; tests/fixtures/catalogues/aws-v9, source in its README) that a whole-file coverage
run turned up: the G7e's "RTX PRO Server 6000" spelling, AWS's fractional L4 shares (G6f,
Gr6f: sharing pools, docs/sharing.md "Listed shares"), FPGA and Inferentia rows, and a P5e
row with neither price."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from services.common.messages import Sharing
from services.registry.domain.importers import ImportResult, RowOutcome, parse_skypilot

FIXTURE = Path(__file__).parents[1] / "fixtures" / "catalogues" / "aws-v9" / "vms.csv"


@pytest.fixture(scope="module")
def result() -> ImportResult:
    return parse_skypilot(FIXTURE.read_text("utf-8"), "aws", set(), cloud="aws")


def _row(result: ImportResult, row: int) -> RowOutcome:
    return next(o for o in result.outcomes if o.row == row)


@pytest.mark.parametrize(("row", "count", "per_gpu"), [(3, 1, "3.36312"), (4, 8, "4.14304")])
def test_rtx_pro_server_6000_is_the_rtx_pro_6000(result: ImportResult, row: int, count: int, per_gpu: str) -> None:
    outcome = _row(result, row)
    assert outcome.status == "ready", outcome.reason
    assert outcome.model == "nvidia-rtx-pro-6000"
    assert outcome.on_demand == Decimal(per_gpu)
    spec = next(spec for pool_id, spec in result.pools if pool_id == outcome.pool_id)
    assert spec.units == count


# AWS G6f / Gr6f sell a fraction of one L4 (1/8, 1/4, 1/2): rows 2 and 10-13
SHARES = [  # row, instance, milli, Price, SpotPrice (per instance-hour, as listed)
    (2, "g6f.large", 125, "0.202", "0.064700"),
    (10, "g6f.2xlarge", 250, "0.475", "0.170800"),
    (11, "g6f.4xlarge", 500, "0.95", "0.427000"),
    (12, "g6f.xlarge", 125, "0.2375", "0.084100"),
    (13, "gr6f.4xlarge", 500, "1.066", "0.371500"),
]


@pytest.mark.parametrize(("row", "instance", "milli", "price", "spot"), SHARES)
def test_a_fraction_of_one_l4_is_a_memory_sharing_pool(result: ImportResult, row: int, instance: str, milli: int,
                                                       price: str, spot: str) -> None:
    outcome = _row(result, row)
    assert outcome.status == "ready", outcome.reason
    assert outcome.offer == instance and outcome.model == "nvidia-l4"
    assert outcome.memory_gib == 24.0  # the card's memory, not the slice's 2861 MiB
    spec = dict(result.pools)[outcome.pool_id]
    assert spec.sharing == Sharing(mode="memory", min_milli=milli, max_milli=milli)  # that size only
    assert (spec.units, spec.units_per_node, spec.availability) == (1, 1, "listed")
    assert f"{milli}/1000 share" in outcome.note


@pytest.mark.parametrize(("row", "instance", "milli", "price", "spot"), SHARES)
def test_a_share_of_the_sold_fraction_costs_what_the_instance_costs(result: ImportResult, row: int, instance: str,
                                                                    milli: int, price: str, spot: str) -> None:
    spec = dict(result.pools)[_row(result, row).pool_id]
    fraction = Decimal(milli) / 1000
    assert spec.prices.on_demand == Decimal(price) / fraction  # per whole GPU-hour
    assert spec.prices.interruptible == Decimal(spot) / fraction
    assert spec.prices.on_demand * fraction == Decimal(price)  # the billing rule: unit price x milli/1000
    assert spec.prices.interruptible * fraction == Decimal(spot)


def test_share_pool_ids_are_the_instances_and_stable(result: ImportResult) -> None:
    ids = [_row(result, row).pool_id for row, *_ in SHARES]
    assert ids == ["aws-us-east-1-use1-az1-g6f-large", "aws-us-east-1-use1-az1-g6f-2xlarge",
                   "aws-us-east-1-use1-az1-g6f-4xlarge", "aws-us-east-1-use1-az1-g6f-xlarge",
                   "aws-us-east-1-use1-az1-gr6f-4xlarge"]
    whole_l4 = _row(result, 9).pool_id  # gr6.4xlarge, a whole L4 in the same zone
    assert whole_l4 not in ids and dict(result.pools)[whole_l4].sharing.mode == "none"
    again = parse_skypilot(FIXTURE.read_text("utf-8"), "aws", set(), cloud="aws")
    assert [(o.pool_id, o.status) for o in again.outcomes] == [(o.pool_id, o.status) for o in result.outcomes]


def test_shares_take_units_per_offer_devices() -> None:
    many = parse_skypilot(FIXTURE.read_text("utf-8"), "aws", set(), cloud="aws", units_per_offer=4)
    spec = dict(many.pools)["aws-us-east-1-use1-az1-g6f-large"]
    assert (spec.units, spec.units_per_node, spec.sharing.min_milli) == (4, 1, 125)
    too_many = parse_skypilot(FIXTURE.read_text("utf-8"), "aws", set(), cloud="aws", units_per_offer=2000)
    refused = next(o for o in too_many.outcomes if o.offer == "g6f.large")
    assert refused.status == "rejected" and "at most 1024 devices" in refused.reason


@pytest.mark.parametrize(("count", "word"), [("1.5", "more than one L4 but not a whole number"),
                                             ("0.0004", "below a thousandth")])
def test_fractions_no_pool_can_sell_are_reported(count: str, word: str) -> None:
    header, row = FIXTURE.read_text("utf-8").splitlines()[:3:2]
    text = "\n".join([header, row.replace("L4,0.125,", f"L4,{count},", 1)]) + "\n"
    outcome = parse_skypilot(text, "aws", set(), cloud="aws").outcomes[0]
    assert outcome.status == "rejected" and word in outcome.reason, outcome


def test_fpga_row_is_reported_as_an_unknown_accelerator(result: ImportResult) -> None:
    outcome = _row(result, 5)
    assert outcome.status == "rejected"
    assert outcome.reason.startswith("unknown accelerator 'Virtex UltraScale (VU9P)'")


def test_neighbouring_gpu_and_inferentia_rows_register(result: ImportResult) -> None:
    assert {_row(result, n).model for n in (1, 6, 9)} == {"nvidia-l40s", "aws-inferentia2", "nvidia-l4"}


def test_p5e_without_any_price_is_reported_and_spot_only_row_is_interruptible(result: ImportResult) -> None:
    assert _row(result, 7).status == "rejected"
    assert "Price" in _row(result, 7).reason
    spot_only = _row(result, 8)
    assert spot_only.status == "ready" and spot_only.model == "nvidia-h200-sxm-141gb"
