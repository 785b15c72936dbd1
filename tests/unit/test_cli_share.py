"""``cbroker request|quote --share MILLI`` and the Python client's ``share``: what they send
is a share of one device the broker's own schema accepts, and combinations the broker
would refuse are refused before anything is sent. Pure: no servers."""

from __future__ import annotations

from typing import Any

import click
import msgspec
import pytest
from click.testing import CliRunner

from services.broker.client import Share, _body
from services.broker.domain.requests import ComputeRequest
from services.cli.apps import _request_options, request_body, units_text
from services.cli.options import with_options


@click.command()
@with_options(_request_options)
@click.pass_context
def body_of(ctx: click.Context, **kw: Any) -> ComputeRequest:
    return request_body(ctx, kw)


def body(*args: str) -> ComputeRequest:
    return CliRunner().invoke(body_of, list(args), standalone_mode=False, catch_exceptions=False).return_value


def refused(*args: str) -> str:
    r = CliRunner().invoke(body_of, list(args))
    assert r.exit_code == 2, r.output
    return r.output


def test_share_option_sends_a_share_of_one_device() -> None:
    req = body("--share", "250")
    assert req.share == Share(milli=250) and req.units == 1 and req.accelerators.min_memory_gib in (None, 0)
    # with --share, --min-memory is what the share needs, not the device's memory per unit
    req = body("--share", "500", "--min-memory", "20", "--vendor", "huawei")
    assert req.share == Share(milli=500, min_memory_gib=20)
    assert not req.accelerators.min_memory_gib and req.accelerators.vendors == ["huawei"]
    assert body("-n", "1", "--share", "100").share == Share(milli=100)
    assert body("-n", "2").share is None  # whole devices as before


@pytest.mark.parametrize(("args", "says"), [
    (("--share", "0"), "0 is not in the range"),
    (("--share", "1000"), "1000 is not in the range"),
    (("--share", "quarter"), "'quarter' is not a valid integer"),
    (("--share", "250", "-n", "2"), "-n/--units above 1"),
    (("--share", "250", "--tflops", "100"), "--tflops"),
    (("--share", "250", "--split"), "--split"),
    (("--share", "250", "--body", '{"units": 1}'), "--share"),
])
def test_bad_share_options_are_refused_before_sending(args: tuple[str, ...], says: str) -> None:
    assert says in refused(*args)


def test_the_client_accepts_a_share() -> None:
    sent = msgspec.json.decode(_body({"units": 1}, 250))
    assert sent["share"] == {"milli": 250, "min_memory_gib": None} and sent["units"] == 1
    sent = msgspec.json.decode(_body(ComputeRequest(), Share(milli=300, min_memory_gib=8)))
    assert sent["share"] == {"milli": 300, "min_memory_gib": 8}
    assert msgspec.json.decode(_body({"share": {"milli": 200}}))["share"]["milli"] == 200
    with pytest.raises(msgspec.ValidationError):
        _body({}, 1000)  # a whole device is not a share: ask for units
    with pytest.raises(ValueError, match="another share"):
        _body({"share": {"milli": 200}}, 300)
    with pytest.raises(TypeError):
        _body({}, "250")  # type: ignore[arg-type]


def test_tables_show_a_share_next_to_its_units() -> None:
    class Row(msgspec.Struct):
        units: int
        milli: int = 1000

    assert units_text(Row(1, 250)) == "1×250/1000" and units_text(Row(4)) == "4"


def test_event_lines_show_shares_and_sharing_pools() -> None:
    from services.cli.events import describe

    lease = {"tenant": "t1", "lease_id": "l1", "units": 1, "model": "nvidia-l40s", "region": "us-west",
             "pool_id": "p1", "billing": "on_demand", "unit_price": "0.99", "currency": "USD",
             "price_basis": "unit_hour", "milli": 250, "devices": [5]}
    line = describe("alloc", {"type": "lease.granted", "lease": lease})
    assert "1× 250/1000 of nvidia-l40s on us-west/p1 device 5 on_demand" in line
    whole = describe("alloc", {"type": "lease.granted", "lease": {**lease, "milli": 1000, "devices": []}})
    assert "1× nvidia-l40s on us-west/p1 on_demand" in whole
    pool = {"type": "pool.registered", "region": "cn-nx", "provider": "a", "pool_id": "p2", "free": 32,
            "pool": {"spec": {"units": 32, "model": "huawei-ascend-910b", "sharing": {"mode": "memory"}}}}
    assert "32× huawei-ascend-910b shared by memory free 32" in describe("capacity", pool)


def test_assignment_rows_name_a_share_and_its_device() -> None:
    from services.cli.provider import _share

    assert _share({"units": 1, "milli": 250, "devices": [3]}) == "1×250/1000 @3"
    assert _share({"units": 2, "milli": 1000, "devices": [4, 5]}) == "2"  # whole devices: as before
    assert _share({"units": 2}) == "2"  # a broker from before shares


def test_quote_rows_price_a_share_per_hour() -> None:
    from decimal import Decimal

    from services.cli.apps import hour_price

    class Option(msgspec.Struct):
        units: int
        unit_hour_price: Decimal
        currency: str = "USD"
        milli: int = 1000
        share_hour_price: Decimal | None = None

    assert hour_price(Option(1, Decimal("2.00"), milli=250, share_hour_price=Decimal("0.50"))) == "0.50 USD (share)"
    assert hour_price(Option(2, Decimal("2.00"))) == "2.00 USD"
    assert units_text(Option(1, Decimal("2.00"), milli=250)) == "1×250/1000"
