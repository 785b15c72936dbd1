"""The embedded default, as a newcomer runs it: ``cbroker up --demo`` in a process of
its own, starting its own nats-server and redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import nats
import psutil
from nats.js.api import StorageType, StreamConfig

from services.cli.servers import free_port

from ..helpers import wait_until


def _health(url: str) -> dict | None:
    try:
        r = httpx.get(f"{url}/health", timeout=0.5)
        return r.json() if r.status_code == 200 else None
    except httpx.HTTPError:
        return None


def test_up_demo_serves_world_supervises_and_stops(tmp_path: Path) -> None:
    port, broker_port, meter_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "REDIS_URL", "CB_ADMIN_KEY")}
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--demo", "--data-dir", str(tmp_path),
                             "--registry-port", str(port), "--broker-port", str(broker_port),
                             "--meter-port", str(meter_port), "--demo-pace", "0.05"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url, broker = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{broker_port}"
    keys_file = tmp_path / "demo-keys.json"
    try:
        wait_until(lambda: keys_file.exists() and keys_file.stat().st_size > 0, 60, what="demo-keys.json")
        keys = json.loads(keys_file.read_text())
        assert set(keys) == {"admin", "ops", "providers", "tenants"}
        assert len(keys["providers"]) >= 2 and len(keys["tenants"]) >= 2
        ops = {"Authorization": f"Bearer {keys['ops']}"}
        page = httpx.get(f"{url}/v1/pools", params={"limit": 1000}, headers=ops).json()
        pools = page["items"]
        assert page["total"] >= 40 and len(pools) == page["total"]
        assert len({p["provider"] for p in pools}) >= 6
        assert len({p["vendor"] for p in pools}) >= 5
        assert {p["status"] for p in pools} == {"online"}
        # every key in the file works, and a provider key is scoped to its provider
        provider, pkey = next(iter(keys["providers"].items()))
        mine = next(p for p in pools if p["provider"] == provider)
        other = next(p for p in pools if p["provider"] != provider)
        ph = {"Authorization": f"Bearer {pkey}"}
        assert httpx.post(f"{url}/v1/pools/{mine['pool_id']}/heartbeat", headers=ph).status_code == 200
        assert httpx.post(f"{url}/v1/pools/{other['pool_id']}/heartbeat", headers=ph).status_code == 403
        for tkey in keys["tenants"].values():
            assert httpx.get(f"{url}/v1/pools", headers={"Authorization": f"Bearer {tkey}"}).status_code == 200
        assert httpx.get(f"{url}/schema/openapi.json").status_code == 200

        # the smallest request is placeable on the demo world, through the broker and its CLI
        tenant, tkey = next(iter(keys["tenants"].items()))
        th = {"Authorization": f"Bearer {tkey}"}
        r = httpx.post(f"{broker}/v1/requests", json={"units": 1}, headers=th, timeout=10)
        assert r.status_code == 201, r.text
        lease = r.json()["leases"][0]
        cli = [sys.executable, "-m", "services.cli"]
        common = ["--broker-url", broker, "--data-dir", str(tmp_path), "--tenant", tenant]
        out = subprocess.run([*cli, "quote", *common, "-n", "8", "--vendor", "huawei"], capture_output=True,
                             text=True, timeout=30)
        assert out.returncode == 0 and "huawei" not in out.stderr and "ascend" in out.stdout, out
        out = subprocess.run([*cli, "leases", *common], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and lease["lease_id"] in out.stdout, out
        out = subprocess.run([*cli, "release", lease["lease_id"], *common], capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 0 and "released" in out.stdout, out
        out = subprocess.run([*cli, "request", *common, "-n", "100000"], capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 1 and "422" in out.stderr and len(out.stderr.splitlines()) == 1, out  # one line

        # the demo providers deliver: a workload is provisioned, answered ready with access
        # details, and `request --wait` prints how to reach it (us-east: skyforge, which never fails on purpose)
        pub = tmp_path / "id_ed25519.pub"
        pub.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleKeyOfTheEndToEndTest000 e2e@test\n")
        out = subprocess.run([*cli, "request", *common, "-n", "1", "--region", "us-east", "--workload-ssh-key",
                              str(pub), "--wait", "60", "--registry-url", url], capture_output=True, text=True,
                             timeout=90)
        assert out.returncode == 0, out
        assert re.search(r"^  ssh -p \d+ \w+@gpu-\d+\.skyforge\.demo\.invalid$", out.stdout, re.M), out.stdout
        assert "provisioning on pool skyforge-us-east" in out.stderr, out.stderr
        # and the demo tenants' own workloads are delivered too
        wait_until(lambda: any(x["state"] == "ready" and x["delivery"] and x["access"] for t in keys["tenants"].values()
                               for x in httpx.get(f"{broker}/v1/leases", headers={"Authorization": f"Bearer {t}"},
                                                  timeout=10).json()), 60, what="a demo workload delivered")

        # the demo tenants' leases are billed: the reserved term at once, per-second usage
        # when the leases the demo releases early end; `cbroker usage|invoice` print them
        meter = f"http://127.0.0.1:{meter_port}"
        alpha, beta = ({"Authorization": f"Bearer {keys['tenants'][t]}"} for t in ("alpha-labs", "beta-media"))

        def billed(h: dict, billing: str) -> list | None:
            rows = httpx.get(f"{meter}/v1/usage", params={"group_by": "billing"}, headers=h).json()["rows"]
            return [r for r in rows if r["billing"] == billing and float(r["unit_hours"]) + float(r["unit_months"]) > 0
                    and r["entries"] > 0] or None

        [term] = wait_until(lambda: billed(alpha, "reserved_month"), 60, what="alpha-labs' reserved term billed")
        [usage] = wait_until(lambda: billed(beta, "on_demand"), 90, what="beta-media's on-demand usage billed")
        assert term["currency"] == usage["currency"] == "USD"
        period = time.strftime("%Y-%m", time.gmtime())
        invoice = httpx.get(f"{meter}/v1/invoices/{period}", headers=alpha).json()
        assert invoice["status"] == "draft" and float(invoice["totals"]["USD"]) >= float(term["amount"]), invoice
        bill = ["--meter-url", meter, "--data-dir", str(tmp_path)]
        wide = {**os.environ, "COLUMNS": "200"}  # rich tables, not wrapped
        out = subprocess.run([*cli, "usage", *bill, "--tenant", "beta-media", "--group-by", "billing"],
                             capture_output=True, text=True, timeout=30, env=wide)
        assert out.returncode == 0 and "on_demand" in out.stdout, out
        shown = re.search(r"total ([0-9.]+) USD", out.stdout)  # the workload goes on: at least what the API said
        assert shown and float(shown.group(1)) >= float(usage["amount"]), out.stdout
        out = subprocess.run([*cli, "invoice", period, *bill, "--tenant", "alpha-labs"], capture_output=True, text=True,
                             timeout=30, env=wide)
        assert out.returncode == 0 and "reserved_month" in out.stdout and "draft" in out.stdout.lower(), out

        # supervision: a service that dies is restarted
        first = _health(url)
        assert first is not None
        children = psutil.Process(proc.pid).children(recursive=True)
        os.kill(first["pid"], signal.SIGKILL)
        again = wait_until(lambda: (h := _health(url)) and h["pid"] != first["pid"] and h, 30, what="registry restart")
        assert again["status"] == "ok"
        assert httpx.get(f"{url}/v1/pools", headers=ops).json()["total"] == page["total"]
        children = psutil.Process(proc.pid).children(recursive=True)
    finally:
        out = _stop(proc)
    assert proc.returncode == 0, out
    assert "Compute Broker is up" in out and "registry" in out
    assert f"Ops console: {url}/console?key=" in out  # the one URL to open (docs/console.md)
    assert "registry exited" in out and "restarted" in out  # the supervisor says what it did
    leftover = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not leftover, leftover


def _start_up(tmp_path: Path) -> tuple[subprocess.Popen, dict[str, int]]:
    """``cbroker up`` (no demo) on free ports; returns once every service is healthy."""
    ports = {name: free_port() for name in ("nats", "redis", "registry", "broker", "meter")}
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "REDIS_URL", "CB_ADMIN_KEY")}
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--data-dir", str(tmp_path),
                             *(a for name, port in ports.items() for a in (f"--{name}-port", str(port)))],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    key = tmp_path / "admin-key"
    try:
        wait_until(lambda: proc.poll() is not None or (key.exists() and key.stat().st_size > 0), 60,
                   what="cbroker up serving")
    except AssertionError:
        proc.kill()
        raise
    assert proc.poll() is None, proc.communicate()[0]
    return proc, ports


def _alive(p: psutil.Process, name: str | None = None) -> bool:
    """Running, not a zombie (and named ``name``); a process that ends while it is looked
    at is not alive."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE and (name is None or p.name() == name)
    except psutil.NoSuchProcess:
        return False


