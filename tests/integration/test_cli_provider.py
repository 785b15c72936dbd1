"""The provider's commands as a person runs them (``COLUMNS=80``, real registry and broker
processes): ``pool register|drain|undrain|remove``, ``pools``, ``assignments``, ``logs``;
tables that fit, ``--json``, one-line errors with their exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import httpx
import pytest

from ..procs import module_settings, service_processes

CLI = [sys.executable, "-m", "services.cli"]
SPEC = {"region": "cn-gz", "model": "huawei-ascend-910b", "units": 8, "prices": {"on_demand": "1.20"},
        "delivery": ["ssh"]}


@pytest.fixture(scope="module")
def stack(nats_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """One registry and broker for the module (starting them per test was most of its time):
    the tests keep apart by their own provider, tenant and pool ids."""
    tmp_path = tmp_path_factory.mktemp("cli-provider")
    with module_settings(nats_url, redis_url, heartbeat_ttl_s=30.0, sweep_interval_s=0.2) as settings, \
            service_processes([("registry", settings), ("broker", settings)], tmp_path) as (registry, broker):
        admin = {"Authorization": f"Bearer {settings.admin_key}"}

        def key(role: str, subject: str) -> str:
            r = httpx.post(f"{registry.url}/v1/keys", json={"role": role, "subject": subject}, headers=admin)
            assert r.status_code == 201, r.text
            return r.json()["key"]

        yield {"registry": registry.url, "broker": broker.url, "key": key, "tmp": tmp_path}


def run(*args: str, columns: int = 80) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": str(columns)})


def test_pool_commands_pools_and_assignments(stack: dict) -> None:
    provider = f"prov-{uuid.uuid4().hex[:6]}"
    pkey = stack["key"]("provider", provider)
    reg = ["--registry-url", stack["registry"], "--key", pkey]
    pool_id = f"gz-{uuid.uuid4().hex[:6]}"

    out = run("pool", "register", pool_id, "--spec", json.dumps(SPEC), *reg)
    assert out.returncode == 0 and f"pool {pool_id} registered" in out.stdout, out
    spec_file = stack["tmp"] / "spec.json"
    spec_file.write_text(json.dumps({**SPEC, "units": 16}))
    out = run("pool", "register", pool_id, "--spec", f"@{spec_file}", *reg)
    assert out.returncode == 0 and f"pool {pool_id} updated" in out.stdout, out  # idempotent by id

    out = run("pools", *reg)
    assert out.returncode == 0, out
    assert all(len(line) <= 80 for line in out.stdout.splitlines()), out.stdout
    for word in (pool_id, "cn-gz", "huawei-ascend-910b", "16", "online", "ssh", f"pools of {provider}"):
        assert word in out.stdout, (word, out.stdout)
    [mine] = json.loads(run("pools", "--json", *reg).stdout)
    assert (mine["pool_id"], mine["capacity"], mine["status"]) == (pool_id, 16, "online")

    assert run("pool", "drain", pool_id, *reg).stdout == f"draining {pool_id}\n"
    assert json.loads(run("pools", "--json", *reg).stdout)[0]["status"] == "draining"
    assert run("pool", "undrain", pool_id, *reg).returncode == 0
    assert json.loads(run("pools", "--json", *reg).stdout)[0]["status"] == "online"

    # a lease to deliver on it shows in the provider's assignments
    tkey = stack["key"]("tenant", "ten-cli")
    body = {"units": 2, "placement": {"regions": ["cn-gz"]},
            "workload": {"kind": "ssh", "public_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA t@x"]}}
    r = httpx.post(f"{stack['broker']}/v1/requests", json=body, headers={"Authorization": f"Bearer {tkey}"})
    assert r.status_code == 201, r.text
    lease_id = r.json()["leases"][0]["lease_id"]
    brk = ["--broker-url", stack["broker"], "--key", pkey]
    out = run("assignments", *brk)
    assert out.returncode == 0 and all(len(line) <= 80 for line in out.stdout.splitlines()), out
    for word in (lease_id, pool_id, "ten-cli", "provisioning", "ssh"):
        assert word in out.stdout, (word, out.stdout)
    [a] = json.loads(run("assignments", "--json", *brk).stdout)
    assert (a["lease_id"], a["state"], a["workload"]["kind"]) == (lease_id, "provisioning", "ssh")
    assert json.loads(run("assignments", "--json", "--state", "ready", *brk).stdout) == []
    other = stack["key"]("provider", f"other-{uuid.uuid4().hex[:6]}")
    assert json.loads(run("assignments", "--json", "--broker-url", stack["broker"], "--key", other).stdout) == []

    out = run("pool", "remove", pool_id, "--json", *reg)
    assert out.returncode == 0 and json.loads(out.stdout)[0]["removed"] is True, out
    assert json.loads(run("pools", "--json", *reg).stdout) == []


@pytest.mark.parametrize("args, code, says", [
    (("pool", "register", "p1", "--spec", "{bad"), 2, "--spec"),
    (("pool", "register", "p1", "--spec", '{"region": "cn-gz"}'), 2, "--spec"),
    (("pool", "drain", "no-such-pool"), 1, "404"),
    (("logs", "not a lease id!"), 2, "not a lease id"),
    (("logs", "lease_0123456789abcdef"), 5, "no agent config"),
])
def test_bad_input_is_one_line(stack: dict, args: tuple[str, ...], code: int, says: str) -> None:
    pkey = stack["key"]("provider", f"prov-{uuid.uuid4().hex[:6]}")
    out = run(*args, "--registry-url", stack["registry"], "--key", pkey) if args[0] == "pool" else \
        run(*args, "--data-dir", str(stack["tmp"]))
    assert out.returncode == code and says in out.stderr and len(out.stderr.splitlines()) == 1, out


def test_pools_with_a_tenant_key_says_so(stack: dict) -> None:
    tkey = stack["key"]("tenant", "ten-x")
    out = run("pools", "--registry-url", stack["registry"], "--key", tkey)
    assert out.returncode == 2 and "tenant key" in out.stderr and len(out.stderr.splitlines()) == 1, out
