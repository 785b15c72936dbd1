"""A provider agent for the benchmarks: keeps every pool it is given online by sending
batched heartbeats (``POST /v1/heartbeats``) for all of them, once per ``every`` seconds,
throughout a run.

It runs in its own process (``multiprocessing``, spawned), so that its CPU is neither the
load generator's nor the servers': the broker bench accounts CPU per process. The batches
of one round are spread evenly over the round rather than sent in a burst, as many agents
reporting on their own clocks would, so that the registry's load is steady while the
broker is measured.

    hb = Heartbeater(registry_url, provider_key, pool_ids, every=10.0); hb.start()
    ...
    report = hb.stop()  # HeartbeatReport: heartbeats sent, per second, pool statuses seen
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections import Counter
from dataclasses import dataclass, field

BATCH = 500  # pools per request (the endpoint takes up to 10,000)


@dataclass
class HeartbeatReport:
    seconds: float = 0.0
    requests: int = 0
    heartbeats: int = 0  # pools the registry answered for in 200s
    failed_requests: int = 0  # non-200 answers or transport errors
    statuses: Counter = field(default_factory=Counter)  # per pool answer: online, offline, not_found, ...
    rounds: int = 0  # complete rounds over every pool
    longest_gap_s: float = 0.0  # the longest time between two answered heartbeats of one pool
    error: str = ""

    @property
    def rate(self) -> float:
        return self.heartbeats / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        return (f"{self.heartbeats:,} heartbeats in {self.requests:,} requests over {self.seconds:.1f}s = "
                f"{self.rate:,.0f}/s ({BATCH} pools per request, {self.rounds} full rounds, longest gap "
                f"between two heartbeats of a pool {self.longest_gap_s:.1f}s); pool statuses answered {dict(self.statuses)}; "
                f"failed requests {self.failed_requests}" + (f"; error: {self.error}" if self.error else ""))


def _agent(url: str, key: str, pool_ids: list[str], every: float, stop, out) -> None:  # noqa: ANN001
    import httpx

    report = HeartbeatReport()
    batches = [pool_ids[j:j + BATCH] for j in range(0, len(pool_ids), BATCH)]
    step = every / len(batches)
    t0 = time.perf_counter()
    last_answered: list[float | None] = [None] * len(batches)
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=every) as client:
            k = 0
            while not stop.is_set():
                i = k % len(batches)
                try:
                    r = client.post("/v1/heartbeats", json={"pools": batches[i]})
                    report.requests += 1
                    if r.status_code == 200:
                        answered = r.json()["pools"]
                        report.heartbeats += len(answered)
                        report.statuses.update(answered.values())
                        now = time.perf_counter()
                        if (last := last_answered[i]) is not None:
                            report.longest_gap_s = max(report.longest_gap_s, now - last)
                        last_answered[i] = now
                    else:
                        report.failed_requests += 1
                except httpx.HTTPError as e:
                    report.failed_requests += 1
                    report.error = repr(e)
                k += 1
                report.rounds += k % len(batches) == 0
                stop.wait(max(0.0, t0 + k * step - time.perf_counter()))
    except Exception as e:  # noqa: BLE001 — reported to the bench, which fails the run on it
        report.error = repr(e)
    report.seconds = time.perf_counter() - t0
    out.put(report)


class Heartbeater:
    def __init__(self, url: str, key: str, pool_ids: list[str], every: float) -> None:
        ctx = mp.get_context("spawn")
        self._stop = ctx.Event()
        self._out = ctx.Queue()
        self.process = ctx.Process(target=_agent, args=(url, key, pool_ids, every, self._stop, self._out),
                                   name="bench-heartbeater", daemon=True)

    def start(self) -> None:
        self.process.start()

    def stop(self) -> HeartbeatReport:
        self._stop.set()
        try:
            report = self._out.get(timeout=60)
        finally:
            self.process.join(10)
            if self.process.is_alive():
                self.process.kill()
        return report
