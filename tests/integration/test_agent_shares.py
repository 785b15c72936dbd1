"""The agent's fulfilment of shares: a lease on a sharing pool names its devices (indices in
the pool) and its milli, and the agent runs its command on exactly those devices with the
share's limits — never on devices it picks itself. The process backend runs real commands
as real users (root, like the agent); the broker side is a small HTTP server speaking
``GET /v1/assignments`` and the lease answers as the broker does, because the broker's
Redis placement of shares is not on this branch (the agent only reads what the broker
lists, so what it does with a listed lease is what is tested here)."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import msgspec
import pytest

from services.agent.agent import Agent
from services.agent.api import AgentApi
from services.agent.backends.process import ProcessBackend, ProcessSettings
from services.agent.pools import PoolPlan
from services.common.delivery import ProcessWorkload
from services.common.messages import PoolSpec, Prices, Sharing

from ..helpers import eventually
from ..workload_users import ensure_users, open_dir

USERS = ("cbroker-w0", "cbroker-w1", "cbroker-w2", "cbroker-w3")


class Broker(ThreadingHTTPServer):
    """What the agent reads and answers: the assignments listed, the answers received."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.listed: list[dict] = []
        self.answers: dict[str, tuple[str, dict]] = {}  # lease → (ready | failed | ..., body)


