"""Run each service as its own process and restart one that dies, with backoff,
as Kubernetes or systemd would in production."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from .servers import stop_process

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


@dataclass
class ServiceProcess:
    name: str
    port: int
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = field(default=0.0)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        out = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        env = {**os.environ, **self.env, "CB_PORT": str(self.port)}
        self.proc = subprocess.Popen([sys.executable, "-m", f"services.{self.name}"], env=env, stdout=out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.started_at = time.monotonic()

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

    def supervise(self) -> None:
        """Restart a dead process; back off 0.5 s doubling to 30 s, reset after a
        minute of good health."""
        if self.proc is None or self.proc.poll() is None:
            if self.proc is not None and time.monotonic() - self.started_at > 60:
                self.restarts = 0
            return
        now = time.monotonic()
        if self.next_start == 0.0:
            delay = min(30.0, 0.5 * 2 ** self.restarts)
            log.warning("%s exited with %s; restarting in %.1fs", self.name, self.proc.returncode, delay)
            self.next_start = now + delay
        elif now >= self.next_start:
            self.restarts += 1
            self.next_start = 0.0
            self.start()
            log.warning("%s restarted (restart #%d, pid %d)", self.name, self.restarts, self.proc.pid)

    def stop(self, timeout: float = 10.0) -> None:
        stop_process(self.proc, timeout)
