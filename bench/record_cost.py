"""What writing the request records of a confirmation batch costs, both ways: one HSET
per record (pipelined), or ``lua/record_requests.lua`` (``RequestStates.record_into``,
``RECORDS_PER_CALL`` records a call).

    python bench/record_cost.py [--batches 1000] [--batch 64] [--rounds 3]

Starts its own redis-server and writes ``--batches`` batches of ``--batch`` placed
requests' records each way, in turns, through the broker's own connection class (with its
command timeout, as the broker runs). Prints, per record, this process's CPU (building
the records, packing the commands, reading the replies) and redis-server's CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.broker.domain.requests import ComputeRequest  # noqa: E402
from services.broker.records import RequestRecord  # noqa: E402
from services.broker.request_states import RequestStates, _fields  # noqa: E402
from services.cli.servers import start_redis  # noqa: E402
from services.common.keys import Keys  # noqa: E402
from services.common.redis_conn import connect  # noqa: E402


async def run(args: argparse.Namespace, url: str, server: psutil.Process) -> None:
    redis = connect(url, timeout=2.0)
    keys = Keys("bench")
    states = RequestStates(redis, keys)
    for script in states.scripts:
        await redis.script_load(script.script)
    now = datetime.now(UTC)
    body = msgspec.convert({"units": 4, "accelerators": {"models": ["nvidia-a100-sxm-80gb"]}, "queue": False},
                           ComputeRequest)

    def records(tag: str) -> list[RequestRecord]:
        return [RequestRecord(request_id=f"req-{tag}-{i}", tenant="t", state="placed", created_at=now,
                              updated_at=now, body=body, lease_ids=[f"lease-{tag}-{i}"]) for i in range(args.batch)]

    n = args.batches * args.batch
    for r in range(args.rounds):
        for way in ("one HSET each", "record_requests.lua"):
            server0, cpu0 = sum(server.cpu_times()[:2]), time.process_time()
            for b in range(args.batches):
                pipe = redis.pipeline(transaction=False)
                batch = records(f"{r}-{way[0]}-{b}")
                if way == "one HSET each":
                    for record in batch:
                        pipe.hset(keys.request(record.request_id), mapping=_fields(record))
                else:
                    states.record_into(pipe, *batch)
                await pipe.execute()
            client, in_redis = time.process_time() - cpu0, sum(server.cpu_times()[:2]) - server0
            print(f"round {r + 1}, {way}: {client / n * 1e6:.1f} us client CPU, {in_redis / n * 1e6:.1f} us "
                  f"redis-server CPU per record ({args.batches} batches of {args.batch})", flush=True)
    await redis.aclose()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = start_redis(Path(tmp) / "redis")
        try:
            asyncio.run(run(args, server.url, psutil.Process(server.proc.pid)))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
