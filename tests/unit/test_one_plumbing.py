"""One way to do the plumbing (issue 16): every service opens, guards and closes its NATS
and Redis connections through ``services.common.startup``, and answers ``/health`` with
``services.common.ready.health_route``. A service that builds its own connection again
(the broker once did, with its own knobs) fails here: the knob belongs in ``startup``."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

import services

SERVICES = ("broker", "meter", "registry")
ROOT = Path(services.__file__).resolve().parent

# what only services.common.startup may call: building a connection, setting up the
# streams every service needs, closing a connection
OWN_PLUMBING = {
    "nats.connect", "nats.aio.client.Client",
    "services.common.nats_conn.connect", "services.common.nats_conn.ensure_streams",
    "services.common.nats_conn.close_quietly",
    "services.common.redis_conn.connect",
    "redis.asyncio.Redis", "redis.asyncio.Redis.from_url", "redis.asyncio.from_url",
    "redis.asyncio.client.Redis", "redis.asyncio.client.Redis.from_url",
    "redis.asyncio.RedisCluster", "redis.asyncio.cluster.RedisCluster",
    "redis.asyncio.cluster.RedisCluster.from_url", "redis.Redis", "redis.Redis.from_url", "redis.from_url",
}


def _imported_names(tree: ast.Module, package: str) -> dict[str, str]:
    """Each local name bound by an import, with the dotted name it stands for."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    names[top] = top
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            for alias in node.names:
                names[alias.asname or alias.name] = f"{base}.{alias.name}"
    return names


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and (inner := _dotted(node.value)):
        return f"{inner}.{node.attr}"
    return None


def own_plumbing(source: str, package: str) -> list[str]:
    """The calls of ``source`` (a module of ``package``) that build, set up or close a
    NATS or Redis connection themselves, as ``line: dotted name``."""
    tree = ast.parse(source)
    names = _imported_names(tree, package)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and (called := _dotted(node.func)):
            head, _, rest = called.partition(".")
            full = names.get(head, head) + (f".{rest}" if rest else "")
            if full in OWN_PLUMBING:
                found.append(f"{node.lineno}: {full}")
    return sorted(found, key=lambda f: int(f.split(":")[0]))


def _modules(service: str) -> list[Path]:
    return sorted((ROOT / service).rglob("*.py"))


@pytest.mark.parametrize("service", SERVICES)
def test_no_service_builds_its_own_connections(service: str) -> None:
    modules = _modules(service)
    assert len(modules) > 5
    offences = {str(path.relative_to(ROOT)): found for path in modules
                if (found := own_plumbing(path.read_text(), f"services.{service}"
                                          + "".join(f".{p}" for p in path.relative_to(ROOT / service).parent.parts)))}
    assert offences == {}


@pytest.mark.parametrize("service", SERVICES)
def test_each_lifespan_opens_guards_and_closes_through_startup(service: str) -> None:
    create_app = importlib.import_module(f"services.{service}.app").create_app
    source = inspect.getsource(inspect.getmodule(create_app))
    tree = ast.parse(source)
    names = _imported_names(tree, f"services.{service}")
    called = {names.get(d, d) for node in ast.walk(tree) if isinstance(node, ast.Call) and (d := _dotted(node.func))}
    assert {"services.common.startup.open_connections", "services.common.startup.guard_requests",
            "services.common.startup.close_connections"} <= called


@pytest.mark.parametrize("service", SERVICES)
def test_health_is_the_common_route(service: str) -> None:
    app = importlib.import_module(f"services.{service}.app").create_app()
    [health] = [h for route in app.routes if route.path == "/health" for h in getattr(route, "route_handlers", [])
                if "GET" in h.http_methods]
    assert health.fn.__module__ == "services.common.ready"
    assert health.opt.get("exclude_from_auth") is True  # a probe carries no key


def test_the_check_catches_each_form() -> None:
    """It can fail: the ways a module could open a connection of its own are all seen,
    including the one the broker's lifespan used."""
    forms = {
        "from services.common.nats_conn import connect\nasync def f(): await connect('u', 'broker', no_echo=True)":
            "services.common.nats_conn.connect",
        "from ..common.redis_conn import connect as redis_connect\ndef f(): redis_connect('u', 64, False, timeout=2)":
            "services.common.redis_conn.connect",
        "from services.common.nats_conn import ensure_streams\nasync def f(js, s): await ensure_streams(js, s)":
            "services.common.nats_conn.ensure_streams",
        "from services.common.nats_conn import close_quietly\nasync def f(nc): await close_quietly(nc)":
            "services.common.nats_conn.close_quietly",
        "import nats\nasync def f(): await nats.connect('u')": "nats.connect",
        "from redis.asyncio import Redis\ndef f(): Redis.from_url('u')": "redis.asyncio.Redis.from_url",
        "import redis.asyncio as aioredis\ndef f(): aioredis.Redis(host='h')": "redis.asyncio.Redis",
        "from redis.asyncio.cluster import RedisCluster as C\ndef f(): C.from_url('u')":
            "redis.asyncio.cluster.RedisCluster.from_url",
    }
    for source, name in forms.items():
        assert own_plumbing(source, "services.broker") == [f"2: {name}"], source
    fine = "from services.common.startup import open_connections\nasync def f(s, j): await open_connections(s, j, 'x')"
    assert own_plumbing(fine, "services.broker") == []
