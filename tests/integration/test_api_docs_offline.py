"""The API documentation pages work without internet access: every page references
only this service's own paths, and each file it references is served (docs/api.md)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urljoin, urlparse

import pytest
from litestar.testing import AsyncTestClient

from services.common.settings import Settings

from ..e2e.test_console import ARGS, CHROMIUM
from ..procs import service_process
from .broker_world import broker_world

PAGES = ["/schema", "/schema/swagger", "/schema/redoc", "/schema/rapidoc"]
REFERENCE = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url\(\s*["']?([^"')]+)|(https?://[^\s"'<>)]+)""")


def references(html: str) -> set[str]:
    return {next(g for g in m.groups() if g) for m in REFERENCE.finditer(html)}


async def check_pages(client: AsyncTestClient) -> None:
    for page in PAGES:
        r = await client.get(page)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), (page, r.status_code)
        refs = references(r.text)
        external = sorted(ref for ref in refs if urlparse(ref).netloc)
        assert not external, f"{page} loads from other hosts: {external}"
        assets = [ref for ref in refs if ref.startswith("/")]
        assert any(a.endswith(".js") for a in assets), f"{page} loads no script: {sorted(refs)}"
        for asset in assets:
            served = await client.get(urljoin(page, asset))  # without a key, like the page itself
            assert served.status_code == 200 and served.content, (page, asset, served.status_code)


async def test_every_services_doc_pages_load_nothing_from_other_hosts(settings: Settings, nc) -> None:
    async with broker_world(settings) as w:
        await check_pages(w.registry)
        await check_pages(w.broker)
    from services.meter.app import create_app as create_meter

    async with AsyncTestClient(app=create_meter(settings)) as meter:
        await check_pages(meter)


def test_the_swagger_page_renders_in_a_browser_cut_off_from_other_hosts(settings: Settings, tmp_path: Path) -> None:
    """Every request to another host is refused, as on a network without internet
    access: the page still lists the service's operations."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing (apt-get install -y chromium; .ci/run does this)")
    from playwright.sync_api import expect, sync_playwright

    with service_process("registry", settings, tmp_path) as registry, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page()
            elsewhere: list[str] = []

            def only_here(route) -> None:  # noqa: ANN001
                if route.request.url.startswith(registry.url):
                    route.continue_()
                else:
                    elsewhere.append(route.request.url)
                    route.abort()

            page.route("**/*", only_here)
            page.goto(f"{registry.url}/schema/swagger")
            expect(page.locator(".opblock-summary-path", has_text="/v1/pools/{pool_id}").first).to_be_visible(
                timeout=20_000)
            assert not elsewhere, elsewhere
        finally:
            browser.close()
