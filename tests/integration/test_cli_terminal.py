"""``cbroker`` as a person runs it: a real terminal width (``COLUMNS=80``), real registry
and broker processes over HTTP, every bad input a one-line error with its exit code."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from services.common.settings import Settings

from ..helpers import wait_until
from ..procs import module_settings, service_processes
from .conftest import MODEL, REGION, pool_body

CLI = [sys.executable, "-m", "services.cli"]
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class Stack:
    registry: str
    broker: str
    settings: Settings
    provider: str  # API keys
    ops: str
    tenant: str
    data_dir: Path  # holds demo-keys.json, as `cbroker up --demo` writes it

    def key(self, role: str, subject: str = "") -> str:
        r = httpx.post(f"{self.registry}/v1/keys", json={"role": role, "subject": subject},
                       headers={"Authorization": f"Bearer {self.settings.admin_key}"}, timeout=10)
        assert r.status_code == 201, r.text
        return r.json()["key"]

    def pool(self, pool_id: str, **over: object) -> None:
        r = httpx.put(f"{self.registry}/v1/pools/{pool_id}", json=pool_body(**over),
                      headers={"Authorization": f"Bearer {self.provider}"}, timeout=10)
        assert r.status_code in (200, 201), r.text

    def lease(self, lease_id: str) -> dict | None:
        r = httpx.get(f"{self.broker}/v1/leases/{lease_id}", headers={"Authorization": f"Bearer {self.tenant}"},
                      timeout=10)
        return r.json() if r.status_code == 200 else None


@pytest.fixture(scope="module")
def stack(nats_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    logs = tmp_path_factory.mktemp("cli")
    with module_settings(nats_url, redis_url, heartbeat_ttl_s=3600.0, sweep_interval_s=0.5) as settings, \
            service_processes([("registry", settings), ("broker", settings)], logs) as (registry, broker):
        s = Stack(registry.url, broker.url, settings, "", "", "", logs)
        s.provider, s.ops = s.key("provider", "acme"), s.key("ops")
        s.tenant = s.key("tenant", "alpha-labs")
        (logs / "demo-keys.json").write_text(json.dumps({"admin": settings.admin_key, "ops": s.ops, "providers": {},
                                                         "tenants": {"alpha-labs": s.tenant}}))
        for n in range(3):
            s.pool(f"acme-{REGION}-a100-sxm-80gb-pool-{n}", units=64)
        wait_until(lambda: cli(s, "quote", "-n", "1").returncode == 0, 30, what="the broker sees the pools")
        yield s


def run(*args: str, columns: int = 80, timeout: float = 60) -> subprocess.CompletedProcess:
    """The command in a subprocess at a terminal width."""
    env = {**os.environ, "COLUMNS": str(columns)}
    for var in ("CB_KEY", "CB_BROKER_URL", "CB_METER_URL", "CB_REGISTRY_URL", "NATS_URL", "REDIS_URL"):
        env.pop(var, None)
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env)


def cli(s: Stack, *args: str, columns: int = 80) -> subprocess.CompletedProcess:
    """An app command against the stack's broker, as the tenant of the demo keys."""
    return run(*args, "--broker-url", s.broker, "--data-dir", str(s.data_dir), columns=columns)


def place(s: Stack, units: int = 1, ttl: int = 300) -> dict:
    r = httpx.post(f"{s.broker}/v1/requests", json={"units": units, "lease_ttl_s": ttl},
                   headers={"Authorization": f"Bearer {s.tenant}"}, timeout=10)
    assert r.status_code == 201, r.text
    return r.json()["leases"][0]


def assert_fits(text: str, width: int = 80) -> None:
    wide = [line for line in ANSI.sub("", text).splitlines() if len(line) > width]
    assert wide == [], f"lines wider than {width}: {wide}"


def one_line_error(p: subprocess.CompletedProcess, code: int) -> str:
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stdout + p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), p.stderr
    return lines[0]


# --- tables at 80 columns ----------------------------------------------------------------
def test_leases_at_80_columns_show_every_column_whole(stack: Stack) -> None:
    lease = place(stack, units=3)
    out = cli(stack, "leases")
    assert out.returncode == 0, out.stderr
    assert_fits(out.stdout)
    text = ANSI.sub("", out.stdout)
    expires = datetime.fromisoformat(lease["expires_at"]).isoformat(timespec="seconds")
    for value in (lease["lease_id"], lease["pool_id"], lease["region"], lease["model"], lease["billing"],
                  f"{lease['unit_price']} USD/unit-h", expires):
        assert value in text, f"{value!r} not shown whole at 80 columns:\n{text}"
    for header in ("lease", "pool", "region", "model", "units", "billing", "price", "expires"):
        assert re.search(rf"\b{header}\b", text), header
    wide = cli(stack, "leases", columns=200)  # room enough: one row per lease, every value on it
    row = next(line for line in wide.stdout.splitlines() if lease["lease_id"] in line)
    assert lease["pool_id"] in row and lease["model"] in row and expires in row