class _Handler(BaseHTTPRequestHandler):
    server: Broker

    def log_message(self, *args) -> None:
        pass

    def _send(self, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._send(self.server.listed)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        _, _, _, lease_id, what = self.path.split("/")  # /v1/leases/{id}/{answer}
        self.server.answers[lease_id] = (what, body)
        self._send({})


@pytest.fixture
def broker() -> Iterator[Broker]:
    server = Broker()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def make_agent(broker: Broker, root: Path) -> Agent:
    backend = ProcessBackend(ProcessSettings(users=list(USERS), work_dir=str(root / "work"),
                                             state_dir=str(root / "state" / "process")))
    shared = PoolPlan(pool_id="pool-shared", backend="process", model="nvidia-l4", vendor="nvidia",
                      devices=(4, 5, 6, 7), memory_mib=24576,
                      spec=PoolSpec(region="us-east", model="nvidia-l4", units=4, units_per_node=4,
                                    prices=Prices(on_demand="1.00"), delivery=("process",),
                                    sharing=Sharing(mode="memory", min_milli=100)))
    whole = PoolPlan(pool_id="pool-whole", backend="process", model="nvidia-l4", vendor="nvidia", devices=(0, 1),
                     spec=PoolSpec(region="us-east", model="nvidia-l4", units=2, units_per_node=2,
                                   prices=Prices(on_demand="1.00"), delivery=("process",)))
    port = broker.server_address[1]
    return Agent(api=AgentApi(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}", "cbk_test"),
                 plans=[shared, whole], backends={"process": backend}, state_dir=root / "state",
                 grace_s={"process": 1.0})


@pytest.fixture
def root() -> Iterator[Path]:
    ensure_users(*USERS)
    folder = open_dir("cb-agent-shares-")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def agent(broker, root) -> Agent:
    return make_agent(broker, root)


def listed(lease_id: str, pool: str, *, units: int = 1, milli: int = 1000, devices: tuple[int, ...] = ()) -> dict:
    command = ["sh", "-c", ("echo V=$CUDA_VISIBLE_DEVICES P=$CUDA_MPS_ACTIVE_THREAD_PERCENTAGE "
                            "M=$CUDA_DEVICE_MEMORY_LIMIT_0; exec sleep 600")]
    return {"lease_id": lease_id, "request_id": f"req-{lease_id}", "tenant": "ten-a", "pool_id": pool,
            "model": "nvidia-l4", "units": units, "state": "provisioning", "delivery": "process",
            "workload": msgspec.to_builtins(ProcessWorkload(command=command)), "milli": milli, "devices": list(devices)}


async def answered(agent: Agent, broker: Broker, lease_id: str) -> tuple[str, dict]:
    async def check():
        await agent.step()
        return broker.answers.get(lease_id)

    return await eventually(check, timeout=15, what=f"the agent's answer for {lease_id}")


def output(agent: Agent, lease_id: str) -> str | None:
    path = agent.backends["process"].log_path(lease_id)
    text = path.read_text() if path.exists() else ""
    return text if "V=" in text else None


async def test_shares_run_on_exactly_the_devices_the_broker_named(agent, broker) -> None:
    # pool index 2 of a pool selling host devices 4-7 is host device 6; device 4 is free
    # but never chosen instead
    broker.listed = [listed("lease-s1", "pool-shared", milli=250, devices=(2,)),
                     listed("lease-s2", "pool-shared", milli=750, devices=(2,))]
    for lease_id, percent, mib in (("lease-s1", 25, 6144), ("lease-s2", 75, 18432)):
        what, body = await answered(agent, broker, lease_id)
        assert what == "ready" and body["access"]["devices"] == [6], body
        assert body["access"]["env"]["CUDA_VISIBLE_DEVICES"] == "6"
        out = await eventually(lambda lid=lease_id: output(agent, lid), what=f"{lease_id}'s output")
        assert out.split() == ["V=6", f"P={percent}", f"M={mib}m"], out
    assert agent.book.free_milli(6) == 0 and agent.book.free("pool-shared") == [4, 5, 7]

    # a third share of the full device is refused with the reason, and nothing else is taken
    broker.listed.append(listed("lease-s3", "pool-shared", milli=100, devices=(2,)))
    what, body = await answered(agent, broker, "lease-s3")
    assert what == "failed" and "device 6 has 0 milli free here" in body["reason"], body
    assert agent.book.free("pool-shared") == [4, 5, 7]

    # a whole device of the sharing pool, named by the broker: device 5, not the lowest free (4)
    broker.listed.append(listed("lease-w1", "pool-shared", units=1, devices=(1,)))
    what, body = await answered(agent, broker, "lease-w1")
    assert what == "ready" and body["access"]["devices"] == [5]
    out = await eventually(lambda: output(agent, "lease-w1"), what="the whole lease's output")
    assert out.split() == ["V=5", "P=", "M="], out  # a whole device: no share limits

    # a pool that does not share: the agent picks whole devices, as before
    broker.listed.append(listed("lease-n1", "pool-whole", units=2))
    what, body = await answered(agent, broker, "lease-n1")
    assert what == "ready" and body["access"]["devices"] == [0, 1]
    for lease_id in list(agent.leases):
        await agent.stop_lease(lease_id, "test over")


async def test_a_device_the_broker_gave_to_a_new_lease_stops_the_old_one_at_once(agent, broker) -> None:
    broker.listed = [listed("lease-old", "pool-shared", milli=600, devices=(0,))]
    assert (await answered(agent, broker, "lease-old"))[0] == "ready"
    # the old lease ended on the broker and its device went to a new share at once: the
    # agent stops the old lease's work before GONE_AFTER passes, and the new one gets device 4
    broker.listed = [listed("lease-new", "pool-shared", milli=500, devices=(0,))]
    what, body = await answered(agent, broker, "lease-new")
    assert what == "ready" and body["access"]["devices"] == [4], body
    assert "lease-old" not in agent.leases and agent.book.holders([4]) == {"lease-new"}
    await agent.stop_lease("lease-new", "test over")


async def test_a_share_that_names_no_device_or_a_device_outside_the_pool_fails(agent, broker) -> None:
    broker.listed = [listed("lease-x1", "pool-shared", milli=250),
                     listed("lease-x2", "pool-shared", milli=250, devices=(4,))]
    what, body = await answered(agent, broker, "lease-x1")
    assert what == "failed" and "a share of 250 milli names no device" in body["reason"]
    what, body = await answered(agent, broker, "lease-x2")
    assert what == "failed" and "pool pool-shared has no device 4 (it sells 4)" in body["reason"]
    assert agent.book.leases() == {}


async def test_a_restarted_agent_adopts_its_shares_with_their_milli(agent, broker, root) -> None:
    broker.listed = [listed("lease-r1", "pool-shared", milli=300, devices=(3,)),
                     listed("lease-r2", "pool-shared", milli=700, devices=(3,))]
    for lease_id in ("lease-r1", "lease-r2"):
        assert (await answered(agent, broker, lease_id))[0] == "ready"
    for item in broker.listed:
        item["state"] = "ready"
    again = make_agent(broker, root)  # the agent restarted: its book is rebuilt from records and processes
    await again.recover()
    assert again.book.leases() == {"lease-r1": (7,), "lease-r2": (7,)} and again.book.free_milli(7) == 0
    broker.listed.append(listed("lease-r3", "pool-shared", milli=100, devices=(3,)))
    what, body = await answered(again, broker, "lease-r3")
    assert what == "failed" and "device 7 has 0 milli free here" in body["reason"], body
    for lease_id in list(again.leases):
        await again.stop_lease(lease_id, "test over")
