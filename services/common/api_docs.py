"""The API documentation pages (``/schema``, ``/schema/swagger``, ``/schema/redoc``,
``/schema/rapidoc``), served with their scripts and styles from this service.

litestar's pages load Swagger UI, Redoc, RapiDoc, Stoplight Elements, a favicon and
Google fonts from public CDNs: on a network without internet access they stayed blank.
The files come from the ``openapi-ui-bundles`` package (Swagger UI 5, Redoc 2, RapiDoc
9) under ``ASSETS``; Stoplight Elements, which no package ships, is not offered.
"""

from __future__ import annotations

from litestar.openapi.plugins import (
    JsonRenderPlugin,
    OpenAPIRenderPlugin,
    RapidocRenderPlugin,
    RedocRenderPlugin,
    SwaggerRenderPlugin,
    YamlRenderPlugin,
)
from litestar.router import Router
from litestar.static_files import create_static_files_router
from openapi_ui_bundles import rapidoc, redoc, swagger_ui

ASSETS = "/schema/assets"
_FAVICON = f"<link rel='icon' type='image/png' href='{ASSETS}/swagger/favicon-32x32.png'>"


def render_plugins() -> list[OpenAPIRenderPlugin]:
    swagger = f"{ASSETS}/swagger"
    return [
        SwaggerRenderPlugin(js_url=f"{swagger}/swagger-ui-bundle.js", css_url=f"{swagger}/swagger-ui.css",
                            standalone_preset_js_url=f"{swagger}/swagger-ui-standalone-preset.js",
                            path=["/swagger", "/"], favicon=_FAVICON),
        RedocRenderPlugin(js_url=f"{ASSETS}/redoc/redoc.standalone.js", google_fonts=False, favicon=_FAVICON),
        RapidocRenderPlugin(js_url=f"{ASSETS}/rapidoc/rapidoc-min.js", favicon=_FAVICON),
        JsonRenderPlugin(),
        YamlRenderPlugin(),
    ]


def assets_router() -> Router:
    """The UI files, open like the rest of ``/schema`` and left out of the schema."""
    return Router(path=ASSETS, include_in_schema=False, opt={"exclude_from_auth": True}, route_handlers=[
        create_static_files_router(path=f"/{name}", directories=[bundle.static_path], name=f"docs-{name}",
                                   include_in_schema=False, opt={"exclude_from_auth": True})
        for name, bundle in (("swagger", swagger_ui), ("redoc", redoc), ("rapidoc", rapidoc))
    ])