def test_quote_at_80_columns_shows_every_column_whole(stack: Stack) -> None:
    out = cli(stack, "quote", "-n", "2", "--model", MODEL)
    assert out.returncode == 0, out.stderr
    assert_fits(out.stdout)
    text = ANSI.sub("", out.stdout)
    quoted = json.loads(cli(stack, "quote", "-n", "2", "--model", MODEL, "--json").stdout)
    assert quoted["options"]
    for option in quoted["options"]:
        for value in (option["allocations"][0]["pool_id"], f"{option['unit_hour_price']} USD",
                      str(option["total_cost"])):
            assert value in text, f"{value!r} not shown whole at 80 columns:\n{text}"


# --- --json everywhere, never dropping a flag ------------------------------------------------
def test_json_output_of_quote_request_leases_renew_release(stack: Stack) -> None:
    q = cli(stack, "quote", "-n", "2", "--json")
    assert q.returncode == 0, q.stderr
    assert json.loads(q.stdout)["placeable_now"] is True
    r = cli(stack, "request", "-n", "2", "--json")
    assert r.returncode == 0, r.stderr
    view = json.loads(r.stdout)  # stdout is the JSON document alone; the expiry warning is on stderr
    assert view["state"] == "placed" and view["leases"][0]["units"] == 2
    lease_id = view["leases"][0]["lease_id"]
    listed = json.loads(cli(stack, "leases", "--json").stdout)
    assert lease_id in {x["lease_id"] for x in listed}
    renewed = json.loads(cli(stack, "renew", lease_id, "--json").stdout)
    assert [x["lease_id"] for x in renewed] == [lease_id]
    released = cli(stack, "release", lease_id, "--json")
    assert released.returncode == 0 and json.loads(released.stdout) == {"released": [lease_id]}


def test_json_body_never_drops_other_flags(stack: Stack) -> None:
    line = one_line_error(cli(stack, "request", "-n", "3", "--model", MODEL, "--body", '{"units": 1}'), 2)
    assert "--units" in line and "--model" in line
    ok = cli(stack, "quote", "--body", '{"units": 1}', "--json")  # the body alone is fine
    assert ok.returncode == 0 and json.loads(ok.stdout)["options"], ok.stderr


# --- bad input: one line, a documented code, no traceback ----------------------------------------
@pytest.mark.parametrize(("args", "code", "says"), [
    (("quote", "-n", "-1"), 2, "-1 is not in the range"),
    (("quote", "-n", "0"), 2, "0 is not in the range"),
    (("request", "-n", "0"), 2, "0 is not in the range"),
    (("quote", "--max-price", "abc"), 2, "'abc' is not a price"),
    (("request", "--max-price", "-2"), 2, "is not a price"),
    (("quote", "--duration", "5"), 2, "--duration"),
    (("quote", "--body", "{nope"), 2, "--body"),
    (("quote", "--tenant", "nobody"), 2, "no demo tenant 'nobody'"),
    (("leases", "--tenant", "nobody"), 2, "no demo tenant 'nobody'"),
    (("quote", "-n", "1000000000"), 2, "units"),
    (("release", "lease_doesnotexist"), 1, "404"),
    (("renew", "lease_doesnotexist"), 1, "404"),
    (("status", "req_doesnotexist"), 1, "404"),
    (("cancel", "req_doesnotexist"), 1, "404"),
    (("requests", "--state", "bogus"), 2, "'bogus' is not one of"),
    (("request", "--workload-process", "x", "--workload-json", "{}"), 2, "one workload per request"),
    (("request", "--workload-ssh-key", "/nonexistent/id.pub"), 2, "cannot read /nonexistent/id.pub"),
    (("request", "--workload-json", '{"kind": "teleport"}'), 2, "teleport"),
    (("request", "--workload-process", "python train.py", "--body", '{"units": 1}'), 2, "--workload-process"),
    (("request", "--wait", "soon"), 2, "'soon' is not a valid float range"),
])
def test_bad_input_is_one_line(stack: Stack, args: tuple[str, ...], code: int, says: str) -> None:
    assert says in one_line_error(cli(stack, *args), code)


