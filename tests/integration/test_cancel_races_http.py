"""Issue 11, reproduction 3 end to end: two broker processes, real HTTP. Thirty requests
wait behind a full pool; capacity comes back (both brokers' queue passes run) while
their tenants cancel every one of them through both brokers. Whatever the interleaving,
a cancel answered 200 means no lease was ever granted for that request, none is placed
twice, and the pool is never overbooked."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack, ExitStack

import httpx

from services.common.messages import AllocEvent, LeaseGranted, LeaseLost

from ..helpers import EventTap, eventually
from ..procs import service_process, service_processes
from .conftest import pool_body

N = 30
RETRACTED = ("grant not completed", "grant never completed")


async def test_cancelled_while_the_queue_places_never_gets_a_lease(settings, nc, subjects, tmp_path) -> None:
    admin = {"Authorization": f"Bearer {settings.admin_key}"}
    with ExitStack() as stack:
        registry = stack.enter_context(service_process("registry", settings, tmp_path))
        async with httpx.AsyncClient(base_url=registry.url, headers=admin, timeout=30) as c:
            prov = {"Authorization": "Bearer " + (await c.post("/v1/keys", json={
                "role": "provider", "subject": "acme"})).json()["key"]}
            tenant = {"Authorization": "Bearer " + (await c.post("/v1/keys", json={
                "role": "tenant", "subject": "t1"})).json()["key"]}
            r = await c.put("/v1/pools/p", json=pool_body(units=16, units_per_node=8), headers=prov)
            assert r.status_code == 201, r.text
        brokers = stack.enter_context(service_processes([("broker", settings), ("broker", settings)], tmp_path))
        async with AsyncExitStack() as closing, \
                EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as alloc:
            clients = [await closing.enter_async_context(httpx.AsyncClient(base_url=b.url, headers=tenant, timeout=30))
                       for b in brokers]
            full = await clients[0].post("/v1/requests", json={"units": 16})
            assert full.status_code == 201, full.text
            queued = []
            for i in range(N):
                r = await clients[i % 2].post("/v1/requests", json={"units": 1})
                assert r.status_code == 202, r.text
                queued.append(r.json()["request_id"])
            lease_id = full.json()["leases"][0]["lease_id"]

            async def cancel(i: int, request_id: str) -> tuple[str, int, dict]:
                r = await clients[i % 2].delete(f"/v1/requests/{request_id}")
                return request_id, r.status_code, r.json()

            release = clients[1].post(f"/v1/leases/{lease_id}/release")
            results = await asyncio.gather(release, *(cancel(i, q) for i, q in enumerate(queued)))
            assert results[0].status_code == 200
            answers = {rid: (status, body) for rid, status, body in results[1:]}
            assert all(status in (200, 409) for status, _ in answers.values()), answers

            async def settled() -> dict[str, str]:
                states = {q: (await clients[0].get(f"/v1/requests/{q}")).json()["state"] for q in queued}
                return states if "placing" not in states.values() else {}

            states = await eventually(settled, timeout=30)

            async def tapped() -> bool:  # every allocation event of the stream is in the tap
                info = await nc.jetstream().stream_info(subjects.stream("alloc"))
                return len(alloc.events) >= info.state.messages

            await eventually(tapped, timeout=10, what="the tap holds every allocation event")
            grants: dict[str, list[str]] = {}
            retracted = {e.lease.lease_id for e in alloc.events
                         if isinstance(e, LeaseLost) and e.reason in RETRACTED}
            for e in alloc.events:
                if isinstance(e, LeaseGranted) and e.lease.lease_id not in retracted:
                    grants.setdefault(e.lease.request_id, []).append(e.lease.lease_id)
            for rid, (status, body) in answers.items():
                if status == 200:
                    assert body["state"] == "cancelled" and states[rid] == "cancelled", (rid, states[rid])
                    assert rid not in grants, f"{rid} was cancelled (200) and then granted {grants[rid]}"
                else:
                    assert states[rid] in ("placed", "queued"), (rid, body, states[rid])
                assert len(grants.get(rid, [])) <= 1, f"{rid} placed twice: {grants[rid]}"
            live = (await clients[0].get("/v1/leases")).json()
            assert sum(lease["units"] for lease in live) <= 16

