"""The demo world: providers, tenants and pools, loaded through the public API.

Deterministic (same world every time) so that docs and tests can refer to it. The
providers are invented; their accelerators, regions and prices are realistic.
"""

from __future__ import annotations

import asyncio
import json
import logging
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

from .demo_delivery import DELIVERY

log = logging.getLogger("cbroker.demo")

# provider id -> (kind, [(region, model, pool sizes)])
PROVIDERS: dict[str, list[tuple[str, str, tuple[int, ...]]]] = {
    "skyforge": [  # a US/EU GPU cloud
        ("us-east", "nvidia-h100-sxm-80gb", (64, 16)),
        ("us-east", "nvidia-a100-sxm-80gb", (32,)),
        ("us-west", "nvidia-h100-sxm-80gb", (32,)),
        ("us-west", "nvidia-l40s", (16, 8)),
        ("eu-central", "nvidia-a100-sxm-40gb", (32,)),
        ("eu-central", "nvidia-h200-sxm-141gb", (16,)),
    ],
    "pearl-river-sc": [  # a supercomputing centre in the Greater Bay Area
        ("cn-gba", "nvidia-a800-sxm-80gb", (64, 32)),
        ("cn-gba", "nvidia-h800-sxm-80gb", (32,)),
        ("cn-gba", "huawei-ascend-910b", (64,)),
        ("cn-yrd", "nvidia-h20-96gb", (32, 16)),
        ("ap-east", "nvidia-h100-sxm-80gb", (16,)),
    ],
    "ascend-west": [  # a domestic-accelerator operator in the western hubs
        ("cn-gz", "huawei-ascend-910b", (128, 64)),
        ("cn-gz", "huawei-ascend-910c", (32,)),
        ("cn-nmg", "huawei-ascend-910b", (64,)),
        ("cn-nmg", "huawei-ascend-310p", (32,)),
        ("cn-nx", "huawei-ascend-910b", (32,)),
    ],
    "cambria": [  # Cambricon and Kunlunxin capacity
        ("cn-gs", "cambricon-mlu370-x8", (32, 16)),
        ("cn-nx", "cambricon-mlu590", (32,)),
        ("cn-jjj", "kunlunxin-p800", (32, 16)),
        ("cn-cy", "cambricon-mlu590", (16,)),
    ],
    "hygon-dc": [  # Hygon DCU operator
        ("cn-cy", "hygon-dcu-k100", (64, 32)),
        ("cn-jjj", "hygon-dcu-k100", (32,)),
        ("cn-yrd", "hygon-dcu-k100", (16,)),
    ],
    "tidewater": [  # AMD and Intel capacity across Asia and Europe
        ("eu-west", "amd-mi300x", (32, 16)),
        ("ap-southeast", "amd-mi300x", (16,)),
        ("ap-southeast", "nvidia-h100-sxm-80gb", (16,)),
        ("ap-northeast", "amd-mi250x", (32,)),
        ("us-west", "intel-gaudi3", (32,)),
        ("eu-central", "intel-gaudi2", (32,)),
        ("me-central", "nvidia-h100-sxm-80gb", (16,)),
        ("ap-south", "nvidia-l40s", (16,)),
        ("sa-east", "nvidia-a100-sxm-80gb", (16,)),
    ],
}
TENANTS = ("alpha-labs", "beta-media")

# Demo pools that share their devices (docs/sharing.md): (provider, region, model, index of
# the pool in its sizes) -> PoolSpec.sharing. An Ascend pool cut by memory, as vNPU
# templates cut a 910B (a quarter of its AI cores and memory at least), and NVIDIA L40S
# pools time-sliced for inference and notebooks (memory not partitioned).
SHARING: dict[tuple[str, str, str, int], dict[str, Any]] = {
    ("ascend-west", "cn-nx", "huawei-ascend-910b", 0): {"mode": "memory", "min_milli": 250},
    ("skyforge", "us-west", "nvidia-l40s", 1): {"mode": "time_slice", "min_milli": 100},
    ("tidewater", "ap-south", "nvidia-l40s", 0): {"mode": "time_slice", "min_milli": 100},
}

