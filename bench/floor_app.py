"""The floor of the stack: what one durable write costs with nothing else on top.

A bare litestar app shaped like the services (``create_app`` factory; the lifespan opens
a redis.asyncio client and a NATS JetStream context the same way) with one endpoint,
``POST /floor``: one Redis EVALSHA of a tiny script (HINCRBY a key, return it) and one
JetStream publish with ``Nats-Msg-Id`` to a stream it creates, acknowledged before the
201. A placement does at least this much, so ``placements/s ÷ floor req/s`` says how
much the broker adds to the unavoidable round trips.

    NATS_URL=... REDIS_URL=... python bench/floor_app.py --port 8090 [--workers 1]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import msgspec  # noqa: E402
from litestar import Litestar, Request, post  # noqa: E402
from nats.js.api import StorageType, StreamConfig  # noqa: E402
from nats.js.errors import NotFoundError  # noqa: E402

from services.common.ids import new_id  # noqa: E402
from services.common.nats_conn import DUPLICATE_WINDOW_S, connect  # noqa: E402
from services.common.redis_conn import connect as redis_connect  # noqa: E402

STREAM, SUBJECT = "FLOOR", "floor.events"
COUNTER = "floor:counter"
SCRIPT = "return redis.call('HINCRBY', KEYS[1], ARGV[1], 1)"


class FloorEvent(msgspec.Struct, frozen=True, kw_only=True):
    """About the size of a grant event's envelope."""

    id: str
    at: float
    worker: int
    n: int
    note: str = "floor: one EVALSHA and one acknowledged JetStream publish"


@post("/floor", status_code=201)
async def floor(request: Request) -> dict[str, object]:
    state = request.app.state
    n = int(await state.script(keys=[COUNTER], args=[state.field]))
    event = FloorEvent(id=new_id("ev"), at=time.time(), worker=os.getpid(), n=n)
    ack = await state.js.publish(SUBJECT, msgspec.json.encode(event), headers={"Nats-Msg-Id": event.id})
    return {"id": event.id, "n": n, "seq": ack.seq}


def create_app() -> Litestar:
    nats_url = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        nc = await connect(nats_url, "floor")
        redis = redis_connect(redis_url, 64)
        js = nc.jetstream()
        config = StreamConfig(name=STREAM, subjects=[SUBJECT], storage=StorageType.FILE,
                              duplicate_window=DUPLICATE_WINDOW_S)
        try:
            await js.stream_info(STREAM)
        except NotFoundError:
            with contextlib.suppress(Exception):  # another worker may have created it meanwhile
                await js.add_stream(config)
        app.state.js = js
        app.state.script = redis.register_script(SCRIPT)
        app.state.field = str(os.getpid())
        try:
            yield
        finally:
            await nc.drain()
            await redis.aclose()

    return Litestar(route_handlers=[floor], lifespan=[lifespan], debug=False)


def main() -> None:
    import uvicorn

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    uvicorn.run("bench.floor_app:create_app", factory=True, host="127.0.0.1", port=args.port,
                workers=args.workers, log_level="warning", access_log=False, lifespan="on",
                timeout_graceful_shutdown=5, proxy_headers=False)  # as services/common/serve.py


if __name__ == "__main__":
    main()