def _child(up: subprocess.Popen, name: str) -> psutil.Process | None:
    found = [c for c in psutil.Process(up.pid).children() if _alive(c, name)]
    return found[0] if found else None


def _ready(ports: dict[str, int]) -> bool:
    for service in ("registry", "broker", "meter"):
        try:
            if httpx.get(f"http://127.0.0.1:{ports[service]}/ready", timeout=2).status_code != 200:
                return False
        except httpx.HTTPError:
            return False
    return True


def _stop(up: subprocess.Popen) -> str:
    up.send_signal(signal.SIGTERM)
    try:
        out, _ = up.communicate(timeout=40)
    except subprocess.TimeoutExpired:
        up.kill()
        out, _ = up.communicate()
    return out


def _port_free(port: int) -> bool:
    """Nobody listens and a new server could (``SO_REUSEADDR``, as servers bind: the
    closed connections' TIME_WAIT does not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
    return True


async def test_up_restarts_killed_nats_and_redis_servers_on_the_same_port_and_store(tmp_path: Path) -> None:
    up, ports = _start_up(tmp_path)
    url = f"nats://127.0.0.1:{ports['nats']}"
    try:
        nc = await nats.connect(url)
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="UPTEST", subjects=["uptest.>"], storage=StorageType.FILE))
        for i in range(3):
            await js.publish("uptest.x", f"m{i}".encode())
        await nc.close()
        first = _child(up, "nats-server")
        assert first is not None
        first.kill()  # SIGKILL
        await asyncio.to_thread(wait_until, lambda: (c := _child(up, "nats-server")) and c.pid != first.pid, 30,
                                0.1, "nats-server restarted")
        # the same port and the same store: the stream and its messages are back
        nc = await nats.connect(url, max_reconnect_attempts=5)
        try:
            info = await nc.jetstream().stream_info("UPTEST")
            assert info.state.messages == 3
            assert (await nc.jetstream().get_msg("UPTEST", 2)).data == b"m1"
        finally:
            await nc.close()
        # and every service works with it again
        await asyncio.to_thread(wait_until, lambda: _ready(ports), 30, 0.2, "services ready again")
        # redis-server too (it holds live state only: the services rebuild it)
        first = _child(up, "redis-server")
        assert first is not None
        first.kill()
        await asyncio.to_thread(wait_until, lambda: (c := _child(up, "redis-server")) and c.pid != first.pid, 30,
                                0.1, "redis-server restarted")
        await asyncio.to_thread(wait_until, lambda: _ready(ports), 30, 0.2, "services ready after redis")
    finally:
        out = await asyncio.to_thread(_stop, up)
    assert up.returncode == 0, out
    assert "nats-server exited" in out and "nats-server restarted" in out, out
    assert "redis-server exited" in out and "redis-server restarted" in out, out


def test_sigkill_of_up_takes_its_children_with_it(tmp_path: Path) -> None:
    up, ports = _start_up(tmp_path)
    children = psutil.Process(up.pid).children(recursive=True)
    try:
        names = sorted(c.name() for c in children)
        assert "nats-server" in names and "redis-server" in names and len(children) >= 5, names
        up.kill()
        up.wait()

        wait_until(lambda: not any(_alive(c) for c in children), 5,
                   what="every child of the killed cbroker up exited")
        # the kernel frees a listening port a moment after its process is reaped
        wait_until(lambda: all(_port_free(p) for p in ports.values()), 5, what=f"every port free: {ports}")
    finally:
        for c in children:  # what this test started, if the assertion above failed
            with contextlib.suppress(psutil.Error):
                c.kill()
        up.communicate()


def test_up_json_prints_one_line_with_every_url_once_ready(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("nats", "redis", "registry", "broker", "meter")}
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "REDIS_URL", "CB_ADMIN_KEY")}
    up = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--json", "--data-dir", str(tmp_path),
                           *(a for name, port in ports.items() for a in (f"--{name}-port", str(port)))],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(up.stdout, selectors.EVENT_READ)  # type: ignore[arg-type]
            assert sel.select(timeout=60), "no line from cbroker up --json within 60 s"
        first = json.loads(up.stdout.readline())  # type: ignore[union-attr]
        assert set(first["services"]) == {"registry", "broker", "meter"}
        for name, where in first["services"].items():
            assert where["url"] == f"http://127.0.0.1:{ports[name]}"
            assert httpx.get(f"{where['url']}/health").json()["service"] == name  # up when it says so
            assert httpx.get(where["metrics"]).status_code == 200
            assert httpx.get(where["docs"] + "/openapi.json").status_code == 200
        servers = " ".join(first["servers"].values())
        assert f"nats://127.0.0.1:{ports['nats']}" in servers and f":{ports['redis']}" in servers, servers
        assert first["data_dir"] == str(tmp_path.resolve())
        assert Path(first["keys"]).read_text().startswith("cbadmin_")
        assert first["console"] == f"http://127.0.0.1:{ports['registry']}/console"
    finally:
        up.send_signal(signal.SIGTERM)
        rest, err = up.communicate(timeout=40)
    assert up.returncode == 0, err
    assert rest == "", rest  # the one line was all of stdout; the rest went to stderr
    assert "Ctrl-C stops everything" in err
