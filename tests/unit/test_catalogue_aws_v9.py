"""Rows of SkyPilot's current AWS catalogue (catalogs/v9, read whole for its accelerator
rows; tests/fixtures/catalogues/aws-v9, source in its README) that a whole-file coverage
run turned up: the G7e's "RTX PRO Server 6000" spelling, AWS's fractional L4 shares, FPGA
and Inferentia rows, and a P5e row with neither price."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

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


def test_fractional_l4_share_is_reported_not_registered_as_a_whole_card(result: ImportResult) -> None:
    outcome = _row(result, 2)
    assert outcome.status == "rejected"
    assert "fractional AcceleratorCount 0.125" in outcome.reason


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
