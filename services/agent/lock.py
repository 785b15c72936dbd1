"""One agent per state folder: a second ``cbroker agent`` for the same provider on the same
host would register the same pools, hand the same devices to two leases and answer for
leases the first one runs. ``flock`` on a file in the state folder: the kernel drops it
when the holder dies, even by SIGKILL, so a crashed agent never blocks its restart."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class AlreadyRunning(Exception):
    """Another agent holds the state folder."""


class StateLock:
    def __init__(self, state_dir: str | os.PathLike) -> None:
        self.path = Path(state_dir) / "agent.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        if not self.path.parent.exists():
            # enterable, not listable: a Slurm job's user reaches its job folder under it;
            # the agent's own records below are 700 each
            self.path.parent.mkdir(parents=True, mode=0o711)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise AlreadyRunning(f"another agent (pid {holder}) is running with state folder {self.path.parent}; "
                                 "stop it first (one agent per provider and host)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
