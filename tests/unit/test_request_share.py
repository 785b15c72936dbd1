"""``to_ask`` with ``share`` (issue 14): one device, no performance, gang; 422s with the reason."""

from __future__ import annotations

import msgspec
import pytest

from services.broker.domain.requests import ComputeRequest, to_ask
from services.common.errors import Unprocessable
from services.common.messages import Accelerator

CATALOGUE: dict[str, Accelerator] = {}
REGIONS = {"cn-gz": "CN"}


def req(body: dict) -> ComputeRequest:
    return msgspec.json.decode(msgspec.json.encode(body), type=ComputeRequest)


def test_a_share_maps_to_one_unit_with_its_milli_and_memory() -> None:
    ask = to_ask(req({"share": {"milli": 250, "min_memory_gib": 16}}), CATALOGUE, REGIONS)
    assert (ask.units, ask.milli, ask.share_memory_gib, ask.gang) == (1, 250, 16.0, True)
    ask = to_ask(req({"units": 1, "share": {"milli": 999}}), CATALOGUE, REGIONS)
    assert (ask.units, ask.milli, ask.share_memory_gib) == (1, 999, 0.0)


def test_without_a_share_the_ask_is_whole() -> None:
    ask = to_ask(req({"units": 3}), CATALOGUE, REGIONS)
    assert (ask.units, ask.milli, ask.share_memory_gib) == (3, 1000, 0.0)


@pytest.mark.parametrize(("body", "says"), [
    ({"units": 2, "share": {"milli": 250}}, "'units' must be 1 or left out"),
    ({"performance": {"min_tflops": 100}, "share": {"milli": 250}}, "without 'performance'"),
    ({"units": 1, "shape": {"kind": "split"}, "share": {"milli": 250}}, "shape.kind must be 'gang'"),
])
def test_share_rules_are_422s_with_the_reason(body: dict, says: str) -> None:
    with pytest.raises(Unprocessable, match=says):
        to_ask(req(body), CATALOGUE, REGIONS)


@pytest.mark.parametrize("share", [{"milli": 0}, {"milli": 1000}, {"milli": 250, "min_memory_gib": 0},
                                   {"milli": 250, "extra": 1}])
def test_out_of_range_shares_do_not_decode(share: dict) -> None:
    with pytest.raises(msgspec.ValidationError):
        req({"share": share})


def test_a_lease_view_shows_its_share_and_devices() -> None:
    from datetime import UTC, datetime
    from decimal import Decimal

    from services.broker.records import lease_view
    from services.common.messages import LeaseInfo

    now = datetime.now(UTC)
    lease = LeaseInfo(lease_id="l", request_id="r", tenant="t", pool_id="p", provider="acme", region="cn-gz",
                      model="m", units=1, billing="on_demand", unit_price=Decimal(2), granted_at=now,
                      expires_at=now, milli=250, devices=(11,))
    body = msgspec.json.decode(msgspec.json.encode(lease_view(lease)))
    assert (body["milli"], body["devices"]) == (250, [11])
    whole = msgspec.json.decode(msgspec.json.encode(lease_view(msgspec.structs.replace(lease, milli=1000, devices=()))))
    assert (whole["milli"], whole["devices"]) == (1000, [])
