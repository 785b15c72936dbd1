"""Waiting for a request's compute to be ready, for the client (``BrokerClient.wait_ready``).

The request view is the truth; the registry's event stream (``GET /v1/events``, the
tenant's own allocation and request events) only says *when* to read it again. A tenant
sees ``ready`` one event hop plus one GET after the provider said it (the target is
100 ms at p99, docs/delivery.md), instead of up to a polling interval later. The view is
also read every ``poll_s`` in any case, so a stream that cannot be opened or drops only
makes waiting slower, never wrong.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

import httpx

from services.common.client_errors import ApiError

from .records import RequestView

ENDED_REQUEST = ("rejected", "cancelled", "expired", "failed")
REPLACEABLE = ("failed", "lost")  # endings that failover may replace (docs/lifecycle.md)


class RequestNotReady(Exception):
    """``wait_ready`` gave up: the request ended without being ready, or time ran out.
    ``view`` is the last request view read (with its attempts and reasons)."""

    def __init__(self, message: str, view: RequestView | None) -> None:
        super().__init__(message)
        self.view = view


class RequestEnded(RequestNotReady):
    """The request ended failed, rejected, cancelled or expired: waiting longer will not help."""


class WaitTimedOut(RequestNotReady, TimeoutError):
    """Not ready within the time given; the request may still become ready."""


def why(view: RequestView) -> str:
    """The reasons the broker gave, else those of the attempts that failed."""
    reasons = list(view.reasons) or [
        f"attempt on {a.pool_id}: {a.state}" + (f" ({a.reason})" if a.reason else "")
        for a in view.attempts if a.state in REPLACEABLE]
    return "; ".join(reasons) or "no reason given"


def is_ready(view: RequestView, *, leaseless_for: float = 0.0, grace_s: float = 5.0) -> bool:
    """True when every lease of the request is ready; False to keep waiting (queued,
    placing, replacing: failover is placing another attempt); raises ``RequestEnded``
    when it cannot become ready any more.

    A placed request without a live lease for ``leaseless_for`` seconds is in the moment
    between a lease failing and failover taking it up (the request is then ``replacing``,
    or ``failed`` when no replacement is allowed), or its leases were released or expired:
    the view cannot tell which, so after ``grace_s`` it is taken as over."""
    if view.state in ENDED_REQUEST:
        raise RequestEnded(f"request {view.request_id} {view.state}: {why(view)}", view)
    if view.state != "placed":
        return False
    if view.leases:
        return all(lease.state == "ready" for lease in view.leases)
    if leaseless_for < grace_s:
        return False
    raise RequestEnded(f"request {view.request_id} has no live lease left: {why(view)}", view)


class Waker:
    """Follows the tenant's events on the registry in a thread and sets ``changed`` on every
    event about ``request_id`` (a lease of it, or the request itself). ``opened`` is set
    once the stream is ready: what happens after that is not missed."""

    def __init__(self, events_url: str, api_key: str, request_id: str, timeout: float = 10.0) -> None:
        self.request_id = request_id
        self.changed, self.opened, self.failed = threading.Event(), threading.Event(), threading.Event()
        self._stop = threading.Event()
        self._http = httpx.Client(base_url=events_url, timeout=httpx.Timeout(timeout, read=None),
                                  headers={"Authorization": f"Bearer {api_key}"})
        self._thread = threading.Thread(target=self._run, name=f"wait-{request_id}", daemon=True)

    def __enter__(self) -> Waker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Not joined: a read blocked on the stream only returns at the next line (a
        keep-alive comment within 5 s), when the thread sees ``_stop`` and closes its
        connection; waiting for that would delay the caller."""
        self._stop.set()

    def _run(self) -> None:
        needle = f'"request_id":"{self.request_id}"'
        try:
            with self._http, self._http.stream("GET", "/v1/events", params={"kind": "alloc,request"}) as r:
                if r.status_code != 200:
                    return
                for line in r.iter_lines():
                    if self._stop.is_set():
                        return
                    if line.startswith("event: ready"):
                        self.opened.set()
                    elif line.startswith("data:") and needle in line:
                        self.changed.set()
        except Exception:  # noqa: BLE001 - closed under us, or the registry away: the polling goes on
            pass
        finally:
            self.failed.set()
            self.opened.set()


def wait_ready(get: Callable[[str], RequestView], request_id: str, *, timeout: float,
               events_url: str | None, api_key: str, poll_s: float = 1.0, grace_s: float = 5.0,
               on_change: Callable[[RequestView], None] | None = None) -> RequestView:
    """Read the request until every lease is ready (``BrokerClient.wait_ready``)."""
    deadline = time.monotonic() + timeout
    waker = Waker(events_url, api_key, request_id) if events_url else None
    with waker or contextlib.nullcontext():
        if waker is not None:
            waker.opened.wait(min(timeout, 5.0))
        last: RequestView | None = None
        leaseless_since: float | None = None
        while True:
            try:
                view = get(request_id)
            except (httpx.TransportError, ApiError) as exc:  # a blip: the next read may answer
                if isinstance(exc, ApiError) and exc.status < 500 and exc.status != 429:
                    raise
                view = last
            if view is not None:
                if last is None or _shape(view) != _shape(last):
                    if on_change is not None:
                        on_change(view)
                last = view
                now = time.monotonic()
                leaseless_since = (leaseless_since or now) if view.state == "placed" and not view.leases else None
                if is_ready(view, leaseless_for=now - (leaseless_since or now), grace_s=grace_s):
                    return view
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                state = _describe(last) if last is not None else "unknown"
                raise WaitTimedOut(f"request {request_id} not ready within {timeout:g} s ({state})", last)
            pause = min(remaining, poll_s)
            if waker is not None and not waker.failed.is_set():
                if waker.changed.wait(pause):
                    waker.changed.clear()
            else:
                time.sleep(min(pause, 0.25))  # no stream: poll often instead


def _shape(view: RequestView) -> tuple:
    """What a progress line shows: a change in it is worth telling."""
    return (view.state, view.queue_position, tuple((x.lease_id, x.state) for x in view.leases),
            tuple((a.lease_id, a.state) for a in view.attempts))


def _describe(view: RequestView) -> str:
    if view.state != "placed":
        return view.state
    states = sorted({lease.state for lease in view.leases}) or ["no live lease"]
    return "placed, " + ", ".join(states)
