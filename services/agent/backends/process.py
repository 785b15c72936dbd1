"""The ``process`` backend: a lease's command runs on this host, seeing exactly its devices.

A tenant's command is untrusted code on the provider's machine, so each running lease
gets a workload user of its own from a configured set (HTCondor's "slot users"): the
command runs as that unprivileged uid, in its own session and process group, in a
working directory only that uid can open, with a scrubbed environment, resource limits
and ``no_new_privs`` (a setuid binary cannot raise it back to root). Because the uid is
the lease's alone, stopping it kills every process of that uid (``uid_sweep``), which
also ends what left the process group. What this does not isolate (network, the rest of
the filesystem, device files) is written in docs/agent.md.

The agent's own files for a lease (state with pid and start time, output log) live in
the agent's state folder (mode 700): a workload cannot forge the pid file that recovery
trusts, nor rewrite its log.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pwd
import resource
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import psutil

from services.common.delivery import Access, ProcessWorkload
from services.common.ids import is_valid_id

from .base import VISIBILITY_ENV, Assignment, Backend, Ended, StartFailed, share_limits
from .uid_sweep import kill_uid, processes_of, remove_owned_tmp

log = logging.getLogger("agent.process")

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
_Limit = Annotated[int, msgspec.Meta(ge=1)]
_PR_SET_NO_NEW_PRIVS = 38


class Limits(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Resource limits per workload (soft = hard; ``None`` leaves the agent's own).
    ``nproc`` counts every process of the lease's user, so it also bounds a fork bomb."""

    nproc: _Limit | None = 512
    nofile: _Limit | None = 4096
    as_bytes: _Limit | None = None  # address space; GPU runtimes map huge ranges, so off by default
    cpu_s: _Limit | None = None
    fsize_bytes: _Limit | None = None  # largest file it may write (bounds its output log too)


class ProcessSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    users: list[str]  # dedicated workload users, one per running lease; never root
    work_dir: str  # each lease's working directory is made here (owned by its user, mode 700)
    state_dir: str  # the agent's own per-lease state and output logs (mode 700)
    path: str = DEFAULT_PATH
    lang: str = "C.UTF-8"
    limits: Limits = Limits()
    clean_tmp: bool = True  # delete what a lease's user left in /tmp, /var/tmp, /dev/shm


class _State(msgspec.Struct, kw_only=True):
    """One lease's record in the agent's state folder (written before and after the spawn)."""

    lease_id: str
    user: str
    uid: int
    gid: int
    devices: list[int]
    status: Literal["starting", "running", "ended"] = "starting"
    pid: int = 0
    create_time: float = 0.0  # psutil's: tells our pid from a later process given the same pid
    exit_code: int | None = None
    reason: str = ""


class _Run:
    def __init__(self, state: _State, popen: subprocess.Popen | None) -> None:
        self.state = state
        self.popen = popen  # None for a workload adopted after an agent restart
        self.stopping = False

    def exit_code(self) -> tuple[bool, int | None]:
        """(ended, exit code if known). Shell convention: a signal N is 128 + N."""
        if self.popen is not None:
            rc = self.popen.poll()
            if rc is None:
                return False, None
            return True, (128 - rc if rc < 0 else rc)
        return (not _alive(self.state), None)


def _alive(state: _State) -> bool:
    """Is the process the state names still the one we started (same pid, same start time, same uid)?"""
    try:
        p = psutil.Process(state.pid)
        return (abs(p.create_time() - state.create_time) < 0.01 and p.uids().real == state.uid
                and p.status() != psutil.STATUS_ZOMBIE)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def log_path(state_dir: str | Path, lease_id: str) -> Path:
    """Where a lease's stdout and stderr go (``cbroker logs LEASE_ID`` reads it)."""
    if not is_valid_id(lease_id):
        raise ValueError(f"not a lease id: {lease_id!r}")
    return Path(state_dir) / lease_id / "output.log"


def _decode_exit(code: int | None) -> str:
    if code is not None and code > 128 and code - 128 < signal.NSIG:
        try:
            return f"killed by {signal.Signals(code - 128).name}"
        except ValueError:
            pass
    return "" if code is None else f"exit code {code}"


