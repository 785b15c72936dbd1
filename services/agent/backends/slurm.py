"""The ``slurm`` backend: a lease becomes one Slurm batch job holding the leased GRES.

The agent talks to the cluster through Slurm's own clients (``sbatch``, ``squeue``,
``scontrol``, ``srun``, ``scancel``), as the cluster's users do, so it works wherever
those work (a login node) and needs no Slurm REST daemon. Jobs are submitted as a
dedicated Slurm account (``submit_as`` when the agent runs as root), never as root, with a
scrubbed environment and ``--export=NONE``: nothing of the agent's environment (its key)
reaches the job. The job gets ``--gres=<name>:<units>``, the lease's end as ``--time``
(plus a margin, so the broker's expiry and our ``scancel`` come first) and
``--no-requeue`` (a node failure ends the job, and the lease fails over, instead of a
silent rerun). A tenant's script may not carry ``#SBATCH``/``#PBS`` directives: the
lease, not the script, decides the resources.

Slurm 22.05's ``squeue``/``scontrol`` have ``--json``, but their shape changes between
releases; the one-line formats (``-o``, ``scontrol -o``) are stable and enough here.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import pwd
import re
import shlex
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import msgspec

from services.common.delivery import Access, ProcessWorkload, SlurmWorkload
from services.common.ids import is_valid_id

from .base import VISIBILITY_ENV, Assignment, Backend, Ended, StartFailed, share_limits

log = logging.getLogger("agent.slurm")

CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "srun")
RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "RESIZING", "STAGE_OUT", "SIGNALING"}
WAITING = {"PENDING", "CONFIGURING", "REQUEUE_HOLD", "REQUEUE_FED", "REQUEUED"}
EXITED = {"COMPLETED", "FAILED"}  # the script ended by itself: its exit code is the tenant's
_DIRECTIVE = re.compile(r"^\s*#\s*(SBATCH|PBS)\b")
_IDX = re.compile(r"\(IDX:([0-9,\-]+)\)")


class SlurmSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    work_dir: str  # per-lease job folders (script, output); must be on a filesystem the nodes share
    state_dir: str  # the agent's own per-lease records (mode 700)
    submit_as: str | None = None  # the Slurm account jobs run as, when the agent runs as root
    gres: str = "gpu"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_margin_s: int = 120
    start_timeout_s: float = 300.0  # a job still pending after this fails the lease with Slurm's reason
    poll_interval_s: float = 0.5
    command_timeout_s: float = 30.0  # a client call against an unreachable slurmctld blocks; bound it
    slurm_conf: str | None = None  # SLURM_CONF for the clients, when not the system's
    shards_per_gpu: int | None = None  # gres/shard Count per GPU in gres.conf: shares become --gres=shard:N


class _Job(msgspec.Struct, kw_only=True):
    lease_id: str
    job_id: str = ""  # "" while sbatch runs: the record is written first, so a crash leaves a claim
    status: Literal["submitting", "submitted", "running", "ended"] = "submitting"
    reason: str = ""


def expand_idx(text: str) -> list[int]:
    """``scontrol -d``'s ``GRES=gpu:3(IDX:0-1,4)`` → [0, 1, 4]."""
    out: list[int] = []
    for m in _IDX.finditer(text):
        for part in m.group(1).split(","):
            lo, _, hi = part.partition("-")
            out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def time_limit(expires_at: datetime | None, margin_s: int, now: datetime | None = None) -> str | None:
    """``--time`` in whole minutes (Slurm's granularity), rounded up, at least one."""
    if expires_at is None:
        return None
    left = (expires_at - (now or datetime.now(UTC))).total_seconds() + margin_s
    return str(max(1, math.ceil(left / 60)))