# on-demand USD per unit-hour, before the regional factor
BASE_PRICE = {
    "nvidia-h200-sxm-141gb": "3.80", "nvidia-h100-sxm-80gb": "2.99", "nvidia-h800-sxm-80gb": "2.60",
    "nvidia-h20-96gb": "1.40", "nvidia-a100-sxm-80gb": "1.89", "nvidia-a100-sxm-40gb": "1.49",
    "nvidia-a800-sxm-80gb": "1.70", "nvidia-l40s": "0.99", "amd-mi300x": "2.49", "amd-mi250x": "1.30",
    "intel-gaudi3": "1.99", "intel-gaudi2": "1.05", "huawei-ascend-910b": "1.35", "huawei-ascend-910c": "2.10",
    "huawei-ascend-310p": "0.35", "cambricon-mlu370-x8": "0.60", "cambricon-mlu590": "1.10",
    "kunlunxin-p800": "1.00", "hygon-dcu-k100": "0.80",
}
REGION_FACTOR = {"cn-gz": "0.85", "cn-nmg": "0.85", "cn-nx": "0.85", "cn-gs": "0.85", "cn-cy": "0.9",
                 "us-east": "1.0", "us-west": "1.02", "eu-central": "1.1", "eu-west": "1.08",
                 "ap-southeast": "1.12", "ap-northeast": "1.15", "me-central": "1.2", "ap-south": "0.95",
                 "sa-east": "1.25", "ap-east": "1.18"}


def demo_pools() -> list[tuple[str, str, dict[str, Any]]]:
    """``(provider, pool_id, spec)`` for every demo pool."""
    out = []
    for provider, offers in PROVIDERS.items():
        for region, model, sizes in offers:
            for i, units in enumerate(sizes):
                on_demand = (Decimal(BASE_PRICE[model]) * Decimal(REGION_FACTOR.get(region, "1"))).quantize(
                    Decimal("0.0001"))
                short = model.split("-", 1)[1][:20].rstrip("-")
                sharing = SHARING.get((provider, region, model, i))
                out.append((provider, f"{provider}-{region}-{short}-{i}", {
                    **({"sharing": sharing} if sharing else {}),
                    "region": region, "zone": f"{region}-{'abc'[i % 3]}", "model": model, "units": units,
                    "units_per_node": 8 if units >= 8 else units,
                    "delivery": list(DELIVERY.get(provider, ())),
                    "prices": {
                        "currency": "USD", "on_demand": str(on_demand),
                        "reserved_month": str((on_demand * 730 * Decimal("0.70")).quantize(Decimal("0.01"))),
                        "reserved_year": str((on_demand * 730 * Decimal("0.55")).quantize(Decimal("0.01"))),
                        "interruptible": str((on_demand * Decimal("0.35")).quantize(Decimal("0.0001"))),
                    },
                }))
    return out


async def load_demo(registry_url: str, admin_key: str, keys_path: Path) -> dict[str, Any]:
    """Issue the demo keys and register the demo pools; write the keys file."""
    admin = {"Authorization": f"Bearer {admin_key}"}
    async with httpx.AsyncClient(base_url=registry_url, timeout=30) as client:
        async def issue(role: str, subject: str = "") -> str:
            r = await client.post("/v1/keys", json={"role": role, "subject": subject, "name": "demo"},
                                  headers=admin)
            r.raise_for_status()
            return r.json()["key"]

        keys: dict[str, Any] = {"admin": admin_key, "ops": await issue("ops"),
                                "providers": {p: await issue("provider", p) for p in PROVIDERS},
                                "tenants": {t: await issue("tenant", t) for t in TENANTS}}
        pools = demo_pools()

        async def register(provider: str, pool_id: str, spec: dict[str, Any]) -> None:
            h = {"Authorization": f"Bearer {keys['providers'][provider]}"}
            r = await client.put(f"/v1/pools/{pool_id}", json=spec, headers=h)
            if r.status_code >= 400:
                raise RuntimeError(f"demo pool {pool_id}: {r.status_code} {r.text}")

        await asyncio.gather(*(register(*p) for p in pools))
    keys_path.write_text(json.dumps(keys, indent=2))
    keys_path.chmod(0o600)
    return keys


async def heartbeat_agent(registry_url: str, keys: dict[str, Any], interval: float,
                          stop: asyncio.Event) -> None:
    """Play each demo provider's agent: one batch heartbeat for all its pools."""
    by_provider: dict[str, list[str]] = {}
    for provider, pool_id, _ in demo_pools():
        by_provider.setdefault(provider, []).append(pool_id)
    async with httpx.AsyncClient(base_url=registry_url, timeout=10) as client:
        while not stop.is_set():
            for provider, pool_ids in by_provider.items():
                h = {"Authorization": f"Bearer {keys['providers'][provider]}"}
                try:
                    await client.post("/v1/heartbeats", json={"pools": pool_ids}, headers=h)
                except httpx.HTTPError as exc:  # registry restarting: the supervisor handles it
                    log.debug("demo heartbeat failed: %s", exc)
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except TimeoutError:
                pass


