"""Pure rules for pools (services/registry/domain/pools.py): no servers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import msgspec
import pytest

from services.common.auth import Principal
from services.common.errors import Conflict, Forbidden, Unprocessable
from services.common.messages import PoolSpec, Prices
from services.registry.domain.catalogue import load_catalogue
from services.registry.domain.pools import PoolPatch, apply_patch, build_pool, check_owner, owner_for

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
CATALOGUE = load_catalogue()
REGIONS = {"cn-yrd", "us-east"}
ACME = Principal(role="provider", subject="acme")
ADMIN = Principal(role="admin", subject="bootstrap")


def spec(**over: object) -> PoolSpec:
    base = {"region": "cn-yrd", "model": "huawei-ascend-910b", "units": 16,
            "prices": {"on_demand": "1.35", "reserved_month": "700"}}
    return msgspec.convert(base | over, PoolSpec)


def test_build_fills_owner_and_interconnect_from_catalogue() -> None:
    pool = build_pool("p1", spec(), "acme", CATALOGUE, REGIONS, NOW, None)
    assert pool.provider == "acme" and pool.spec.provider == "acme"
    assert pool.spec.interconnect == CATALOGUE["huawei-ascend-910b"].interconnect
    assert pool.accelerator.vendor == "huawei" and pool.generation == 0 and pool.created_at == NOW  # 0: its record's create names it


def test_replace_keeps_creation_and_generation() -> None:
    first = msgspec.structs.replace(build_pool("p1", spec(), "acme", CATALOGUE, REGIONS, NOW, None), generation=7)
    later = NOW + timedelta(hours=1)
    second = build_pool("p1", spec(units=32), "acme", CATALOGUE, REGIONS, later, first)
    assert second.created_at == NOW and second.updated_at == later and second.generation == 7
    with pytest.raises(Forbidden):
        build_pool("p1", spec(), "zeta", CATALOGUE, REGIONS, later, first)
    with pytest.raises(Conflict):
        build_pool("p1", spec(region="us-east"), "acme", CATALOGUE, REGIONS, later, first)


@pytest.mark.parametrize("bad", [
    {"model": "nope"}, {"region": "atlantis"}, {"units": 4, "units_per_node": 8},
    {"prices": {"on_demand": "0"}}, {"prices": {"on_demand": "1", "interruptible": "-1"}},
    {"prices": {"on_demand": "1.0000001"}}, {"prices": {"on_demand": "NaN"}},
    {"prices": {"on_demand": "Infinity"}}, {"prices": {"on_demand": "1000001"}},
])
def test_build_refuses(bad: dict) -> None:
    with pytest.raises(Unprocessable):
        build_pool("p1", spec(**bad), "acme", CATALOGUE, REGIONS, NOW, None)


def test_owner_rules() -> None:
    assert owner_for(ACME, None) == "acme" and owner_for(ACME, "acme") == "acme"
    with pytest.raises(Forbidden):
        owner_for(ACME, "zeta")
    assert owner_for(ADMIN, "zeta") == "zeta"
    with pytest.raises(Unprocessable):
        owner_for(ADMIN, None)
    for role in ("tenant", "ops"):
        with pytest.raises(Forbidden):
            owner_for(Principal(role=role, subject="x"), None)  # type: ignore[arg-type]
    check_owner(ACME, "acme")
    check_owner(ADMIN, "zeta")
    with pytest.raises(Forbidden):
        check_owner(ACME, "zeta")


def test_patch() -> None:
    pool = msgspec.structs.replace(build_pool("p1", spec(), "acme", CATALOGUE, REGIONS, NOW, None), generation=7)
    patched = apply_patch(pool, PoolPatch(units=8, prices=Prices(on_demand=Decimal("2"))), NOW)
    assert patched.spec.units == 8 and patched.spec.prices.on_demand == Decimal("2")
    assert patched.spec.region == pool.spec.region and patched.generation == 7  # a patch is no new generation
    with pytest.raises(Unprocessable):
        apply_patch(pool, PoolPatch(), NOW)
    with pytest.raises(Unprocessable):
        apply_patch(pool, PoolPatch(prices=Prices(on_demand=Decimal("-1"))), NOW)
