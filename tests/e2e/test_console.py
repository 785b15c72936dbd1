"""The ops console in a real headless browser (Debian's chromium, driven by Playwright),
against the three services as real processes on real NATS and Redis: the page loads,
shows the world, and follows it live — a pool registering and a lease being granted
show up without a reload; a released lease's spend appears (the meter, cross-origin)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import httpx
import msgspec
import nats
import pytest
import redis

from services.cli.servers import free_port
from services.cli.supervisor import ServiceProcess
from services.common.keys import Keys
from services.common.messages import LeaseFailed, LeaseInfo, LeaseProvisioning
from services.common.settings import Settings, settings_to_env
from services.common.subjects import Subjects
from tests.helpers import drop_streams

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PRICES = {"currency": "USD", "on_demand": "2.50"}
WORLD = [  # (pool id, region, model, units)
    ("c-yrd-h100", "cn-yrd", "nvidia-h100-sxm-80gb", 16),
    ("c-yrd-910b", "cn-yrd", "huawei-ascend-910b", 32),
    ("c-gz-910b", "cn-gz", "huawei-ascend-910b", 16),
    ("c-gz-a100", "cn-gz", "nvidia-a100-sxm-80gb", 8),
]


@contextlib.contextmanager
def stack(nats_url: str, redis_url: str, log_dir: Path) -> Iterator[tuple[Settings, dict[str, str]]]:
    ports = {"registry": free_port(), "broker": free_port(), "meter": free_port()}
    settings = Settings(nats_url=nats_url, redis_url=redis_url, prefix=f"t{uuid.uuid4().hex[:12]}",
                        admin_key="admin-" + uuid.uuid4().hex, registry_port=ports["registry"],
                        broker_port=ports["broker"], meter_port=ports["meter"], sweep_interval_s=0.5)
    procs = [ServiceProcess(name, port, settings_to_env(settings), log_dir / f"{name}.log")
             for name, port in ports.items()]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.wait_healthy(60)
        yield settings, {p.name: p.url for p in procs}
    finally:
        for p in reversed(procs):
            p.stop()
        asyncio.run(drop_streams(nats_url, settings.prefix))


async def publish_failed_delivery(settings: Settings, pool_id: str, provider: str) -> None:
    """What the broker publishes when a provider answers ``failed`` (as real events on the stream)."""
    now = datetime.now(UTC)
    lease = LeaseInfo(lease_id="l-console", request_id="r-console", tenant="acme-ai", pool_id=pool_id,
                      provider=provider, region="cn-gz", model="nvidia-a100-sxm-80gb", units=1, billing="on_demand",
                      unit_price=Decimal("2.5"), granted_at=now, expires_at=now, delivery="ssh")
    subjects = Subjects(settings.prefix)
    nc = await nats.connect(settings.nats_url)
    try:
        js = nc.jetstream()
        for event in (LeaseProvisioning(id="l-console.1", at=now, lease=lease),
                      LeaseFailed(id="l-console.2", at=now, lease=lease, seq=2, reason="image pull failed")):
            await js.publish(subjects.alloc("cn-gz", "acme-ai"), msgspec.json.encode(event),
                             headers={"Nats-Msg-Id": event.id})
    finally:
        await nc.drain()


def test_console_shows_the_world_live(nats_url: str, redis_url: str, tmp_path: Path) -> None:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: the console test drives Debian's chromium "
                    "(apt-get install -y chromium chromium-driver; .ci/run does this)")
    from playwright.sync_api import expect, sync_playwright

    with stack(nats_url, redis_url, tmp_path) as (settings, urls):
        reg = httpx.Client(base_url=urls["registry"], timeout=15)
        admin = {"Authorization": f"Bearer {settings.admin_key}"}

        def key(role: str, subject: str = "") -> str:
            r = reg.post("/v1/keys", json={"role": role, "subject": subject}, headers=admin)
            assert r.status_code == 201, r.text
            return r.json()["key"]

        ops, provider, tenant = key("ops"), key("provider", "console-cloud"), key("tenant", "acme-ai")
        ph = {"Authorization": f"Bearer {provider}"}
        for pool_id, region, model, units in WORLD:
            r = reg.put(f"/v1/pools/{pool_id}", json={"region": region, "model": model, "units": units,
                                                      "prices": PRICES}, headers=ph)
            assert r.status_code == 201, r.text

        with sync_playwright() as pw:
            browser = pw.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=ARGS)
            try:
                page = browser.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.goto(f"{urls['registry']}/console?key={ops}")
                expect(page.locator("#status")).to_have_attribute("data-state", "live", timeout=20_000)
                assert "key=" not in page.url  # the key left the address bar (kept in sessionStorage)
                page.evaluate("window.__notReloaded = true")

                # the world as registered: one cell per region × model, capacity in each
                cells = page.locator("#heatmap td[data-cell]")
                expect(cells).to_have_count(4, timeout=10_000)
                cell = page.locator('td[data-cell="cn-yrd|huawei-ascend-910b"]')
                expect(cell).to_have_attribute("data-capacity", "32")
                expect(cell).to_have_attribute("data-leased", "0")
                expect(page.locator("#total-capacity")).to_have_text("72")
                expect(page.locator("#events li[data-type='pool.registered']")).to_have_count(4)

                # a pool registers: a new cell and an event, without a reload
                r = reg.put("/v1/pools/c-jjj-mi300x", json={"region": "cn-jjj", "model": "amd-mi300x",
                                                           "units": 8, "prices": PRICES}, headers=ph)
                assert r.status_code == 201, r.text
                expect(page.locator('td[data-cell="cn-jjj|amd-mi300x"]')).to_have_attribute(
                    "data-capacity", "8", timeout=15_000)
                expect(page.locator("#total-capacity")).to_have_text("80")
                expect(page.locator("#events li[data-type='pool.registered']")).to_have_count(5)

                # a lease is granted through the broker: leased units and the event appear
                th = {"Authorization": f"Bearer {tenant}"}
                r = httpx.post(f"{urls['broker']}/v1/requests", headers=th, timeout=15,
                               json={"units": 8, "accelerators": {"models": ["huawei-ascend-910b"]},
                                     "placement": {"regions": ["cn-yrd"]}})
                assert r.status_code == 201, r.text
                lease_id = r.json()["leases"][0]["lease_id"]
                expect(cell).to_have_attribute("data-leased", "8", timeout=15_000)
                expect(page.locator("#total-leased")).to_have_text("8")
                expect(page.locator("#events li[data-type='lease.granted']")).to_have_count(1)
                assert int(page.locator("#util-chart").get_attribute("data-points") or 0) >= 2

                # released: units come back, and the meter's spend for the tenant shows up
                r = httpx.post(f"{urls['broker']}/v1/leases/{lease_id}/release", headers=th, timeout=15)
                assert r.status_code == 200, r.text
                expect(cell).to_have_attribute("data-leased", "0", timeout=15_000)
                expect(page.locator("#spend tr[data-tenant='acme-ai']")).to_have_count(1, timeout=30_000)

                # a provider fails a delivery: the broker's record has it, the reliability panel shows it
                with ThreadPoolExecutor(1) as pool:  # playwright's own loop runs in this thread
                    pool.submit(asyncio.run, publish_failed_delivery(settings, "c-gz-a100", "console-cloud")).result()
                row = page.locator("#reliability tr[data-pool='c-gz-a100']")
                expect(row).to_have_attribute("data-score", f"{9 / 11:.6f}", timeout=20_000)
                expect(row.locator("td").nth(3)).to_have_text("1")

                # a pool that shares its devices: whole vs fragmented free (docs/sharing.md);
                # its per-device state is written here as the reservation scripts would
                expect(page.locator("#shared-note")).to_have_text("no pool shares its devices")
                r = reg.put("/v1/pools/c-gz-l40s", headers=ph, json={
                    "region": "cn-gz", "model": "nvidia-l40s", "units": 4, "units_per_node": 4, "prices": PRICES,
                    "sharing": {"mode": "time_slice", "min_milli": 100}})
                assert r.status_code == 201, r.text
                keys = Keys(settings.prefix)
                with redis.Redis.from_url(redis_url) as rc:
                    rc.hset(keys.pool_devices("cn-gz", "c-gz-l40s"), mapping={0: 1000, 1: 250, 2: 600, 3: 0})
                    rc.hset(keys.pool("cn-gz", "c-gz-l40s"), mapping={"free": 1, "leased": 3})
                shared = page.locator("#shared tr[data-pool='c-gz-l40s'] td")
                expect(shared.nth(5)).to_have_text("0.85 on 2", timeout=15_000)  # the next poll at the latest
                expect(shared.nth(4)).to_have_text("1")
                expect(shared.nth(6)).to_have_text("600 milli")
                expect(page.locator('td[data-cell="cn-gz|nvidia-l40s"] .f')).to_have_text("+0.85 frag")
                expect(page.locator("#total-fragmented")).to_have_text("0.85")
                assert page.evaluate("window.__notReloaded") is True
                assert errors == []
            finally:
                browser.close()
