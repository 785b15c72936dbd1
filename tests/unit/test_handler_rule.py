"""One rule for handing handlers their service (docs/decisions.md): each takes it from the
app's state through a one-line function (``broker_of``, ``meter_of``, ``registry_of``),
never through litestar's dependency injection (about 19 µs a request)."""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize("service", ["broker", "meter", "registry"])
def test_no_handler_is_given_its_service_by_dependency_injection(service: str) -> None:
    app = importlib.import_module(f"services.{service}.app").create_app()
    handlers = [h for route in app.routes for h in getattr(route, "route_handlers", [])]
    assert len(handlers) > 10
    injected = {str(h): sorted(h.resolve_dependencies()) for h in handlers if h.resolve_dependencies()}
    assert injected == {}