def shards(milli: int, shards_per_gpu: int) -> int:
    """A share of ``milli`` as a count of gres/shard: rounded down, so shares the broker fits
    on one device (at most 1000 milli in all) always fit in that GPU's shards; never 0
    (the config check makes min_milli x shards_per_gpu >= 1000)."""
    return max(1, milli * shards_per_gpu // 1000)


def gres_for(lease: Assignment, settings: SlurmSettings) -> str:
    """``--gres``: whole devices as ``<gres>:<units>``, a share as ``shard:<n>`` (Slurm
    places the shards on one GPU and never gives a GPU with shards taken to a gpu job)."""
    if lease.milli >= 1000:
        return f"{settings.gres}:{lease.units}"
    if settings.shards_per_gpu is None:
        raise StartFailed("this pool's Slurm settings have no shards_per_gpu: a share cannot be submitted")
    return f"shard:{shards(lease.milli, settings.shards_per_gpu)}"


def wrap_command(workload: ProcessWorkload, vendor: str, limits: dict[str, str] | None = None) -> str:
    """A process workload as a batch script: its env exported, the vendor's visibility
    variables copied from the one Slurm sets for GPUs, a share's limits (set last, as the
    process backend does), then exec the command."""
    lines = ["#!/bin/sh", "# written by cbroker agent: a process workload run as a Slurm job"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in workload.env.items()]
    for name in VISIBILITY_ENV.get(vendor.lower(), ()):
        if name != "CUDA_VISIBLE_DEVICES":
            lines.append(f'export {name}="$CUDA_VISIBLE_DEVICES"')
    lines += [f"export {k}={shlex.quote(v)}" for k, v in (limits or {}).items()]
    lines.append("exec " + shlex.join(workload.command))
    return "\n".join(lines) + "\n"


def directives(script: str) -> list[str]:
    """The ``#SBATCH``/``#PBS`` lines sbatch would read (it stops at the first command)."""
    found = []
    for line in script.splitlines()[1:]:
        stripped = line.strip()
        if not stripped:
            continue
        if not stripped.startswith("#"):
            break
        if _DIRECTIVE.match(stripped):
            found.append(stripped)
    return found


class SlurmBackend(Backend):
    kind = "slurm"

    def __init__(self, settings: SlurmSettings) -> None:
        missing = [c for c in CLIENTS if shutil.which(c) is None]
        if missing:
            raise ValueError(f"the slurm backend needs Slurm's clients on PATH; missing: {', '.join(missing)} "
                             "(Debian: apt-get install slurm-client)")
        self.settings = settings
        self._user: pwd.struct_passwd | None = None
        if settings.submit_as is not None:
            if os.geteuid() != 0:
                raise ValueError("slurm backend: `submit_as` needs the agent to run as root; without root, "
                                 "jobs are submitted as the agent's own user")
            try:
                self._user = pwd.getpwnam(settings.submit_as)
            except KeyError:
                raise ValueError(f"slurm backend: submit_as user {settings.submit_as!r} does not exist") from None
        uid = self._user.pw_uid if self._user else os.geteuid()
        if uid == 0:
            raise ValueError("slurm backend: refusing to submit jobs as root (tenant scripts would run as root "
                             "on the nodes); set `submit_as` to a dedicated Slurm account")
        self.user_name = pwd.getpwuid(uid).pw_name
        self.work_dir = Path(settings.work_dir)
        self.state_dir = Path(settings.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.state_dir, 0o700)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.work_dir, 0o711)
        self._jobs: dict[str, _Job] = {}
        self._stopping: set[str] = set()
        self._ended: list[Ended] = []
        # the clients' environment: nothing of the agent's (its key), only what Slurm needs
        self._env = {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"), "LANG": "C.UTF-8"}
        conf = settings.slurm_conf or os.environ.get("SLURM_CONF")
        if conf:
            self._env["SLURM_CONF"] = conf

    # -- the clients ----------------------------------------------------------------------
    async def _run(self, *argv: str, as_user: bool = False) -> tuple[int, str, str]:
        kwargs: dict = {}
        if as_user and self._user is not None:
            kwargs = {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}
        proc = await asyncio.create_subprocess_exec(
            *argv, env=self._env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, cwd="/", **kwargs)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self.settings.command_timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return 124, "", f"{argv[0]} did not answer within {self.settings.command_timeout_s:g}s (slurmctld down?)"
        return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")

    async def _states(self, job_ids: list[str]) -> dict[str, tuple[str, str]] | None:
        """job id → (state, reason) for our user's jobs Slurm still knows; None if squeue failed."""
        rc, out, _ = await self._run("squeue", "-h", "--states=all", "-u", self.user_name, "-o", "%i|%T|%r")
        if rc != 0:
            return None
        found = {}
        for line in out.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 3 and parts[0] in job_ids:
                found[parts[0]] = (parts[1], parts[2])
        return found

    async def _show(self, job_id: str) -> str:
        rc, out, _ = await self._run("scontrol", "-d", "-o", "show", "job", job_id)
        return out if rc == 0 else ""

    # -- records ----------------------------------------------------------------------------
    def _record_path(self, lease_id: str) -> Path:
        return self.state_dir / lease_id / "job.json"

    def _save(self, job: _Job) -> None:
        path = self._record_path(job.lease_id)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(msgspec.json.encode(job))
        os.replace(tmp, path)

    def job_dir(self, lease_id: str) -> Path:
        return self.work_dir / lease_id

    def log_path(self, lease_id: str) -> Path:
        """The job's stdout and stderr (written by the job, on the shared filesystem)."""
        return self.job_dir(lease_id) / "output.log"

    # -- Backend ------------------------------------------------------------------------------
    async def start(self, lease: Assignment) -> Access:
        if not is_valid_id(lease.lease_id):
            raise StartFailed(f"not a lease id: {lease.lease_id!r}")
        if lease.lease_id in self._jobs:
            raise StartFailed(f"lease {lease.lease_id} already has a Slurm job here")
        script = self._script(lease)
        job_dir = self.job_dir(lease.lease_id)
        if job_dir.exists():
            shutil.rmtree(job_dir)
        job_dir.mkdir(mode=0o700)
        if self._user is not None:
            os.chown(job_dir, self._user.pw_uid, self._user.pw_gid)
        path = job_dir / "job.sh"
        path.write_text(script)
        if self._user is not None:
            os.chown(path, self._user.pw_uid, self._user.pw_gid)
        path.chmod(0o700)
        job = _Job(lease_id=lease.lease_id)
        self._save(job)
        submit = asyncio.ensure_future(self._submit(lease, path))
        try:
            job.job_id = await asyncio.shield(submit)
        except StartFailed as e:
            self._forget(job, e.reason)
            raise
        except asyncio.CancelledError:
            await self._abandon_submitted(submit, job)
            raise
        job.status = "submitted"
        self._jobs[lease.lease_id] = job
        self._save(job)
        try:
            return await self._until_running(lease, job)
        except StartFailed:
            await self._cancel(job)
            self._forget(job, "failed to start")
            raise
        except BaseException:  # cancelled while waiting (the lease ended): leave no job behind
            if lease.lease_id not in self._stopping:
                await asyncio.shield(self._cancel(job))
                self._forget(job, "start abandoned")
            raise

    async def _abandon_submitted(self, submit: asyncio.Future, job: _Job) -> None:
        """The lease ended while sbatch answered: the job may exist already, so its id is
        awaited and the job cancelled, never left to run with no lease. Further
        cancellations (the agent shutting down) are waited out: sbatch answers within
        ``command_timeout_s`` and scancel too; the caller re-raises the first."""
        cancel: asyncio.Future | None = None
        while True:
            try:
                if cancel is None:
                    try:
                        job.job_id = await asyncio.shield(submit)
                    except Exception:  # noqa: BLE001 - sbatch refused or failed: no job to cancel
                        break
                    cancel = asyncio.ensure_future(self._cancel(job))
                await asyncio.shield(cancel)
                break
            except asyncio.CancelledError:
                continue
        self._forget(job, "start abandoned")

    def _script(self, lease: Assignment) -> str:
        w = lease.workload
        if isinstance(w, SlurmWorkload):
            found = directives(w.script)
            if found:
                raise StartFailed("the script may not carry #SBATCH or #PBS directives (the lease decides the "
                                  f"job's resources): {found[0][:80]}")
            return w.script
        if isinstance(w, ProcessWorkload):
            return wrap_command(w, lease.vendor, share_limits(lease))
        kind = "none" if w is None else w.kind
        raise StartFailed(f"the slurm backend runs slurm or process workloads; this lease's workload is {kind}")

    async def _submit(self, lease: Assignment, path: Path) -> str:
        s = self.settings
        argv = ["sbatch", "--parsable", "--ignore-pbs", "--no-requeue", "--export=NONE",
                f"--job-name=cb-{lease.lease_id}", f"--gres={gres_for(lease, s)}", "--nodes=1",
                f"--chdir={path.parent}", f"--output={path.parent / 'output.log'}"]
        limit = time_limit(lease.expires_at, s.time_margin_s)
        if limit:
            argv.append(f"--time={limit}")
        for flag, value in (("partition", s.partition), ("account", s.account), ("qos", s.qos)):
            if value:
                argv.append(f"--{flag}={value}")
        rc, out, err = await self._run(*argv, str(path), as_user=True)
        job_id = out.strip().split(";")[0]
        if rc != 0 or not job_id.isdigit():
            detail = (err.strip().splitlines() or ["no output"])[-1].removeprefix("sbatch: error: ")
            raise StartFailed(f"sbatch refused the job: {detail}"[:1000])
        log.info("job submitted", extra={"lease_id": lease.lease_id, "job_id": job_id})
        return job_id

    async def _until_running(self, lease: Assignment, job: _Job) -> Access:
        deadline = asyncio.get_running_loop().time() + self.settings.start_timeout_s
        reason = ""
        while True:
            states = await self._states([job.job_id])
            if states is not None:
                state, reason = states.get(job.job_id, ("GONE", "no longer known to Slurm"))
                if state == "RUNNING":
                    break
                if state not in WAITING:
                    raise StartFailed(f"Slurm ended the job before it ran: {state} ({reason})")
            if asyncio.get_running_loop().time() > deadline:
                raise StartFailed(f"the job did not start within {self.settings.start_timeout_s:g}s "
                                  f"(Slurm's reason: {reason or 'unknown'})")
            await asyncio.sleep(self.settings.poll_interval_s)  # Slurm has no event for us to wait on
        job.status = "running"
        self._save(job)
        shown = await self._show(job.job_id)
        nodes_text = re.search(r"\bNodeList=(\S+)", shown)
        nodes = await self._hostnames(nodes_text.group(1)) if nodes_text else []
        devices = expand_idx(shown)
        env = {}
        visible = await self._probe_visible(job.job_id)
        if visible is not None:
            env = {name: visible for name in VISIBILITY_ENV.get(lease.vendor.lower(), ("CUDA_VISIBLE_DEVICES",))}
        if isinstance(lease.workload, ProcessWorkload):
            env |= share_limits(lease)  # what wrap_command exported
        return Access(job_id=job.job_id, nodes=nodes, devices=devices, env=env, user=self.user_name,
                      note=f"Slurm job {job.job_id} on {','.join(nodes) or 'unknown nodes'}")

    async def _hostnames(self, nodelist: str) -> list[str]:
        rc, out, _ = await self._run("scontrol", "show", "hostnames", nodelist)
        return out.split() if rc == 0 else [nodelist]

    async def _probe_visible(self, job_id: str) -> str | None:
        """The device list as the job itself sees it (Slurm renumbers it under cgroup
        device constraints): one overlapping step in the job prints it."""
        rc, out, _ = await self._run("srun", f"--jobid={job_id}", "--overlap", "--ntasks=1",
                                     "printenv", "CUDA_VISIBLE_DEVICES", as_user=True)
        return out.strip() if rc == 0 and out.strip() else None

    async def _cancel(self, job: _Job, signal: str | None = None) -> None:
        argv = ["scancel", "--full"] if signal else ["scancel"]
        if signal:
            argv.append(f"--signal={signal}")
        rc, _, err = await self._run(*argv, job.job_id, as_user=True)
        if rc != 0 and "already completed" not in err and "Invalid job id" not in err:
            log.warning("scancel failed", extra={"job_id": job.job_id, "error": err.strip()[:300]})

    def _forget(self, job: _Job, reason: str) -> None:
        self._jobs.pop(job.lease_id, None)
        job.status, job.reason = "ended", reason
        self._save(job)

    async def stop(self, lease_id: str, grace_s: float) -> None:
        job = self._jobs.get(lease_id)
        if job is None or lease_id in self._stopping:
            return
        self._stopping.add(lease_id)
        try:
            await self._cancel(job, signal="TERM")  # the batch shell and its steps get SIGTERM first
            loop = asyncio.get_running_loop()
            deadline = loop.time() + grace_s
            while loop.time() < deadline and await self._still_there(job):
                await asyncio.sleep(self.settings.poll_interval_s)
            await self._cancel(job)  # then Slurm's own SIGTERM, KillWait, SIGKILL
            deadline = loop.time() + max(30.0, grace_s)
            while loop.time() < deadline and await self._still_there(job):
                await asyncio.sleep(self.settings.poll_interval_s)
            self._forget(job, "stopped by the agent")
        finally:
            self._stopping.discard(lease_id)

    async def _still_there(self, job: _Job) -> bool:
        states = await self._states([job.job_id])
        if states is None:
            return True
        state = states.get(job.job_id, ("GONE", ""))[0]
        return state in RUNNING or state in WAITING or state == "SUSPENDED"

    async def poll(self) -> list[Ended]:
        ended, self._ended = self._ended, []
        watched = [j for j in self._jobs.values() if j.status == "running" and j.lease_id not in self._stopping]
        if not watched:
            return ended
        states = await self._states([j.job_id for j in watched])
        if states is None:
            return ended  # Slurm did not answer: try again next round, never guess a loss
        for job in watched:
            state, reason = states.get(job.job_id, ("GONE", "no longer known to Slurm"))
            if state in RUNNING:
                continue
            if state in EXITED:
                code = _exit_code(await self._show(job.job_id))
                why = f"{state.lower()}, exit code {code}" if code is not None else state.lower()
                ended.append(Ended(lease_id=job.lease_id, state="exited", exit_code=code, reason=why))
            else:
                if state in WAITING or state == "SUSPENDED":
                    await self._cancel(job)  # requeued or suspended: the lease's devices are gone
                why = f"Slurm ended the job: {state}" + (f" ({reason})" if reason and reason != "None" else "")
                ended.append(Ended(lease_id=job.lease_id, state="lost", reason=why))
            self._forget(job, ended[-1].reason)
        return ended

    async def recover(self) -> list[str]:
        """Jobs this agent submitted (recorded in its state folder) that Slurm still runs;
        jobs it recorded that are gone are reported by the next ``poll``. Other jobs of the
        account, even ones named like ours, are left alone."""
        records = []
        for path in sorted(self.state_dir.glob("*/job.json")):
            try:
                job = msgspec.json.decode(path.read_bytes(), type=_Job)
            except (OSError, msgspec.DecodeError):
                continue
            if job.status != "ended" and path.parent.name == job.lease_id and job.lease_id not in self._jobs:
                records.append(job)
        if not records:
            return []
        claims = [j for j in records if j.status == "submitting"]
        records = [j for j in records if j.status != "submitting"]
        for job in claims:
            # the agent stopped while sbatch ran: a job named for this lease, of our account, is
            # the one it submitted (the record claimed the name before submitting)
            rc, out, _ = await self._run("squeue", "-h", "-u", self.user_name, f"--name=cb-{job.lease_id}", "-o", "%i")
            for job_id in out.split() if rc == 0 else []:
                await self._cancel(_Job(lease_id=job.lease_id, job_id=job_id))
            self._ended.append(Ended(lease_id=job.lease_id, state="lost",
                                     reason="the agent stopped while submitting the job"))
            self._forget(job, "start abandoned")
        states = await self._states([j.job_id for j in records])
        if states is None:
            raise RuntimeError("slurm backend: squeue did not answer; cannot recover the running jobs")
        adopted = []
        for job in records:
            state, _ = states.get(job.job_id, ("GONE", ""))
            self._jobs[job.lease_id] = job
            if state in WAITING and job.status == "submitted":
                await self._cancel(job)  # never became ready: the agent restarted mid-start
                self._ended.append(Ended(lease_id=job.lease_id, state="lost",
                                         reason="the agent stopped while the job was starting"))
                self._forget(job, "start abandoned")
                continue
            job.status = "running"  # poll() reports it if it ended meanwhile
            if state in RUNNING:
                adopted.append(job.lease_id)
        return adopted


def _exit_code(shown: str) -> int | None:
    """``ExitCode=1:0`` → 1; ``0:9`` (killed by a signal) → 128 + 9."""
    m = re.search(r"\bExitCode=(\d+):(\d+)", shown)
    if not m:
        return None
    code, sig = int(m.group(1)), int(m.group(2))
    return 128 + sig if sig else code
