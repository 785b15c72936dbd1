"""agent.toml's pools + what discovery found → what the agent registers: the model, units
and devices each pool sells, the delivery its backend gives; every gap one line naming
the pool."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from services.agent.config import ConfigError, parse
from services.agent.discovery import Catalogue, Inventory, from_static
from services.agent.discovery.model import Device
from services.agent.pools import plan

ROOT = Path(__file__).resolve().parents[2]
MODELS = json.loads((ROOT / "services" / "registry" / "domain" / "accelerators.json").read_text())
CATALOGUE = {m["model"]: m for m in MODELS}
BASE = {"broker_url": "http://b", "registry_url": "http://r", "key": "k"}


def config(*pools: dict):
    return parse({**BASE, "pools": [{"region": "us-east", "prices": {"on_demand": "1.00"}, **p} for p in pools]})


def static(model: str, indices: list[int]) -> Inventory:
    return from_static([{"model": model, "indices": indices}], Catalogue(MODELS))


def test_discovery_fills_in_model_units_and_devices_and_each_pool_keeps_its_own() -> None:
    found = static("nvidia-l4", [0, 1, 2, 3])
    a, b = plan(config({"id": "pa", "devices": [2, 3]}, {"id": "pb"}), found, CATALOGUE)
    assert (a.model, a.devices, a.spec.units, a.vendor) == ("nvidia-l4", (2, 3), 2, "nvidia")
    assert (b.devices, b.spec.units) == ((0, 1), 2)  # what pa does not sell
    assert a.spec.delivery == ("process",) and a.spec.units_per_node == 2  # a small host: not the default 8
    assert a.healthy_units({3}) == 1 and b.healthy_units({3}) == 2


def test_delivery_follows_the_backend_and_slurm_pools_name_their_units() -> None:
    s, k = plan(config({"id": "ps", "backend": "slurm", "model": "nvidia-h100-sxm-80gb", "units": 64,
                        "delivery": ["slurm", "process"]},
                       {"id": "pk", "backend": "kubernetes", "model": "nvidia-l40s", "units": 16}),
                Inventory(), CATALOGUE)
    assert (s.spec.delivery, s.devices, s.spec.units, s.healthy_units(set())) == (("slurm", "process"), (), 64, None)
    assert k.spec.delivery == ("container",)
    wire = msgspec.json.decode(msgspec.json.encode(s.spec))
    assert wire["delivery"] == ["slurm", "process"] and wire["model"] == "nvidia-h100-sxm-80gb"


def test_unhealthy_devices_lower_the_heartbeat_units() -> None:
    found = Inventory(devices=(Device(vendor="nvidia", index=0, name="L4", source="t", model="nvidia-l4"),
                               Device(vendor="nvidia", index=1, name="L4", source="t", model="nvidia-l4",
                                      problems=("ECC errors",))))
    [p] = plan(config({"id": "pa"}), found, CATALOGUE)
    assert p.devices == (0, 1) and p.healthy_units({1}) == 1


@pytest.mark.parametrize("pools, found, says", [
    ([{"id": "pa"}], Inventory(), "pools[0] (pa): model: not given, and discovery found no mapped device"),
    ([{"id": "pa", "model": "nvidia-h100-sxm-80gb"}], Inventory(),
     "pools[0] (pa): devices: discovery found no nvidia-h100-sxm-80gb device"),
    ([{"id": "pa", "model": "no-such-model", "backend": "slurm", "units": 4}], Inventory(),
     "pools[0] (pa): model: unknown model 'no-such-model'"),
    ([{"id": "ps", "backend": "slurm", "model": "nvidia-l4"}], Inventory(),
     "pools[0] (ps): units: give the units this pool sells"),
])
def test_every_gap_is_one_line_naming_the_pool(pools, found, says) -> None:
    with pytest.raises(ConfigError) as e:
        plan(config(*pools), found, CATALOGUE)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_two_models_found_and_none_named() -> None:
    found = Inventory(devices=(*static("nvidia-l4", [0]).devices, *static("nvidia-t4", [1]).devices))
    with pytest.raises(ConfigError, match="discovery found nvidia-l4, nvidia-t4; name the model"):
        plan(config({"id": "pa"}), found, CATALOGUE)


def test_a_sharing_pool_is_registered_with_its_sharing_and_device_memory() -> None:
    [p] = plan(config({"id": "pa", "devices": [4, 5, 6, 7], "sharing": {"mode": "memory", "min_milli": 250}}),
               static("nvidia-l4", [4, 5, 6, 7]), CATALOGUE)
    assert (p.spec.sharing.mode, p.spec.sharing.min_milli, p.devices) == ("memory", 250, (4, 5, 6, 7))
    assert p.memory_mib == int(CATALOGUE["nvidia-l4"]["memory_gib"] * 1024)  # a memory share's limit is milli/1000 of it
    [s] = plan(config({"id": "ps", "backend": "slurm", "model": "huawei-ascend-910b", "units": 16,
                       "sharing": {"mode": "memory", "min_milli": 250}}), Inventory(), CATALOGUE)
    assert s.spec.sharing.mode == "memory"  # Slurm's gres/shard is not vendor-specific


@pytest.mark.parametrize("pool, says", [
    ({"id": "pa", "backend": "process", "model": "huawei-ascend-910b", "devices": [0]},
     "pools[0] (pa): sharing: the process backend enforces shares only on nvidia devices, not huawei ones"),
    ({"id": "pk", "backend": "kubernetes", "model": "amd-mi300x", "units": 8},
     "pools[0] (pk): sharing: the kubernetes backend enforces shares only on nvidia devices, not amd ones"),
    ({"id": "pk", "backend": "kubernetes", "model": "nvidia-l4", "units": 1025},
     "pools[0] (pk): sharing: a sharing pool has at most 1024 devices; this one has 1025"),
])
def test_a_pool_that_cannot_enforce_shares_does_not_offer_them(pool, says) -> None:
    with pytest.raises(ConfigError) as e:
        plan(config({**pool, "sharing": {"mode": "time_slice"}}), Inventory(), CATALOGUE)
    assert says in str(e.value) and "\n" not in str(e.value), str(e.value)
    plan(config(pool), Inventory(), CATALOGUE)  # the same pool selling whole devices is fine
