"""The API documentation pages work without internet access: every page references
only this service's own paths, and each file it references is served (docs/api.md)."""

from __future__ import annotations

import re
from urllib.parse import urljoin, urlparse

from litestar.testing import AsyncTestClient

from services.common.settings import Settings

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
