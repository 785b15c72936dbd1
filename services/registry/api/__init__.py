"""The registry's HTTP endpoints. Each handler takes the ``Registry`` from the app's
state (``registry_of``), as every service's handlers do (docs/decisions.md): litestar's
dependency injection costs a request about 19 µs."""

from __future__ import annotations

from typing import Any

from litestar import Request

from ..service import Registry


def registry_of(request: Request[Any, Any, Any]) -> Registry:
    return request.app.state.registry