class ProcessBackend(Backend):
    kind = "process"

    def __init__(self, settings: ProcessSettings) -> None:
        if os.geteuid() != 0:
            raise ValueError("the process backend must run as root: it starts each workload as one of its "
                             "dedicated unprivileged users (run the agent as root, or use another backend)")
        if not settings.users:
            raise ValueError("process backend: no workload users configured (`users`)")
        self.settings = settings
        self._users: list[pwd.struct_passwd] = []
        for name in settings.users:
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                raise ValueError(f"process backend: workload user {name!r} does not exist "
                                 f"(create it: useradd --system --user-group {name})") from None
            if entry.pw_uid == 0 or entry.pw_gid == 0:
                raise ValueError(f"process backend: refusing to run workloads as {name!r}: it is root "
                                 "(uid or gid 0); configure an unprivileged user")
            if entry.pw_uid == os.getuid():
                raise ValueError(f"process backend: {name!r} is the agent's own user; workloads need their own")
            if any(u.pw_uid == entry.pw_uid for u in self._users):
                raise ValueError(f"process backend: {name!r} has the same uid as another workload user; "
                                 "each running lease needs a uid of its own")
            self._users.append(entry)
        self.work_dir = Path(settings.work_dir)
        self.state_dir = Path(settings.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.state_dir, 0o700)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.work_dir, 0o711)  # users may enter their own folder, not list the others
        for parent in self.work_dir.resolve().parents:
            if not parent.stat().st_mode & 0o001:
                raise ValueError(f"process backend: workload users cannot reach work_dir: {parent} is not "
                                 "traversable by others (chmod o+x, or choose another folder)")
        self._running: dict[str, _Run] = {}
        self._ended: list[Ended] = []

    # -- paths ----------------------------------------------------------------------------
    def workdir(self, lease_id: str) -> Path:
        return self.work_dir / lease_id

    def log_path(self, lease_id: str) -> Path:
        return log_path(self.state_dir, lease_id)

    def _state_path(self, lease_id: str) -> Path:
        return self.state_dir / lease_id / "state.json"

    def _save(self, state: _State) -> None:
        path = self._state_path(state.lease_id)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(msgspec.json.encode(state))
        os.replace(tmp, path)

    # -- Backend ---------------------------------------------------------------------------
    async def start(self, lease: Assignment) -> Access:
        if not is_valid_id(lease.lease_id):
            raise StartFailed(f"not a lease id: {lease.lease_id!r}")
        if lease.lease_id in self._running:
            raise StartFailed(f"lease {lease.lease_id} is already running here")
        workload = lease.workload
        if not isinstance(workload, ProcessWorkload):
            kind = "none" if workload is None else workload.kind
            raise StartFailed(f"the process backend runs process workloads; this lease's workload is {kind}")
        names = VISIBILITY_ENV.get(lease.vendor.lower())
        if not names:
            raise StartFailed(f"no device-visibility variable is known for vendor {lease.vendor!r}: "
                              "the workload could not be limited to its devices")
        if len(lease.devices) != lease.units:
            raise StartFailed(f"{lease.units} units leased but {len(lease.devices)} devices assigned")
        user = self._free_user()
        state = _State(lease_id=lease.lease_id, user=user.pw_name, uid=user.pw_uid, gid=user.pw_gid,
                       devices=list(lease.devices))
        (self.state_dir / lease.lease_id).mkdir(mode=0o700, exist_ok=True)
        self._save(state)  # the uid is claimed before anything runs as it: recovery can sweep it
        limits = share_limits(lease)  # a share: the vendor mechanism's variables (docs/agent.md, "Shares")
        try:
            popen = self._spawn(state, workload, names, limits)
        except StartFailed as e:
            await self._finish(state, None, reason=e.reason)
            raise
        state.status, state.pid = "running", popen.pid
        try:
            state.create_time = psutil.Process(popen.pid).create_time()
        except psutil.NoSuchProcess:
            state.create_time = 0.0  # already gone: poll() reports its exit from the Popen
        self._save(state)
        self._running[lease.lease_id] = _Run(state, popen)
        visible = ",".join(str(d) for d in lease.devices)
        log.info("workload started", extra={"lease_id": lease.lease_id, "pid": popen.pid, "user": user.pw_name})
        return Access(user=user.pw_name, devices=list(lease.devices), env={n: visible for n in names} | limits,
                      note=f"process {popen.pid} as {user.pw_name}; output: cbroker logs {lease.lease_id}")

    def _free_user(self) -> pwd.struct_passwd:
        taken = {r.state.uid for r in self._running.values()}
        busy = []
        for u in self._users:
            if u.pw_uid in taken:
                continue
            if processes_of(u.pw_uid):  # someone else's processes: neither used nor killed
                busy.append(u.pw_name)
                continue
            return u
        detail = f" ({', '.join(busy)} run processes the agent did not start)" if busy else ""
        raise StartFailed(f"no free workload user: all {len(self._users)} configured are busy{detail}")

    def _spawn(self, state: _State, workload: ProcessWorkload, names: tuple[str, ...],
               limits: dict[str, str]) -> subprocess.Popen:
        s = self.settings
        wd = self.workdir(state.lease_id)
        if wd.exists():
            shutil.rmtree(wd)
        wd.mkdir(mode=0o700)
        os.chown(wd, state.uid, state.gid)
        os.chmod(wd, 0o700)
        visible = ",".join(str(d) for d in state.devices)
        env = {"PATH": s.path, "HOME": str(wd), "LANG": s.lang, "TMPDIR": str(wd)}
        env.update(workload.env)
        env.update({n: visible for n in names})  # last: the tenant's env cannot widen its devices
        env.update(limits)  # nor raise its share
        fd = os.open(self.log_path(state.lease_id), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            return subprocess.Popen(
                workload.command, env=env, cwd=wd, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd,
                user=state.uid, group=state.gid, extra_groups=[], start_new_session=True,
                umask=0o077, close_fds=True, preexec_fn=_limiter(s.limits))
        except FileNotFoundError:
            raise StartFailed(f"command not found: {workload.command[0]}") from None
        except PermissionError:
            raise StartFailed(f"command not executable by the workload user: {workload.command[0]}") from None
        except OSError as e:
            raise StartFailed(f"could not start {workload.command[0]}: {e.strerror or e}") from None
        except subprocess.SubprocessError as e:  # the limits could not be applied in the child
            raise StartFailed(f"could not start {workload.command[0]}: {e}") from None
        finally:
            os.close(fd)

    async def stop(self, lease_id: str, grace_s: float) -> None:
        run = self._running.get(lease_id)
        if run is None or run.stopping:
            return
        run.stopping = True
        await kill_uid(run.state.uid, run.state.gid, grace_s)
        _, code = run.exit_code()
        if run.popen is not None:
            code = run.popen.wait()
            code = 128 - code if code < 0 else code
        await self._finish(run.state, code, reason="stopped by the agent")

    async def poll(self) -> list[Ended]:
        ended, self._ended = self._ended, []
        for lease_id, run in list(self._running.items()):
            if run.stopping:
                continue
            done, code = run.exit_code()
            if not done:
                continue
            # the command is gone; whatever it left running (a daemon, a child) goes with it (_finish)
            reason = _decode_exit(code) or "exit code unknown (started before the agent restarted)"
            await self._finish(run.state, code, reason=reason)
            ended.append(Ended(lease_id=lease_id, state="exited", exit_code=code, reason=reason))
        return ended

    async def recover(self) -> list[str]:
        """Adopt the workloads recorded in the state folder that still run (same pid, same
        start time, same uid). A recorded workload that is gone has its user swept (what is
        left of it was started by it) and is reported by the next ``poll``; anything else on
        the host is left alone."""
        records = []
        for path in sorted(self.state_dir.glob("*/state.json")):
            try:
                state = msgspec.json.decode(path.read_bytes(), type=_State)
            except (OSError, msgspec.DecodeError):
                log.warning("unreadable lease state, ignored", extra={"path": path.name})
                continue
            if state.status != "ended" and state.lease_id not in self._running and path.parent.name == state.lease_id:
                records.append(state)
        adopted = []
        for state in records:
            if state.status == "running" and _alive(state):
                self._running[state.lease_id] = _Run(state, None)
                adopted.append(state.lease_id)
        in_use = {r.state.uid for r in self._running.values()}
        for state in records:
            if state.lease_id in self._running:
                continue
            if state.status == "starting":
                reason = "the agent stopped while starting it"
                self._ended.append(Ended(lease_id=state.lease_id, state="lost", reason=reason))
            else:
                reason = "ended while the agent was down (exit code unknown)"
                self._ended.append(Ended(lease_id=state.lease_id, state="exited", reason=reason))
            # its user's leftovers are its own, unless a live lease has that user now
            await self._finish(state, None, reason=reason, sweep=state.uid not in in_use)
        return adopted

    async def _finish(self, state: _State, code: int | None, *, reason: str, sweep: bool = True) -> None:
        """The lease's work is over: nothing of its user runs any more; remove its files."""
        self._running.pop(state.lease_id, None)
        if sweep:
            await kill_uid(state.uid, state.gid, 0)
            if self.settings.clean_tmp:
                remove_owned_tmp(state.uid)
        shutil.rmtree(self.workdir(state.lease_id), ignore_errors=True)
        state.status, state.exit_code, state.reason = "ended", code, reason
        self._save(state)
        log.info("workload ended", extra={"lease_id": state.lease_id, "exit_code": code, "reason": reason})


def _limiter(limits: Limits):  # noqa: ANN202 (a preexec_fn)
    """Runs in the child after it became the workload user, before exec: the limits
    (lowering, so allowed unprivileged), then no_new_privs (setuid binaries stay unprivileged)."""
    pairs = [(resource.RLIMIT_NPROC, limits.nproc), (resource.RLIMIT_NOFILE, limits.nofile),
             (resource.RLIMIT_AS, limits.as_bytes), (resource.RLIMIT_CPU, limits.cpu_s),
             (resource.RLIMIT_FSIZE, limits.fsize_bytes)]
    libc = ctypes.CDLL(None, use_errno=True)

    def apply() -> None:
        for which, value in pairs:
            if value is not None:
                hard = resource.getrlimit(which)[1]
                if hard != resource.RLIM_INFINITY:
                    value = min(value, hard)  # only lowering is allowed here
                resource.setrlimit(which, (value, value))
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")

    return apply
