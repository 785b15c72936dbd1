"""Ending every process of one workload user, and the files it left in the shared temp
folders.

A workload can leave its process group (``setsid``, a double fork into a daemon), so
killing the group is not enough. Each running lease has a workload user of its own, so
"every process of that uid" is exactly the workload and whatever it spawned. The signal
is sent with ``kill(-1, sig)`` from a child that has become that uid: the kernel delivers
it to every process the uid may signal in one pass, so a process forking in a loop cannot
outrun a scan-then-kill. Without cgroups (no systemd here) this is the strongest
containment a plain host offers; what escapes it is written in docs/agent.md.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import stat
import time
from pathlib import Path

import psutil

SHARED_TMP = (Path("/tmp"), Path("/var/tmp"), Path("/dev/shm"))


def processes_of(uid: int) -> list[psutil.Process]:
    """Live processes whose real, effective or saved uid is ``uid`` (zombies excluded:
    they are dead and hold nothing but a pid)."""
    found = []
    for p in psutil.process_iter(["uids", "status"]):
        try:
            uids = p.info["uids"]
            if uids is None or p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if uid in (uids.real, uids.effective, uids.saved):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def signal_uid(uid: int, gid: int, sig: int) -> None:
    """Send ``sig`` to every process of ``uid`` at once: a forked child drops to that uid
    and calls ``kill(-1)``. Never for uid 0 (that would signal the whole machine)."""
    if uid == 0:
        raise ValueError("refusing to signal every process of root")
    pid = os.fork()
    if pid == 0:  # the child: syscalls only, then _exit (no Python cleanup in a fork)
        code = 0
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            os.kill(-1, sig)
        except ProcessLookupError:
            pass  # nothing of the uid to signal
        except BaseException:
            code = 1
        os._exit(code)
    os.waitpid(pid, 0)


async def kill_uid(uid: int, gid: int, grace_s: float) -> None:
    """SIGTERM every process of ``uid``, wait up to ``grace_s`` for them to go, then
    SIGKILL until none is left (a process forking while it dies needs another round)."""
    if processes_of(uid):
        signal_uid(uid, gid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while processes_of(uid) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # the workload's own shutdown: no event to wait on
    for _ in range(50):
        if not processes_of(uid):
            return
        signal_uid(uid, gid, signal.SIGKILL)
        await asyncio.sleep(0.02)  # the kernel tears killed processes down asynchronously
    left = [p.pid for p in processes_of(uid)]
    if left:
        raise RuntimeError(f"processes of uid {uid} survive SIGKILL: {left}")


def remove_owned_tmp(uid: int, roots: tuple[Path, ...] = SHARED_TMP) -> list[Path]:
    """Delete what ``uid`` left at the top of the shared temp folders, so the next lease
    given this user does not find it. Called only once no process of the uid is left."""
    removed = []
    for root in roots:
        try:
            entries = list(os.scandir(root))
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
                if st.st_uid != uid:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    shutil.rmtree(entry.path)  # fd-based: does not follow symlinks inside
                else:
                    os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                continue
    return removed
