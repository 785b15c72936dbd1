"""The ops console: one static page (HTML, JS, CSS; no build step) served by the
registry, plus ``/console/config`` telling the page where the other services are.

The page needs a key (ops or admin); it keeps it in the tab's ``sessionStorage``. It
reads capacity from the registry, spend from the meter (CORS), and follows
``/v1/events`` with an ``EventSource`` (key as ``?key=``). See docs/console.md.
"""

from __future__ import annotations

from pathlib import Path

from litestar import Request, Router, get
from litestar.response import File
from litestar.static_files import create_static_files_router

from services.common.http import PUBLIC
from services.common.settings import Settings

HERE = Path(__file__).parent


def console_router(settings: Settings) -> Router:
    @get("/", opt=PUBLIC, include_in_schema=False, media_type="text/html")
    async def page() -> File:
        return File(HERE / "static" / "index.html", media_type="text/html; charset=utf-8", content_disposition_type="inline")

    @get("/config", opt=PUBLIC, summary="Where the console finds the broker and the meter")
    async def config(request: Request) -> dict[str, str]:
        """URLs as the browser sees them: the host it used for this page, each service's port."""
        host = request.url.hostname or "127.0.0.1"
        scheme = request.url.scheme
        return {"registry_url": f"{scheme}://{request.url.netloc}",
                "broker_url": f"{scheme}://{host}:{settings.broker_port}",
                "meter_url": f"{scheme}://{host}:{settings.meter_port}"}

    static = create_static_files_router(path="/static", directories=[HERE / "static"], opt=PUBLIC, include_in_schema=False,
                                        name="console-static")
    return Router(path="/console", route_handlers=[page, config, static], tags=["console"])
