"""Hostile request bodies against every body endpoint of all three services, over real
HTTP to real service processes: deep nesting gets a 400 naming the limit, and raw
bytes or arbitrary JSON (hypothesis) never get a 5xx. The endpoints are read from each
service's own OpenAPI document, so a new body endpoint is covered without editing this."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from services.common.settings import Settings

from ..procs import module_settings, service_processes
from .test_schemathesis import tenant_key

EXAMPLES = int(os.environ.get("CB_FUZZ_EXAMPLES", "25"))
SERVICES = ("registry", "broker", "meter")


@dataclass
class Services:
    settings: Settings
    urls: dict[str, str]


@pytest.fixture(scope="module")
def services(nats_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    """The three services once for the module (per test, starting them was a third of its
    time): the tests only send bodies the services must refuse or survive."""
    logs = tmp_path_factory.mktemp("hostile")
    with module_settings(nats_url, redis_url) as settings, \
            service_processes([(name, settings) for name in SERVICES], logs) as procs:
        yield Services(settings, {svc.name: svc.url for svc in procs})


def body_endpoints(base_url: str) -> list[tuple[str, str]]:
    """(method, path) of every operation that takes a body, path parameters filled in."""
    doc = httpx.get(f"{base_url}/schema/openapi.json", timeout=10).json()
    out = []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if isinstance(op, dict) and "requestBody" in op:
                out.append((method.upper(), re.sub(r"\{[^}]+\}", "x1", path)))
    return out


def nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


async def test_deep_nesting_is_a_400_on_every_body_endpoint(services: Services, nc, rds) -> None:
    settings, urls = services.settings, services.urls
    keys = [{"Authorization": f"Bearer {settings.admin_key}"},
            {"Authorization": f"Bearer {await tenant_key(settings, nc, rds)}"}]
    with httpx.Client(timeout=15) as http:
        tried = 0
        for name, url in urls.items():
            endpoints = body_endpoints(url)
            assert endpoints, f"{name} documents no body endpoint"
            for method, path in endpoints:
                refused = []
                for headers in keys:
                    for body in (nested(1000), b"[" * 1000 + b"]" * 1000, b"[" * 100_000):
                        r = http.request(method, url + path, content=body,
                                         headers={**headers, "Content-Type": "application/json"})
                        tried += 1
                        assert r.status_code < 500, f"{name} {method} {path}: {r.status_code} {r.text[:300]}"
                        # auth and roles come first; a request that reaches the body is told why
                        if r.status_code == 400:
                            assert r.headers["content-type"].startswith("application/problem+json")
                            refused.append(r.json()["detail"])
                assert any("nests more than" in d for d in refused), f"{name} {method} {path}: {refused}"
        assert tried >= 3 * 2 * 3


def json_values() -> st.SearchStrategy:
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=30)


def raw_bodies() -> st.SearchStrategy[bytes]:
    as_json = json_values().map(lambda v: json.dumps(v).encode())
    deep = st.integers(1, 3000).map(nested)
    return st.one_of(st.binary(max_size=200), as_json, deep,
                     st.text(max_size=200).map(str.encode))


async def test_raw_bodies_never_get_a_server_error(services: Services, nc, rds) -> None:
    settings, urls = services.settings, services.urls
    keys = [{"Authorization": f"Bearer {settings.admin_key}"},
            {"Authorization": f"Bearer {await tenant_key(settings, nc, rds)}"}]
    with httpx.Client(timeout=15) as http:
        targets = [(url, method, path) for url in urls.values() for method, path in body_endpoints(url)]
        failures: list[str] = []

        @given(target=st.sampled_from(targets), body=raw_bodies(), who=st.sampled_from(keys),
               content_type=st.sampled_from(["application/json", "text/plain", "application/msgpack"]))
        @hsettings(max_examples=EXAMPLES * len(targets), deadline=None, database=None, derandomize=True,
                   phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def check(target: tuple[str, str, str], body: bytes, who: dict[str, str], content_type: str) -> None:
            url, method, path = target
            r = http.request(method, url + path, content=body, headers={**who, "Content-Type": content_type})
            if r.status_code >= 500:
                failures.append(f"{method} {path} {body[:80]!r}: {r.status_code} {r.text[:200]}")

        check()
        assert not failures, f"{len(failures)} server errors:\n" + "\n".join(failures[:20])
