"""uvicorn's HTTP protocol with what overload needs (docs/overload.md): header-read
and body timeouts, which uvicorn has neither of, and a pause after a refusal.

uvicorn times out an idle keep-alive connection, but a connection that sends a request
slowly (a byte of header every few seconds: "slowloris") is held forever, as is a
body that stops half way: each holds a socket and, for a body, a request slot. This is
uvicorn's httptools protocol with one timer per request: the headers must be complete
within ``header_timeout_s`` of the request's first byte (or of the connection, for its
first request), the body within ``body_timeout_s``; past that the client gets a 408
and the connection is closed.

A request refused for load (``overload.py``) marks its scope with the Retry-After it
was given; the connection is then not read again for that long. A client that retries
at once, ignoring Retry-After, waited in the socket instead of costing the service an
answer each time: 400 such clients took 99% of a loaded registry's answers and left
the admitted requests 3% of them (bench/overload_bench.py).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .overload import RETRY_AFTER_SCOPE_KEY
from .settings import settings_from_env

_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n%s")


class TimedHttpToolsProtocol(HttpToolsProtocol):
    # from the settings on first use: a worker process imports this class, never serve()
    header_timeout_s: float | None = None
    body_timeout_s: float | None = None

    _timer: asyncio.TimerHandle | None = None
    _began = 0.0
    _headers_done = False

    @classmethod
    def _configure(cls) -> None:
        settings = settings_from_env()
        cls.header_timeout_s, cls.body_timeout_s = settings.header_timeout_s, settings.body_timeout_s

    def _arm(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(delay, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self.header_timeout_s is None:
            self._configure()
        super().connection_made(transport)
        self._began, self._headers_done = self.loop.time(), False
        self._arm(self.header_timeout_s)  # type: ignore[arg-type]

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._began, self._headers_done = self.loop.time(), False
        self._arm(self.header_timeout_s)  # type: ignore[arg-type]

    def on_headers_complete(self) -> None:
        self._headers_done = True  # the timer, when it fires, now allows the body's time
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        refused = self.cycle.scope.get(RETRY_AFTER_SCOPE_KEY) if self.cycle is not None else None
        super().on_response_complete()
        if refused and not self.transport.is_closing():
            self.flow.pause_reading()
            self.loop.call_later(refused, self._resume_after_refusal)

    def _resume_after_refusal(self) -> None:
        if not self.transport.is_closing():
            self.flow.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _expired(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._headers_done:
            left = self._began + self.header_timeout_s + self.body_timeout_s - self.loop.time()  # type: ignore[operator]
            if left > 0:
                self._arm(left)
                return
            what = f"request body not received within {self.body_timeout_s:g}s"
        else:
            what = f"request headers not received within {self.header_timeout_s:g}s"
        if self.cycle is None or not self.cycle.response_started:
            message = what.encode()
            self.transport.write(_TIMEOUT % (len(message), message))
        self.transport.close()
