"""Run each service as its own process and restart one that dies (a service, nats-server
or redis-server), with backoff, as Kubernetes or systemd would in production."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import httpx

from .servers import _spawn, stop_process

log = logging.getLogger("cbroker.up")

SERVICES = ("registry", "broker", "meter")


def available_services() -> list[str]:
    """Services whose package exists in this checkout (later issues add more)."""
    import importlib.util

    def exists(name: str) -> bool:
        try:
            return importlib.util.find_spec(f"services.{name}.app") is not None
        except ModuleNotFoundError:
            return False

    return [s for s in SERVICES if exists(s)]


class Child(Protocol):
    """What a supervisor restarts: a service or a server process."""

    name: str
    proc: subprocess.Popen | None

    def start(self) -> None: ...


@dataclass
class Supervisor:
    """Restart a dead child with the same arguments (same port, same data); back off 0.5 s
    doubling to 30 s per child, reset after a minute of good health."""

    children: list[Child]
    _restarts: dict[int, int] = field(default_factory=dict)  # by id(child)
    _next_start: dict[int, float] = field(default_factory=dict)
    _started_at: dict[int, float] = field(default_factory=dict)

    def check(self) -> None:
        now = time.monotonic()
        for child in self.children:
            key = id(child)
            if child.proc is None or child.proc.poll() is None:
                if now - self._started_at.get(key, now) > 60:
                    self._restarts[key] = 0
                continue
            restarts = self._restarts.get(key, 0)
            if key not in self._next_start:
                delay = min(30.0, 0.5 * 2 ** restarts)
                log.warning("%s exited with %s; restarting in %.1fs", child.name, child.proc.returncode, delay)
                self._next_start[key] = now + delay
            elif now >= self._next_start[key]:
                del self._next_start[key]
                self._restarts[key] = restarts + 1
                self._started_at[key] = now
                child.start()
                log.warning("%s restarted (restart #%d, pid %d)", child.name, restarts + 1, child.proc.pid)


@dataclass
class ServiceProcess:
    name: str
    port: int
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None
    tied: bool = False  # dies with the process that started it (``cbroker up``): see ``die_with_parent``

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = _spawn([sys.executable, "-m", f"services.{self.name}"], self.log_path, self.tied,
                           env={**os.environ, **self.env, "CB_PORT": str(self.port)})

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/health", timeout=0.5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not healthy within {timeout}s; see {self.log_path}")

    def stop(self, timeout: float = 10.0) -> None:
        stop_process(self.proc, timeout)
