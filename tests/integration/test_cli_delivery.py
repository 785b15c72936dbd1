"""The tenant's side of delivery on real registry and broker processes over HTTP: the
typed client's ``wait_ready`` and ``cbroker request --wait`` until a provider (played here
over the provider API) answers ready, then how to reach it; failures and their
replacements as the tenant sees them; ``cbroker status|requests|cancel``."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from services.broker.client import BrokerClient, RequestEnded, WaitTimedOut
from services.common.settings import Settings

from ..helpers import wait_until
from ..procs import module_settings, service_processes
from .conftest import pool_body

CLI = [sys.executable, "-m", "services.cli"]
ANSI = re.compile(r"\x1b\[[0-9;]*m")
PUBKEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleKeyForTheDeliveryTests0000 tester@host"


@dataclass
class Stack:
    registry: str
    broker: str
    settings: Settings
    tenant: str
    data_dir: Path

    def key(self, role: str, subject: str = "") -> str:
        r = httpx.post(f"{self.registry}/v1/keys", json={"role": role, "subject": subject},
                       headers={"Authorization": f"Bearer {self.settings.admin_key}"}, timeout=10)
        assert r.status_code == 201, r.text
        return r.json()["key"]

    def provider(self, delivery: tuple[str, ...] = ("ssh",), model: str = "nvidia-l40s", units: int = 8,
                 pools: int = 1, timeout_s: int = 300, price: str = "2.10") -> Provider:
        """A new provider with its own pools of ``model`` (each test its own model, so that
        requests land on the test's pools)."""
        name = f"p{uuid.uuid4().hex[:8]}"
        p = Provider(name, self.key("provider", name), self.broker)
        for n in range(pools):
            pool_id = f"{name}-{n}"
            r = httpx.put(f"{self.registry}/v1/pools/{pool_id}", timeout=10, headers=p.headers,
                          json=pool_body(model=model, units=units, units_per_node=units, delivery=list(delivery),
                                         provision_timeout_s=timeout_s,
                                         prices={"currency": "USD", "on_demand": price, "reserved_month": "1100",
                                                 "reserved_year": "900", "interruptible": "0.80"}))
            assert r.status_code in (200, 201), r.text
            p.pools.append(pool_id)
        return p

    def client(self) -> BrokerClient:
        return BrokerClient(self.broker, self.tenant, events_url=self.registry)


@dataclass
class Provider:
    """A provider's agent, played over the provider API: answers each provisioning
    assignment once with ``answer(assignment)`` → ("ready", access) or ("failed", reason)."""

    name: str
    key: str
    broker: str
    pools: list[str] = field(default_factory=list)
    answered: dict[str, float] = field(default_factory=dict)  # lease id -> when (monotonic) it was answered

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    @contextlib.contextmanager
    def answering(self, answer: Callable[[dict], tuple[str, object]],
                  gate: threading.Event | None = None) -> Iterator[Provider]:
        """``gate``: answer only once it is set."""
        stop = threading.Event()

        def loop() -> None:
            with httpx.Client(base_url=self.broker, headers=self.headers, timeout=10) as http:
                while not stop.is_set():
                    if gate is not None and not gate.is_set():
                        stop.wait(0.01)
                        continue
                    r = http.get("/v1/assignments", params={"state": "provisioning"})
                    assert r.status_code == 200, r.text
                    body = r.json()
                    for item in body.get("items", []) if isinstance(body, dict) else body:
                        if item["lease_id"] in self.answered:
                            continue
                        verb, detail = answer(item)
                        payload = {"access": detail} if verb == "ready" else {"reason": detail}
                        self.answered[item["lease_id"]] = time.monotonic()
                        done = http.post(f"/v1/leases/{item['lease_id']}/{verb}", json=payload)
                        assert done.status_code == 200, done.text
                    stop.wait(0.05)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join(10)


@pytest.fixture(scope="module")
def stack(nats_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    logs = tmp_path_factory.mktemp("cli-delivery")
    with module_settings(nats_url, redis_url, heartbeat_ttl_s=3600.0, sweep_interval_s=0.5) as settings, \
            service_processes([("registry", settings), ("broker", settings)], logs) as (registry, broker):
        s = Stack(registry.url, broker.url, settings, "", logs)
        s.tenant = s.key("tenant", "alpha-labs")
        (logs / "demo-keys.json").write_text(json.dumps({"admin": settings.admin_key, "providers": {},
                                                         "tenants": {"alpha-labs": s.tenant}}))
        yield s


def cli(s: Stack, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args, "--broker-url", s.broker, "--data-dir", str(s.data_dir)],
                          capture_output=True, text=True, timeout=90, env=_env())


def _env() -> dict[str, str]:
    env = {**os.environ, "COLUMNS": "80"}
    for var in ("CB_KEY", "CB_BROKER_URL", "CB_REGISTRY_URL"):
        env.pop(var, None)
    return env


def ssh_access(item: dict) -> tuple[str, object]:
    return "ready", {"host": f"gpu-3.{item['provider']}.example", "port": 22042, "user": "alpha", "devices": [0, 1]}


def placeable(s: Stack, body: dict) -> dict:
    """Place ``body`` once the broker has heard of the test's pools."""
    auth = {"Authorization": f"Bearer {s.tenant}"}
    return wait_until(lambda: (r := httpx.post(f"{s.broker}/v1/requests", json={**body, "queue": False},
                                               headers=auth, timeout=10)).status_code == 201 and r.json(),
                      30, what="the broker sees the test's pools")


# --- the typed client -------------------------------------------------------------------------------
def test_wait_ready_returns_the_access_once_the_provider_answers(stack: Stack) -> None:
    provider = stack.provider(model="nvidia-l40s")
    placed = placeable(stack, {"units": 2, "accelerators": {"models": ["nvidia-l40s"]},
                               "workload": {"kind": "ssh", "public_keys": [PUBKEY]}})
    [lease] = placed["leases"]
    assert lease["state"] == "provisioning" and lease["delivery"] == "ssh" and lease["access"] is None
    seen: list[str] = []
    looked = threading.Event()  # the provider answers once the client has seen the lease provisioning

    def on_change(v: object) -> None:
        seen.append(",".join(x.state for x in v.leases))
        looked.set()

    with stack.client() as client, provider.answering(ssh_access, gate=looked):
        ready = client.wait_ready(placed["request_id"], timeout=30, on_change=on_change)
        returned = time.monotonic()
    [got] = ready.leases
    assert got.lease_id == lease["lease_id"] and got.state == "ready"
    assert got.access is not None and (got.access.host, got.access.port, got.access.user) == (
        f"gpu-3.{provider.name}.example", 22042, "alpha")
    assert seen[0] == "provisioning" and seen[-1] == "ready"
    assert returned - provider.answered[lease["lease_id"]] < 1.0  # woken by the event, not a poll later


def test_wait_ready_raises_when_the_only_attempt_fails(stack: Stack) -> None:
    provider = stack.provider(model="nvidia-t4")
    placed = placeable(stack, {"units": 1, "accelerators": {"models": ["nvidia-t4"]}, "on_failure": "fail",
                               "workload": {"kind": "ssh", "public_keys": [PUBKEY]}})
    with stack.client() as client, provider.answering(lambda item: ("failed", "disk image missing")):
        with pytest.raises(RequestEnded, match="failed") as caught:
            client.wait_ready(placed["request_id"], timeout=30, replacement_grace_s=1.0)
    assert caught.value.view is not None and caught.value.view.leases == []
    with stack.client() as client, pytest.raises(WaitTimedOut, match="not ready within 0.5 s"):
        other = placeable(stack, {"units": 1, "accelerators": {"models": ["nvidia-t4"]},
                                  "workload": {"kind": "ssh", "public_keys": [PUBKEY]}})
        client.wait_ready(other["request_id"], timeout=0.5)  # nobody answers this one


# --- the command line -----------------------------------------------------------------------------
def test_request_wait_prints_the_ssh_command(stack: Stack, tmp_path: Path) -> None:
    provider = stack.provider(model="amd-mi300x")
    pub = tmp_path / "id_ed25519.pub"
    pub.write_text(PUBKEY + "\n")
    wait_until(lambda: cli(stack, "quote", "--model", "amd-mi300x").returncode == 0, 30, what="the pool seen")
    with provider.answering(ssh_access):
        out = cli(stack, "request", "-n", "2", "--model", "amd-mi300x", "--workload-ssh-key", str(pub),
                  "--wait", "30", "--registry-url", stack.registry)
    assert out.returncode == 0, out.stderr
    text, progress = ANSI.sub("", out.stdout), " ".join(ANSI.sub("", out.stderr).split())
    assert f"  ssh -p 22042 alpha@gpu-3.{provider.name}.example" in text.splitlines(), text  # whole, to copy
    assert f"provisioning on pool {provider.pools[0]} at provider {provider.name}" in progress
    assert f"ready on pool {provider.pools[0]}" in progress
    assert all(len(line) <= 80 for line in text.splitlines()), text


def test_request_wait_json_and_status_show_the_access(stack: Stack) -> None:
    provider = stack.provider(delivery=("process",), model="intel-gaudi3")
    wait_until(lambda: cli(stack, "quote", "--model", "intel-gaudi3").returncode == 0, 30, what="the pool seen")
    access = {"job_id": "4711", "nodes": ["n1.example"], "devices": [0, 1, 2, 3]}
    with provider.answering(lambda item: ("ready", access)):
        out = cli(stack, "request", "-n", "4", "--model", "intel-gaudi3", "--workload-process", "python train.py",
                  "--wait", "--json", "--registry-url", stack.registry)
    assert out.returncode == 0, out.stderr
    view = json.loads(out.stdout)
    assert [x["state"] for x in view["leases"]] == ["ready"] and view["leases"][0]["access"] == access
    status = cli(stack, "status", view["request_id"])
    assert status.returncode == 0, status.stderr
    text = ANSI.sub("", status.stdout)
    assert f"request {view['request_id']}: placed" in text
    assert "job 4711" in text and "nodes n1.example" in text and "devices 0,1,2,3" in text
    assert all(len(line) <= 80 for line in text.splitlines()), text
    listed = json.loads(cli(stack, "requests", "--json").stdout)
    assert view["request_id"] in [r["request_id"] for r in listed]


def test_request_wait_shows_the_failed_attempt_then_its_replacement(stack: Stack, tmp_path: Path) -> None:
    flaky = stack.provider(("process",), model="nvidia-h200-sxm-141gb", price="1.00")  # cheapest: chosen first
    solid = stack.provider(("process",), model="nvidia-h200-sxm-141gb", price="3.00")
    wait_until(lambda: len(json.loads(cli(stack, "quote", "--model", "nvidia-h200-sxm-141gb", "--json").stdout)
                           ["options"]) >= 2, 30, what="both pools seen")
    with flaky.answering(lambda item: ("failed", "image pull timed out")), solid.answering(ssh_access):
        out = cli(stack, "request", "--model", "nvidia-h200-sxm-141gb", "--workload-process", "python serve.py",
                  "--wait", "30", "--registry-url", stack.registry)
    assert out.returncode == 0, out.stderr
    progress = " ".join(ANSI.sub("", out.stderr).split())
    assert (f"provisioning on pool {flaky.pools[0]} at provider {flaky.name}" in progress and
            f"attempt on pool {flaky.pools[0]} at provider {flaky.name} (cn-yrd) failed: image pull timed out"
            in progress), progress
    # the replacement: same request, attempt 2, on the other provider (provisioning, unless that was too quick to see)
    replaced = re.search(rf"attempt 2 lease_\w+ (provisioning|ready) on pool {solid.pools[0]} at provider "
                         rf"{solid.name} \(cn-yrd\) after failed: image pull timed out", progress)
    assert replaced, progress
    assert progress.index("failed: image pull") < replaced.start() <= progress.index(f"ready on pool {solid.pools[0]}")
    text = ANSI.sub("", out.stdout)
    assert f"host gpu-3.{solid.name}.example port 22042 user alpha" in text, text
    request_id = re.search(r"request (req_\w+)", text).group(1)
    status = json.loads(cli(stack, "status", request_id, "--json").stdout)
    assert [(a["pool_id"], a["state"], a.get("charged", True)) for a in status["attempts"]] == [
        (flaky.pools[0], "failed", False), (solid.pools[0], "ready", True)]
    shown = ANSI.sub("", cli(stack, "status", request_id).stdout)
    assert "image pull timed out" in " ".join(shown.split()) and "attempts" in shown
    assert all(len(line) <= 80 for line in shown.splitlines()), shown


def test_request_wait_fails_with_the_reason_and_exit_1(stack: Stack) -> None:
    provider = stack.provider(model="nvidia-a10")
    wait_until(lambda: cli(stack, "quote", "--model", "nvidia-a10").returncode == 0, 30, what="the pool seen")
    with provider.answering(lambda item: ("failed", "no free IP address")):
        out = cli(stack, "request", "--model", "nvidia-a10", "--workload-json",
                  json.dumps({"kind": "ssh", "public_keys": [PUBKEY]}), "--on-failure", "fail", "--wait", "30",
                  "--registry-url", stack.registry)
    assert out.returncode == 1, (out.stdout, out.stderr)
    err = ANSI.sub("", out.stderr)
    progress, last = " ".join(err.split()), err.strip().splitlines()[-1]
    assert "failed: no free IP address" in progress  # the attempt, as it failed
    assert last.startswith("Error: request ") and " failed: " in last and "no free IP address" in last, err


def test_requests_status_cancel_without_delivery(stack: Stack) -> None:
    stack.provider(delivery=(), model="nvidia-h20-96gb", units=4)
    placed = placeable(stack, {"units": 4, "accelerators": {"models": ["nvidia-h20-96gb"]}})
    queued = cli(stack, "request", "-n", "4", "--model", "nvidia-h20-96gb", "--json")
    assert queued.returncode == 0, queued.stderr
    qid = json.loads(queued.stdout)["request_id"]
    assert json.loads(queued.stdout)["state"] == "queued"
    table = cli(stack, "requests")
    assert table.returncode == 0, table.stderr
    text = ANSI.sub("", table.stdout)
    assert qid in text and placed["request_id"] in text and "queued" in text
    assert all(len(line) <= 80 for line in text.splitlines())
    only = json.loads(cli(stack, "requests", "--state", "queued", "--json").stdout)
    assert qid in {r["request_id"] for r in only} and {r["state"] for r in only} == {"queued"}
    cancelled = cli(stack, "cancel", qid)
    assert cancelled.returncode == 0 and f"request {qid}: cancelled" in cancelled.stdout, cancelled.stderr
    shown = cli(stack, "status", qid, "--json")
    assert json.loads(shown.stdout)["state"] == "cancelled"
    auth = {"Authorization": f"Bearer {stack.tenant}"}
    for params, status in (({"state": "bogus"}, 400), ({"limit": 0}, 400), ({"limit": 501}, 400),
                           ({"tenant": "beta-media"}, 404)):  # another tenant's requests do not exist for it
        r = httpx.get(f"{stack.broker}/v1/requests", params=params, headers=auth, timeout=10)
        assert r.status_code == status and "application/problem+json" in r.headers["content-type"], (params, r.text)
    missing = cli(stack, "status", "req_doesnotexist")
    assert missing.returncode == 1 and "404" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
