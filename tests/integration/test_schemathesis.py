"""Schemathesis against every service's own OpenAPI schema, over real HTTP to a real
service process, with valid and invalid inputs: no input may cause a 5xx, and every
response must match the schema (a documented status, its body, its content type). A
bounded number of examples per operation and derandomised generation keep the run
short and repeatable.
"""

from __future__ import annotations

import contextlib
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
import schemathesis
from schemathesis import GenerationMode
from hypothesis import HealthCheck, Phase, given
from hypothesis import strategies as st
from hypothesis import settings as hsettings
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from services.common.auth import KeyLookup
from services.common.keys import Keys
from services.common.nats_conn import ensure_bucket
from services.common.settings import Settings
from services.common.subjects import Subjects

from ..procs import service_processes

EXAMPLES = int(os.environ.get("CB_FUZZ_EXAMPLES", "16"))  # more (and random) for a deeper run by hand
DERANDOMIZE = "CB_FUZZ_EXAMPLES" not in os.environ
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance, content_type_conformance,
          negative_data_rejection]
REPLAY_ONLY = "/v1/events"  # a live stream never ends by design: fuzzed with follow=false (replay, then end)


def fuzz(base_url: str, headers: dict[str, str], only: set[str] | None = None) -> tuple[int, list[str]]:
    """Every operation of the service's schema; returns (operations run, failures)."""
    schema = schemathesis.openapi.from_url(f"{base_url}/schema/openapi.json")
    failures: list[str] = []
    ran = 0
    for result in schema.get_all_operations():
        op = result.ok()
        if only is not None and op.path not in only:
            continue
        ran += 1

        @given(case=st.one_of(op.as_strategy(GenerationMode.POSITIVE), op.as_strategy(GenerationMode.NEGATIVE)))
        @hsettings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=DERANDOMIZE,
                   phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def check(case: schemathesis.Case) -> None:
            if case.path == REPLAY_ONLY:
                case.query = {**(case.query or {}), "follow": "false"}
            response = case.call(base_url=base_url, headers=headers, timeout=15)
            case.validate_response(response, checks=CHECKS)

        try:
            check()
        except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - collect every operation's failure
            failures.append(f"{op.method.upper()} {op.path}: {str(exc)[:1500]}")
    return ran, failures


async def tenant_key(settings: Settings, nc, rds, tenant: str = "fuzz") -> str:  # noqa: ANN001
    subjects = Subjects(settings.prefix)
    kv = await ensure_bucket(nc.jetstream(), subjects.bucket("keys"))
    lookup = KeyLookup(rds, kv, Keys(settings.prefix), None)
    _, key = await lookup.issue("tenant", tenant, "fuzz", datetime.now(UTC))
    return key


@pytest.mark.parametrize("service", ["registry", "broker", "meter"])
async def test_no_5xx_and_responses_match_the_schema(settings: Settings, nc, rds, tmp_path: Path,
                                                     service: str) -> None:
    admin = {"Authorization": f"Bearer {settings.admin_key}"}
    with contextlib.ExitStack() as stack:
        # the broker loads the catalogue from the registry at start
        names = ["registry", "broker"] if service == "broker" else [service]
        svc = stack.enter_context(service_processes([(name, settings) for name in names], tmp_path))[-1]
        ran, failures = fuzz(svc.url, admin)
        if service == "broker":  # admin may not place requests: a tenant key reaches the placement code
            tenant = {"Authorization": f"Bearer {await tenant_key(settings, nc, rds)}"}
            more, tenant_failures = fuzz(svc.url, tenant, {"/v1/requests", "/v1/quotes", "/v1/leases",
                                                           "/v1/requests/{request_id}", "/v1/leases/{lease_id}",
                                                           "/v1/leases/{lease_id}/renew",
                                                           "/v1/leases/{lease_id}/release"})
            ran, failures = ran + more, failures + [f"(tenant) {f}" for f in tenant_failures]
    assert ran >= 5, f"only {ran} operations in the {service} schema"
    assert not failures, f"{len(failures)} operations of {service} failed:\n\n" + "\n\n".join(failures)


async def test_placed_and_queued_answers_match_the_schema(settings: Settings, nc, rds, tmp_path: Path) -> None:
    """The fuzzing above rarely places anything (random bodies find no pool): a real
    201 (placed) and 202 (queued) are checked against the broker's document here."""
    import httpx

    from .conftest import MODEL, REGION, pool_body

    admin = {"Authorization": f"Bearer {settings.admin_key}"}
    with service_processes([("registry", settings), ("broker", settings)], tmp_path) as (registry, broker):
        r = httpx.post(f"{registry.url}/v1/keys", json={"role": "provider", "subject": "acme"}, headers=admin)
        provider = {"Authorization": f"Bearer {r.json()['key']}"}
        assert httpx.put(f"{registry.url}/v1/pools/p1", json=pool_body(units=8), headers=provider).status_code == 201
        tenant = {"Authorization": f"Bearer {await tenant_key(settings, nc, rds)}"}
        operation = schemathesis.openapi.from_url(f"{broker.url}/schema/openapi.json")["/v1/requests"]["POST"]
        body = {"units": 8, "accelerators": {"models": [MODEL]}, "placement": {"regions": [REGION]}}
        seen = set()
        for _ in range(50):  # the broker learns of the pool from its event: retry until placed
            case = operation.Case(body=body)
            response = case.call(base_url=broker.url, headers=tenant, timeout=15)
            assert response.status_code in (201, 202, 409), response.text
            case.validate_response(response, checks=CHECKS)
            seen.add(response.status_code)
            if 201 in seen and 202 in seen:
                break
        assert {201, 202} <= seen, seen
