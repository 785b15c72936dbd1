"""Ending every process of one workload user, and the files it left in the shared temp
folders.

A workload can leave its process group (``setsid``, a double fork into a daemon), so
killing the group is not enough. Each running lease has a workload user of its own, so
"every process of that uid" is exactly the workload and whatever it spawned. The signal
goes both through ``kill(-1, sig)`` from a helper that has become that uid and from the
agent to each process it finds (``signal_uid``). Without cgroups (no systemd here) this is the strongest
containment a plain host offers; what escapes it is written in docs/agent.md.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import stat
import subprocess
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
    """Send ``sig`` to every process of ``uid``. Two ways, because each alone can be
    beaten: a helper that has become the uid calls ``kill(-1)`` (one pass in the kernel,
    so a process forking in a loop cannot outrun it, but the workload may kill the helper
    first), and the agent, as root, signals each process it finds (the workload cannot stop
    that, but it may fork between the scan and the kill). Never for uid 0."""
    if uid == 0:
        raise ValueError("refusing to signal every process of root")
    name = signal.Signals(sig).name.removeprefix("SIG")
    # /bin/sh: the one interpreter every uid can execute (the agent's own Python may not be)
    subprocess.run(["/bin/sh", "-c", f"kill -s {name} -- -1 2>/dev/null; exit 0"], env={}, cwd="/",
                   user=uid, group=gid, extra_groups=[], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=10, check=False)
    for p in processes_of(uid):
        try:
            p.send_signal(sig)  # psutil checks it is still the same process (pid + start time)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue


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