def test_an_unreachable_service_is_one_line_exit_3(stack: Stack) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = f"http://127.0.0.1:{port}"
    keys = ("--data-dir", str(stack.data_dir))
    for args in (("leases", "--broker-url", dead, *keys), ("quote", "-n", "1", "--broker-url", dead, *keys),
                 ("usage", "--meter-url", dead, *keys), ("events", "--registry-url", dead, "--key", "k")):
        line = one_line_error(run(*args), 3)
        assert "cannot reach" in line and str(port) in line


def test_audit_without_servers_gives_up_in_bounded_time(stack: Stack) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = run("audit", "--nats-url", f"nats://127.0.0.1:{port}", "--redis-url", f"redis://127.0.0.1:{port}",
              "--connect-timeout", "1", timeout=30)
    assert "NATS" in one_line_error(out, 3)


def test_up_on_a_busy_port_is_one_line_exit_5(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = run("up", "--data-dir", str(tmp_path), "--registry-port", str(port))
    line = one_line_error(out, 5)
    assert str(port) in line and "--registry-port" in line


# --- renewals ----------------------------------------------------------------------------------------
def test_request_warns_of_expiry_and_renew_extends(stack: Stack) -> None:
    out = cli(stack, "request", "-n", "1", "--lease-ttl", "120")
    assert out.returncode == 0, out.stderr
    lease_id = re.search(r"lease_\w+", ANSI.sub("", out.stdout)).group(0)
    warning = " ".join(ANSI.sub("", out.stderr).split())
    assert f"lease {lease_id} expires at" in warning and f"cbroker renew {lease_id}" in warning
    before = datetime.fromisoformat(stack.lease(lease_id)["expires_at"])
    wait_until(lambda: (datetime.now(before.tzinfo) - before).total_seconds() > -119, 5, what="a second to pass")
    renewed = cli(stack, "renew", lease_id)
    assert renewed.returncode == 0, renewed.stderr
    after = datetime.fromisoformat(stack.lease(lease_id)["expires_at"])
    assert after > before
    assert after.isoformat(timespec="seconds") in ANSI.sub("", renewed.stdout)


def test_request_keep_alive_renews_until_interrupted(stack: Stack) -> None:
    env = {**os.environ, "COLUMNS": "80"}
    proc = subprocess.Popen([*CLI, "request", "-n", "1", "--lease-ttl", "3", "--keep-alive", "--json",
                             "--broker-url", stack.broker, "--data-dir", str(stack.data_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        lease_id = json.loads(proc.stdout.readline())["leases"][0]["lease_id"]
        wait_until(lambda: sum("renewed" in line for line in err) >= 3, 30, what="three renewals")
        assert stack.lease(lease_id) is not None  # three TTLs of 3 s would have ended it without them
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(15)
    reader.join(5)
    assert proc.returncode == 0, err
    assert any("stopped renewing" in line and lease_id in line for line in err), err
    assert not any("Traceback" in line for line in err)


# --- events: resumption after a drop, history in time order --------------------------------------
class CuttableProxy:
    """A TCP relay to the registry that can drop every connection and hold new ones: a
    network blip, with the registry itself untouched."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open = threading.Event()
        self.open.set()
        self.ready = threading.Event()  # the registry's "ready" event went through: the watch is on
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        self.open.wait()
        upstream = socket.create_connection(("127.0.0.1", self.upstream))
        self.socks += [client, upstream]
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
                if b"event: ready" in data:  # passed on: the command has it (before any cut)
                    self.ready.set()
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut_and_hold(self) -> None:
        self.open.clear()
        self.ready.clear()
        for s in self.socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.socks.clear()

    def release(self) -> None:
        self.open.set()

    def close(self) -> None:
        self.listener.close()
        self.release()


def test_events_follow_resumes_after_the_last_printed_event(stack: Stack) -> None:
    proxy = CuttableProxy(int(stack.registry.rsplit(":", 1)[1]))
    prov = f"p{uuid.uuid4().hex[:8]}"
    pkey = stack.key("provider", prov)
    proc = subprocess.Popen([*CLI, "events", "--follow", "--json", "--registry-url", f"http://127.0.0.1:{proxy.port}",
                             "--key", stack.ops, "--provider", prov, "--since", "all"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()

    def pools() -> list[str]:
        return [json.loads(line)["event"]["pool_id"] for line in lines if line.startswith("{")]

    def register(name: str) -> None:
        r = httpx.put(f"{stack.registry}/v1/pools/{prov}-{name}", json=pool_body(),
                      headers={"Authorization": f"Bearer {pkey}"}, timeout=10)
        assert r.status_code in (200, 201), r.text

    try:
        register("a")
        wait_until(lambda: pools() == [f"{prov}-a"], 30, what="the first event printed")
        proxy.cut_and_hold()  # the connection drops; the command reconnects into a held line
        register("b")  # happens while it is away
        proxy.release()
        register("c")
        wait_until(lambda: f"{prov}-c" in pools(), 30, what="the event after the reconnect")
        assert pools() == [f"{prov}-a", f"{prov}-b", f"{prov}-c"]  # nothing missed, nothing repeated
    finally:
        proc.terminate()
        proc.wait(10)
        proxy.close()
    assert "connection lost" in proc.stderr.read()
    assert all(line.startswith("{") for line in lines)  # stdout is the events alone, one JSON a line


def test_events_follow_from_now_misses_nothing_across_an_early_drop(stack: Stack) -> None:
    """Dropped before it printed anything: it resumes where its stream started, not from
    a new "now" (what happened in between would be lost)."""
    proxy = CuttableProxy(int(stack.registry.rsplit(":", 1)[1]))
    prov = f"p{uuid.uuid4().hex[:8]}"
    pkey = stack.key("provider", prov)
    proc = subprocess.Popen([*CLI, "events", "--follow", "--json", "--registry-url", f"http://127.0.0.1:{proxy.port}",
                             "--key", stack.ops, "--provider", prov],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    try:
        assert proxy.ready.wait(30), "the command never started watching"
        proxy.cut_and_hold()
        for name in ("a", "b"):
            r = httpx.put(f"{stack.registry}/v1/pools/{prov}-{name}", json=pool_body(),
                          headers={"Authorization": f"Bearer {pkey}"}, timeout=10)
            assert r.status_code in (200, 201), r.text
            if name == "a":
                proxy.release()
        try:
            wait_until(lambda: any(f"{prov}-b" in line for line in lines), 30, what="the event after the reconnect")
        except AssertionError:
            proc.terminate()
            raise AssertionError(f"{lines} {proc.stderr.read()}")
        assert [json.loads(line)["event"]["pool_id"] for line in lines] == [f"{prov}-a", f"{prov}-b"]
    finally:
        proc.terminate()
        proc.wait(10)
        proxy.close()


def test_events_history_prints_in_time_order(stack: Stack) -> None:
    prov = f"p{uuid.uuid4().hex[:8]}"
    pkey = stack.key("provider", prov)
    h = {"Authorization": f"Bearer {pkey}"}
    for name in ("a", "b"):
        r = httpx.put(f"{stack.registry}/v1/pools/{prov}-{name}", json=pool_body(units=4, units_per_node=4), headers=h, timeout=10)
        assert r.status_code in (200, 201), r.text
        lease = httpx.post(f"{stack.broker}/v1/requests", json={"units": 1, "placement": {"regions": [REGION]},
                                                                "accelerators": {"models": [MODEL]}},
                           headers={"Authorization": f"Bearer {stack.tenant}"}, timeout=10)
        assert lease.status_code == 201, lease.text
    out = run("events", "--json", "--registry-url", stack.registry, "--key", stack.ops, "--since", "all",
              "--kind", "capacity,alloc")
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    kinds = {e["kind"] for e in events}
    assert kinds == {"capacity", "alloc"}, kinds
    times = [datetime.fromisoformat(e["event"]["at"]) for e in events]
    assert times == sorted(times)


# --- progress while a request waits in the queue ------------------------------------------------
def test_request_wait_shows_the_queue_position_until_placed(stack: Stack) -> None:
    model = "nvidia-t4"
    stack.pool(f"acme-{REGION}-t4-pool", model=model, units=8, units_per_node=8)
    body = {"units": 8, "accelerators": {"models": [model]}}
    auth = {"Authorization": f"Bearer {stack.tenant}"}
    first = wait_until(lambda: (r := httpx.post(f"{stack.broker}/v1/requests", json=body, headers=auth, timeout=10))
                       .status_code == 201 and r.json(), 30, what="the T4 pool taken whole")
    proc = subprocess.Popen([*CLI, "request", "-n", "8", "--model", model, "--wait", "60", "--broker-url", stack.broker,
                             "--data-dir", str(stack.data_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "COLUMNS": "80"})
    err: list[str] = []
    threading.Thread(target=lambda: err.extend(iter(proc.stderr.readline, "")), daemon=True).start()
    try:
        wait_until(lambda: any("queued at position 1" in line for line in err), 30, what="the queue position shown")
        r = httpx.post(f"{stack.broker}/v1/leases/{first['leases'][0]['lease_id']}/release", headers=auth, timeout=10)
        assert r.status_code in (200, 204), r.text
        out = proc.stdout.read()  # the command ends by itself once placed (--wait bounds it)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    text = ANSI.sub("", out)
    assert "placed" in text and f"acme-{REGION}-t4-pool" in text
