"""The ``slurm`` backend against a real slurmctld + slurmd (tests/slurm_cluster.py): a
lease becomes a job holding its GRES, ready when Slurm runs it, with the devices the job
sees; release cancels it; a job Slurm kills is reported lost. Without Slurm installed
these fail (the fixture says how to install it), they are never skipped."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest

from services.agent.backends.base import Assignment, Ended, StartFailed
from services.agent.backends.slurm import SlurmBackend, SlurmSettings, directives, expand_idx, time_limit
from services.common.delivery import ProcessWorkload, SlurmWorkload

from ..helpers import eventually
from ..slurm_cluster import SHARDS_PER_GPU, SlurmCluster
from ..workload_users import ensure_users, open_dir

USER = "cbroker-slurm"


@pytest.fixture(scope="module")
def cluster(slurm_cluster: SlurmCluster) -> SlurmCluster:
    ensure_users(USER)
    return slurm_cluster


@pytest.fixture
def backend(cluster: SlurmCluster) -> Iterator[SlurmBackend]:
    root = open_dir("cb-agent-slurm-")
    b = SlurmBackend(settings(cluster, root))
    yield b
    cluster.run("scancel", "-u", USER, check=False)
    shutil.rmtree(root, ignore_errors=True)


def settings(cluster: SlurmCluster, root: Path, **over) -> SlurmSettings:
    return SlurmSettings(work_dir=str(root / "jobs"), state_dir=str(root / "state"), submit_as=USER,
                         slurm_conf=str(cluster.conf), poll_interval_s=0.2, shards_per_gpu=SHARDS_PER_GPU, **over)


def lease(lease_id: str, workload, units: int = 2, vendor: str = "nvidia") -> Assignment:
    return Assignment(lease_id=lease_id, pool_id="pool-s", tenant="ten-s", units=units, devices=(), vendor=vendor,
                      model="h100-sxm", workload=workload, expires_at=datetime.now(UTC) + timedelta(minutes=30))


def process(*command: str, **env: str) -> ProcessWorkload:
    return ProcessWorkload(command=list(command), env=env)


def queued(cluster: SlurmCluster) -> list[str]:
    """Jobs squeue shows (pending, running, completing): what still holds the cluster."""
    return cluster.job_ids()


def output_with(backend: SlurmBackend, lease_id: str, marker: str) -> str | None:
    path = backend.log_path(lease_id)
    text = path.read_text() if path.exists() else ""
    return text if marker in text else None


async def ended(backend: SlurmBackend, lease_id: str, timeout: float = 30) -> Ended:
    seen: list[Ended] = []

    async def check() -> Ended | None:
        seen.extend(await backend.poll())
        return next((e for e in seen if e.lease_id == lease_id), None)

    return await eventually(check, timeout=timeout, every=0.2, what=f"{lease_id} reported ended")


async def test_a_lease_is_a_running_job_holding_its_gres_and_release_cancels_it(cluster, backend, monkeypatch) -> None:
    monkeypatch.setenv("CB_AGENT_KEY", "agent-secret-7788")
    backend = SlurmBackend(backend.settings)  # made with the agent's secret in its environment
    access = await backend.start(lease("lease-s1", process("sh", "-c", "echo CVD=$CUDA_VISIBLE_DEVICES; env; "
                                                           "exec sleep 600", MY_VAR="mine"), units=3))
    assert access.job_id and access.nodes == ["n1"] and len(access.devices) == 3
    shown = cluster.run("scontrol", "-d", "-o", "show", "job", access.job_id).stdout
    assert "JobState=RUNNING" in shown and "gpu:3(IDX:" in shown and f"UserId={USER}(" in shown
    assert expand_idx(shown) == access.devices
    out = await eventually(lambda: output_with(backend, "lease-s1", "CVD="), what="the job's output")
    seen = re.search(r"CVD=(\S+)", out).group(1)
    assert access.env == {"CUDA_VISIBLE_DEVICES": seen} and len(seen.split(",")) == 3
    assert "MY_VAR=mine" in out and "agent-secret" not in out  # the workload's env, none of the agent's
    await backend.stop("lease-s1", grace_s=2)
    assert access.job_id not in queued(cluster)
    assert await backend.poll() == []  # released by the agent: not reported as ended by itself


async def test_shares_are_gres_shards_on_one_gpu_with_their_limits(cluster, backend) -> None:
    """Two shares (600 + 400 milli) run at once as gres/shard jobs on one GPU (1,000 shards
    each); each sees a GPU, its shard count and its share's MPS percentage."""
    def share(lease_id: str, milli: int) -> Assignment:
        return msgspec.structs.replace(
            lease(lease_id, process("sh", "-c", "echo CVD=$CUDA_VISIBLE_DEVICES SH=$SLURM_SHARDS_ON_NODE "
                                    "PCT=$CUDA_MPS_ACTIVE_THREAD_PERCENTAGE; exec sleep 600"), units=1),
            milli=milli, sharing="time_slice", memory_mib=81920)

    a = await backend.start(share("lease-sh1", 600))
    b = await backend.start(share("lease-sh2", 400))
    for access, milli in ((a, 600), (b, 400)):
        shown = cluster.run("scontrol", "-d", "-o", "show", "job", access.job_id).stdout
        assert "JobState=RUNNING" in shown and f"GRES=shard:{milli}(IDX:" in shown, shown
        assert access.env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == str(milli // 10) and len(access.devices) == 1
    assert a.devices == b.devices  # Slurm packed both shares on one GPU (1000 shards)
    for lease_id, milli in (("lease-sh1", 600), ("lease-sh2", 400)):
        out = await eventually(lambda lid=lease_id: output_with(backend, lid, "CVD="), what="the share's output")
        assert f"SH={milli} PCT={milli // 10}" in out and re.search(r"CVD=\d", out), out
    await backend.stop("lease-sh1", grace_s=1)
    await backend.stop("lease-sh2", grace_s=1)
    assert queued(cluster) == []


async def test_slurm_script_workload_and_vendor_variables(cluster, backend) -> None:
    script = "#!/bin/sh\n# a comment is fine\necho job on $SLURMD_NODENAME\nexec sleep 600\n"
    access = await backend.start(lease("lease-s2", SlurmWorkload(script=script), units=1, vendor="amd"))
    assert set(access.env) == {"HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"} and len(access.devices) == 1
    await eventually(lambda: output_with(backend, "lease-s2", "job on n1"), what="the script's output")
    await backend.stop("lease-s2", grace_s=1)
    assert access.job_id not in queued(cluster)


async def test_a_job_slurm_kills_is_reported_lost(cluster, backend) -> None:
    access = await backend.start(lease("lease-s3", process("sleep", "600"), units=1))
    cluster.run("scancel", access.job_id)  # Slurm (an operator, a preemption) ends it, not the agent
    done = await ended(backend, "lease-s3")
    assert done.state == "lost" and "CANCELLED" in done.reason
    assert await backend.poll() == []  # reported once


@pytest.mark.slow  # Slurm checks time limits every 30 s: this takes 60-90 s
async def test_a_job_over_its_time_limit_is_killed_by_slurm_and_reported_lost(cluster, backend) -> None:
    short = SlurmBackend(settings(cluster, Path(backend.settings.work_dir).parent, time_margin_s=0))
    ends_soon = Assignment(lease_id="lease-s13", pool_id="pool-s", tenant="ten-s", units=1, devices=(), vendor="nvidia",
                           model="h100-sxm", workload=process("sleep", "600"),
                           expires_at=datetime.now(UTC) + timedelta(seconds=5))
    access = await short.start(ends_soon)
    assert "TimeLimit=00:01:00" in cluster.run("scontrol", "-o", "show", "job", access.job_id).stdout
    done = await ended(short, "lease-s13", timeout=150)
    assert done.state == "lost" and "TIMEOUT" in done.reason


async def test_a_job_that_ends_by_itself_reports_its_exit_code(cluster, backend) -> None:
    await backend.start(lease("lease-s4", process("sh", "-c", "sleep 1; exit 3"), units=1))
    done = await ended(backend, "lease-s4")
    assert (done.state, done.exit_code) == ("exited", 3)


async def test_bad_jobs_fail_with_slurm_reason_and_leave_no_job(cluster, backend) -> None:
    with pytest.raises(StartFailed, match="sbatch refused the job: .*Requested node configuration is not available"):
        await backend.start(lease("lease-s5", process("true"), units=9))
    with pytest.raises(StartFailed, match="#SBATCH"):
        await backend.start(lease("lease-s6", SlurmWorkload(script="#!/bin/sh\n#SBATCH --gres=gpu:8\nsleep 1\n")))
    assert queued(cluster) == []


async def test_a_job_that_stays_pending_fails_with_slurm_reason_and_is_cancelled(cluster, backend) -> None:
    holder = await backend.start(lease("lease-s7", process("sleep", "600"), units=6))
    impatient = SlurmBackend(settings(cluster, Path(backend.settings.work_dir).parent, start_timeout_s=5))
    with pytest.raises(StartFailed, match=r"did not start within 5s \(Slurm's reason: Resources\)"):
        await impatient.start(lease("lease-s8", process("true"), units=4))
    assert queued(cluster) == [holder.job_id]
    await backend.stop("lease-s7", grace_s=1)


async def test_a_start_abandoned_while_pending_leaves_no_job(cluster, backend) -> None:
    holder = await backend.start(lease("lease-s10", process("sleep", "600"), units=6))
    start = asyncio.create_task(backend.start(lease("lease-s11", process("true"), units=4)))
    await eventually(lambda: len(queued(cluster)) == 2, what="the second job pending")
    start.cancel()  # the lease ended while it was provisioning
    with pytest.raises(asyncio.CancelledError):
        await start
    assert queued(cluster) == [holder.job_id]
    await backend.stop("lease-s10", grace_s=1)


async def test_a_start_abandoned_while_sbatch_runs_leaves_no_job(cluster, monkeypatch) -> None:
    """The lease ends while ``sbatch`` is still answering (the job exists in Slurm, its id
    not yet read): the start waits for the id and cancels that job, through a second
    cancellation too (seen once under load: the second job of the test above left pending)."""
    root = open_dir("cb-agent-slurm-slow-")
    gate = root / "gate"
    gate.mkdir()
    gate.chmod(0o777)
    os.mkfifo(gate / "go", 0o666)  # the wrapper blocks reading it until the test writes (60 s at most)
    bin_dir = root / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "sbatch"  # the real sbatch, then an answer held until the test says so
    wrapper.write_text(f"""#!/bin/sh
out=$({shutil.which("sbatch")} "$@"); rc=$?
touch {gate}/submitted
timeout 60 sh -c 'read line < "$0"' {gate}/go
echo "$out"; exit $rc
""")
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    backend = SlurmBackend(settings(cluster, root))
    abandoning = asyncio.Event()  # the start has taken its first cancellation and waits for the job id
    abandon = backend._abandon_submitted

    async def abandon_seen(submit: asyncio.Future, job: object) -> None:
        abandoning.set()
        await abandon(submit, job)

    monkeypatch.setattr(backend, "_abandon_submitted", abandon_seen)

    def release() -> bool:  # writes to the fifo once the wrapper reads it (never blocks)
        try:
            fd = os.open(gate / "go", os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # no reader yet
            return False
        os.write(fd, b"go\n")
        os.close(fd)
        return True

    try:
        before = set(queued(cluster))
        start = asyncio.create_task(backend.start(lease("lease-s12", process("sleep", "600"), units=2)))
        await eventually(lambda: (gate / "submitted").exists(), what="the job submitted, its id not yet answered")
        [job_id] = set(queued(cluster)) - before
        start.cancel()
        await asyncio.wait_for(abandoning.wait(), 10)
        start.cancel()  # and again (the agent shutting down meanwhile): it still waits, then cancels the job
        await eventually(release, what="sbatch's answer released")
        with pytest.raises(asyncio.CancelledError):
            await start
        assert job_id not in queued(cluster)
    finally:
        cluster.run("scancel", "-u", USER, check=False)
        shutil.rmtree(root, ignore_errors=True)


async def test_recovery_adopts_its_jobs_and_leaves_the_others(cluster, backend) -> None:
    await backend.start(lease("lease-s9", process("sleep", "600"), units=1))
    # a job of the same account, named like ours, that this agent did not submit
    other = cluster.run("sbatch", "--parsable", "--job-name=cb-lease-sx", "--gres=gpu:1", f"--uid={USER}",
                        "--chdir=/tmp", "--output=/dev/null", "--wrap", "sleep 600").stdout.strip()
    await eventually(lambda: cluster.run("squeue", "-h", "-j", other, "-o", "%T").stdout.strip() == "RUNNING",
                     what="the other job running")
    # the agent died right after sbatch: its claim is recorded, the job id is not
    claimed = Path(backend.settings.state_dir) / "lease-s12"
    claimed.mkdir()
    (claimed / "job.json").write_text('{"lease_id": "lease-s12", "status": "submitting"}')
    cluster.run("sbatch", "--parsable", "--job-name=cb-lease-s12", "--gres=gpu:1", f"--uid={USER}",
                         "--chdir=/tmp", "--output=/dev/null", "--wrap", "sleep 600").stdout.strip()
    again = SlurmBackend(backend.settings)  # the agent restarted
    assert await again.recover() == ["lease-s9"]
    assert [(e.lease_id, e.state) for e in await again.poll()] == [("lease-s12", "lost")]
    await again.stop("lease-s9", grace_s=1)
    assert sorted(queued(cluster)) == [other]  # its own two are gone, the stranger's is not


def test_missing_slurm_and_root_are_refused(cluster, tmp_path, monkeypatch) -> None:
    with pytest.raises(ValueError, match="refusing to submit jobs as root"):
        SlurmBackend(SlurmSettings(work_dir=str(tmp_path / "j"), state_dir=str(tmp_path / "s"), submit_as="root"))
    with pytest.raises(ValueError, match="refusing to submit jobs as root"):
        SlurmBackend(SlurmSettings(work_dir=str(tmp_path / "j"), state_dir=str(tmp_path / "s")))
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(ValueError, match="missing: sbatch, squeue, scontrol, scancel, srun"):
        SlurmBackend(SlurmSettings(work_dir=str(tmp_path / "j"), state_dir=str(tmp_path / "s"), submit_as=USER))


def test_pure_helpers() -> None:
    assert expand_idx("Nodes=n1 GRES=gpu:3(IDX:0-1,4)") == [0, 1, 4]
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert time_limit(now + timedelta(seconds=61), 0, now) == "2" and time_limit(now, 0, now) == "1"
    assert time_limit(None, 60) is None
    assert directives("#!/bin/sh\n\n#SBATCH -N 4\n# x\necho\n#SBATCH --late") == ["#SBATCH -N 4"]
    assert os.sep == "/"