# What the demo tenants run, in turn: (tenant, request body, seconds before releasing it;
# None keeps it to its end). Deterministic, small next to the world's capacity, and
# covering every billing mode so that usage, invoices and statements have something in them.
# Most ask for a workload, so that the providers deliver (services/cli/demo_delivery.py);
# the rest are capacity only, ready at grant.
DEMO_SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDemoKeyOfTheDemoTenantsNotARealKey0000 demo@cbroker"
WORKLOAD: tuple[tuple[str, dict[str, Any], float | None], ...] = (
    ("alpha-labs", {"units": 8, "accelerators": {"models": ["nvidia-h100-sxm-80gb"]}, "shape": {"kind": "gang"},
                    "billing": "reserved_month"}, None),
    ("beta-media", {"units": 4, "billing": "interruptible", "duration_s": 600,
                    "workload": {"kind": "container", "image": "vllm/vllm-openai:latest", "ports": [8000]}}, None),
    ("alpha-labs", {"units": 2, "accelerators": {"min_memory_gib": 80}, "duration_s": 120,
                    "workload": {"kind": "process", "command": ["python", "serve.py", "--port", "8000"]}}, None),
    ("beta-media", {"units": 2, "accelerators": {"min_memory_gib": 48},
                    "placement": {"users_region": "ap-east", "max_latency_ms": 60},
                    "workload": {"kind": "ssh", "public_keys": [DEMO_SSH_KEY]}}, 45.0),
    ("alpha-labs", {"units": 4, "accelerators": {"vendors": ["huawei"]}, "duration_s": 300,
                    "workload": {"kind": "process", "command": ["torchrun", "--nproc-per-node", "4", "train.py"]}},
     90.0),
    ("beta-media", {"units": 2, "accelerators": {"models": ["nvidia-l40s"]}, "duration_s": 180,
                    "workload": {"kind": "ssh", "public_keys": [DEMO_SSH_KEY]}}, None),
    # shares of one device (docs/sharing.md): a notebook on a time-sliced L40S, a small
    # model served from a memory slice of an Ascend 910B
    ("alpha-labs", {"share": {"milli": 250}, "accelerators": {"models": ["nvidia-l40s"]}, "duration_s": 240,
                    "workload": {"kind": "ssh", "public_keys": [DEMO_SSH_KEY]}}, 60.0),
    ("beta-media", {"share": {"milli": 500, "min_memory_gib": 24}, "accelerators": {"vendors": ["huawei"]},
                    "duration_s": 300}, None),
)


async def tenant_agent(broker_url: str, keys: dict[str, Any], interval: float, stop: asyncio.Event,
                       pace: float = 1.0) -> None:
    """Play the demo tenants: place the ``WORKLOAD`` requests one every ``interval * pace``
    seconds (then again, round after round), releasing some early (after their hold time
    ``* pace``), so that the broker has leases to show and the meter usage to bill.
    Reserved terms are placed once."""
    held: list[tuple[float, str, str]] = []  # (release at, tenant, request id)
    loop = asyncio.get_running_loop()
    placed_reserved = False
    async with httpx.AsyncClient(base_url=broker_url, timeout=10) as client:
        step = 0
        while not stop.is_set():
            tenant, body, keep = WORKLOAD[step % len(WORKLOAD)]
            step += 1
            if body.get("billing", "on_demand").startswith("reserved") and placed_reserved:
                continue
            h = {"Authorization": f"Bearer {keys['tenants'][tenant]}"}
            try:
                r = await client.post("/v1/requests", json={**body, "queue": False}, headers=h)
                if r.status_code == 201:
                    placed_reserved |= body.get("billing", "on_demand").startswith("reserved")
                    if keep is not None:
                        held.append((loop.time() + keep * pace, tenant, r.json()["request_id"]))
                else:
                    log.debug("demo request %s: %s %s", body, r.status_code, r.text[:200])
                due = [h_ for h_ in held if h_[0] <= loop.time()]
                for item in due:
                    held.remove(item)
                    _, who, request_id = item
                    await release_request(client, {"Authorization": f"Bearer {keys['tenants'][who]}"}, request_id)
            except httpx.HTTPError as exc:  # broker restarting: the supervisor handles it
                log.debug("demo tenant request failed: %s", exc)
            except Exception:  # never let the demo's workload die quietly
                log.exception("demo tenant workload step failed")
            try:
                await asyncio.wait_for(stop.wait(), interval * pace)
            except TimeoutError:
                pass


async def release_request(client: httpx.AsyncClient, headers: dict[str, str], request_id: str) -> None:
    """Release the request's live leases: after a failover they are not the ones granted first."""
    r = await client.get(f"/v1/requests/{request_id}", headers=headers)
    if r.status_code != 200:
        return
    for lease in r.json().get("leases", []):
        await client.post(f"/v1/leases/{lease['lease_id']}/release", headers=headers)
