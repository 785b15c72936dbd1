import asyncio, os, signal, time
import msgspec
from services.cli.servers import start_redis
from .broker_world import broker_world
from .test_idempotency_keys import POOLS, _timed

async def test_redis_stall(settings, nc, tmp_path):
    server = start_redis(tmp_path / "r")
    try:
        s = msgspec.structs.replace(settings, redis_url=server.url)
        async with broker_world(s, POOLS) as w:
            assert (await w.request("t1", {"units": 1})).status_code == 201
            os.kill(server.proc.pid, signal.SIGSTOP)
            try:
                took, r = await _timed(w.request("t1", {"units": 2, "queue": False}))
                print("plain", took, r and r.status_code, r and r.headers.get("retry-after"))
                took, r = await _timed(w.request("t1", {"units": 2, "queue": False}, headers={"Idempotency-Key": "x"}))
                print("keyed", took, r and r.status_code, r and r.headers.get("retry-after"))
            finally:
                os.kill(server.proc.pid, signal.SIGCONT)
    finally:
        server.stop()
