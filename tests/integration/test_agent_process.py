"""The ``process`` backend on this host, as root like the agent: real workloads run as the
dedicated users, see exactly their devices, cannot read the agent's key or another
lease's files, and leave nothing running after their lease."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import msgspec
import psutil
import pytest

from services.agent.backends.base import Assignment, Ended, StartFailed
from services.agent.backends.process import Limits, ProcessBackend, ProcessSettings
from services.agent.backends.uid_sweep import kill_uid, processes_of
from services.common.delivery import ProcessWorkload

from ..helpers import eventually, wait_until
from ..workload_users import ensure_users, open_dir

USERS = ("cbroker-w0", "cbroker-w1", "cbroker-w2", "cbroker-w3")


@pytest.fixture(scope="module")
def users():
    return ensure_users(*USERS)


@pytest.fixture
def dirs(users) -> Iterator[tuple[Path, Path]]:
    root = open_dir("cb-agent-proc-")
    yield root / "work", root / "state"
    for u in users:  # a failed test must not leave workloads behind for the next
        wait_until(lambda u=u: _sweep(u.pw_uid, u.pw_gid), what="test users' processes gone")
    shutil.rmtree(root, ignore_errors=True)


def _sweep(uid: int, gid: int) -> bool:
    from services.agent.backends.uid_sweep import signal_uid
    if processes_of(uid):
        signal_uid(uid, gid, signal.SIGKILL)
    return not processes_of(uid)


def settings(dirs: tuple[Path, Path], users: tuple[str, ...] = USERS[:3], **over) -> ProcessSettings:
    return ProcessSettings(users=list(users), work_dir=str(dirs[0]), state_dir=str(dirs[1]), **over)


def lease(lease_id: str, command: list[str], devices: tuple[int, ...] = (0,), vendor: str = "nvidia",
          env: dict[str, str] | None = None) -> Assignment:
    return Assignment(lease_id=lease_id, pool_id="pool-a", tenant="ten-a", units=len(devices), devices=devices,
                      vendor=vendor, model="h100-sxm", workload=ProcessWorkload(command=command, env=env or {}))


def output(backend: ProcessBackend, lease_id: str) -> str:
    path = backend.log_path(lease_id)
    return path.read_text() if path.exists() else ""


async def ended(backend: ProcessBackend, lease_id: str, timeout: float = 10) -> Ended:
    seen: list[Ended] = []

    async def check() -> Ended | None:
        seen.extend(await backend.poll())
        return next((e for e in seen if e.lease_id == lease_id), None)

    return await eventually(check, timeout=timeout, what=f"{lease_id} reported ended")


def env_of(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


async def test_command_sees_exactly_its_devices_and_a_scrubbed_environment(dirs, monkeypatch) -> None:
    monkeypatch.setenv("CB_AGENT_KEY", "agent-secret-0123")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "provider-secret-4567")
    backend = ProcessBackend(settings(dirs))
    access = await backend.start(lease("lease-env", ["env"], devices=(1, 3),
                                       env={"MY_VAR": "x", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}))
    assert access.devices == [1, 3] and access.env == {"CUDA_VISIBLE_DEVICES": "1,3"}
    done = await ended(backend, "lease-env")
    assert (done.state, done.exit_code) == ("exited", 0)
    seen = env_of(output(backend, "lease-env"))
    assert seen["CUDA_VISIBLE_DEVICES"] == "1,3"  # the tenant's own value cannot widen it
    assert set(seen) == {"PATH", "HOME", "LANG", "TMPDIR", "MY_VAR", "CUDA_VISIBLE_DEVICES"}
    text = output(backend, "lease-env")
    assert "agent-secret" not in text and "provider-secret" not in text


@pytest.mark.parametrize("mode, limits", [
    ("time_slice", {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "25", "CUDA_DEVICE_SM_LIMIT": "25"}),
    ("memory", {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "25", "CUDA_DEVICE_SM_LIMIT": "25",
                "CUDA_DEVICE_MEMORY_LIMIT_0": "6144m"}),
])
async def test_a_share_sees_its_one_device_and_its_share_limits(dirs, mode, limits) -> None:
    """A 250-milli share of device 3 (of an L4, 24 GiB): the command sees device 3 only and
    the variables MPS and HAMi-core read; the tenant's env cannot raise them."""
    backend = ProcessBackend(settings(dirs))
    share = msgspec.structs.replace(
        lease("lease-share", ["env"], devices=(3,), env={"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "100",
                                                         "CUDA_DEVICE_MEMORY_LIMIT_0": "24g"}),
        milli=250, sharing=mode, memory_mib=24576)
    access = await backend.start(share)
    assert access.devices == [3] and access.env == {"CUDA_VISIBLE_DEVICES": "3"} | limits
    done = await ended(backend, "lease-share")
    assert (done.state, done.exit_code) == ("exited", 0)
    seen = env_of(output(backend, "lease-share"))
    assert seen["CUDA_VISIBLE_DEVICES"] == "3"
    assert {k: seen[k] for k in limits} == limits
    if mode == "time_slice":  # memory is not partitioned: the tenant's own value stays, nothing of ours
        assert seen["CUDA_DEVICE_MEMORY_LIMIT_0"] == "24g"


async def test_amd_gets_both_of_its_visibility_variables(dirs) -> None:
    backend = ProcessBackend(settings(dirs))
    await backend.start(lease("lease-amd", ["env"], devices=(2,), vendor="amd"))
    await ended(backend, "lease-amd")
    seen = env_of(output(backend, "lease-amd"))
    assert seen["HIP_VISIBLE_DEVICES"] == seen["ROCR_VISIBLE_DEVICES"] == "2"
    assert "CUDA_VISIBLE_DEVICES" not in seen


async def test_workload_runs_as_its_user_in_its_own_session_with_limits(dirs, users) -> None:
    backend = ProcessBackend(settings(dirs, limits=Limits(nofile=64, nproc=40)))
    access = await backend.start(lease("lease-id", ["bash", "-c", "id -u; pwd; ulimit -n; ulimit -u; "
                                                    "cut -d' ' -f6 /proc/$$/stat; echo pid=$$"]))
    await ended(backend, "lease-id")
    text = output(backend, "lease-id")
    assert len(text.split()) == 6, text
    uid_line, cwd, nofile, nproc, sid, pid = text.split()
    assert access.user in USERS and int(uid_line) == next(u.pw_uid for u in users if u.pw_name == access.user)
    assert cwd == str(backend.workdir("lease-id")) and (nofile, nproc) == ("64", "40")
    assert sid == pid.removeprefix("pid=")  # a session (and process group) of its own


async def test_workload_cannot_read_the_agent_key_nor_another_lease_folder(dirs) -> None:
    keys = open_dir("cb-agent-key-")
    (keys / "agent.key").write_text("agent-secret-key-89ab")
    (keys / "agent.key").chmod(0o600)
    (keys / "public.txt").write_text("public-text")
    (keys / "public.txt").chmod(0o644)
    backend = ProcessBackend(settings(dirs))
    try:
        await backend.start(lease("lease-a", ["sh", "-c", "echo secret-of-a > mine.txt; cat mine.txt; exec sleep 600"]))
        await eventually(lambda: "secret-of-a" in output(backend, "lease-a"), what="lease a wrote its file")
        a_dir = backend.workdir("lease-a")
        await backend.start(lease("lease-b", ["sh", "-c", f"cat {keys}/public.txt; echo; cat {keys}/agent.key; "
                                                          f"echo key=$?; ls {a_dir}; cat {a_dir}/mine.txt; "
                                                          f"echo other=$?; cat {backend.log_path('lease-a')}; "
                                                          "echo log=$?"], devices=(1,)))
        done = await ended(backend, "lease-b")
        text = output(backend, "lease-b")
        assert done.exit_code == 0
        assert "public-text" in text  # it can read what is meant for everyone: the denials below are real
        assert "key=1" in text and "other=1" in text and "log=1" in text and "Permission denied" in text
        assert "agent-secret-key" not in text and "secret-of-a" not in text
    finally:
        await backend.stop("lease-a", 1)
        shutil.rmtree(keys)


async def test_a_workload_that_never_exits_is_gone_after_stop_with_every_child(dirs) -> None:
    backend = ProcessBackend(settings(dirs))
    # ignores SIGTERM; one child in its group, one in a new session, one double-forked daemon
    script = ("trap '' TERM; sleep 1001 & setsid sleep 1002 & sh -c 'setsid sleep 1003 &' & exec sleep 1004")
    access = await backend.start(lease("lease-stuck", ["sh", "-c", script]))
    uid = psutil.Process(int(access.note.split()[1])).uids().real
    procs = await eventually(lambda: [p for p in processes_of(uid) if p.name() == "sleep"] if
                             len([p for p in processes_of(uid) if p.name() == "sleep"]) == 4 else None,
                             what="the workload and its three sleeps")
    leader = int(access.note.split()[1])
    assert any(os.getsid(p.pid) != leader for p in procs)  # some did leave the lease's session
    await backend.stop("lease-stuck", grace_s=0.5)
    assert processes_of(uid) == []
    assert not [p for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [""])[-1:] in
                (["1001"], ["1002"], ["1003"], ["1004"])]
    assert not backend.workdir("lease-stuck").exists()
    assert await backend.poll() == []  # stopped by the agent: not reported as ended by itself


async def test_exit_is_reported_with_its_code_and_leftover_children_die_with_it(dirs) -> None:
    backend = ProcessBackend(settings(dirs))
    access = await backend.start(lease("lease-exit", ["sh", "-c", "setsid sleep 1005 & echo left > /tmp/cb-left-exit; "
                                                      "echo bye; exit 7"]))
    done = await ended(backend, "lease-exit")
    assert (done.state, done.exit_code) == ("exited", 7) and "bye" in output(backend, "lease-exit")
    assert not Path("/tmp/cb-left-exit").exists()  # the next lease given this user must not find it
    uid = __import__("pwd").getpwnam(access.user).pw_uid
    assert processes_of(uid) == []


async def test_nonexistent_command_fails_with_the_reason_and_leaves_nothing(dirs) -> None:
    backend = ProcessBackend(settings(dirs, users=USERS[:1]))
    with pytest.raises(StartFailed, match="command not found: no-such-command-cb"):
        await backend.start(lease("lease-nocmd", ["no-such-command-cb", "x"]))
    assert not backend.workdir("lease-nocmd").exists()
    # its one user is free again
    await backend.start(lease("lease-after", ["true"]))
    assert (await ended(backend, "lease-after")).exit_code == 0


async def test_no_free_user_and_wrong_workloads_fail_with_the_reason(dirs) -> None:
    backend = ProcessBackend(settings(dirs, users=USERS[:1]))
    await backend.start(lease("lease-one", ["sleep", "600"]))
    try:
        with pytest.raises(StartFailed, match="no free workload user"):
            await backend.start(lease("lease-two", ["true"], devices=(1,)))
        with pytest.raises(StartFailed, match="vendor 'acme'"):
            await backend.start(lease("lease-three", ["true"], vendor="acme"))
    finally:
        await backend.stop("lease-one", 1)


def test_root_and_the_agent_user_are_refused_as_workload_users(dirs) -> None:
    with pytest.raises(ValueError, match="refusing to run workloads as 'root'"):
        ProcessBackend(settings(dirs, users=("root",)))
    with pytest.raises(ValueError, match="does not exist"):
        ProcessBackend(settings(dirs, users=("no-such-user-cb",)))


async def test_recovery_adopts_its_own_workloads_and_kills_nothing_else(dirs, users) -> None:
    first = ProcessBackend(settings(dirs))
    kept = await first.start(lease("lease-kept", ["sleep", "600"]))
    died = await first.start(lease("lease-died", ["sleep", "601"], devices=(1,)))
    os.kill(int(died.note.split()[1]), signal.SIGKILL)
    bystander = subprocess.Popen(["sleep", "602"])  # root's: not the agent's
    stranger = subprocess.Popen(["sleep", "603"], user=USERS[3])  # a workload user's, but not started by us
    forged_state = {"lease_id": "lease-forged", "user": USERS[2], "uid": users[2].pw_uid, "gid": users[2].pw_gid,
                    "devices": [2], "status": "running", "pid": bystander.pid, "create_time": 1.0}
    (dirs[1] / "lease-forged").mkdir()
    (dirs[1] / "lease-forged" / "state.json").write_bytes(msgspec.json.encode(forged_state))
    try:
        second = ProcessBackend(settings(dirs, users=USERS))  # the agent restarted: `first` is gone
        assert sorted(await second.recover()) == ["lease-kept"]
        gone = {e.lease_id: e for e in await second.poll()}
        assert set(gone) == {"lease-died", "lease-forged"} and gone["lease-died"].state == "exited"
        assert bystander.poll() is None and stranger.poll() is None
        # a user running processes the agent did not start is neither used nor killed
        for n in range(2):
            await second.start(lease(f"lease-new{n}", ["sleep", "600"], devices=(3 + n,)))
        with pytest.raises(StartFailed, match="cbroker-w3 run processes the agent did not start"):
            await second.start(lease("lease-new2", ["true"], devices=(5,)))
        kept_pid = int(kept.note.split()[1])
        await second.stop("lease-kept", 1)
        assert not psutil.pid_exists(kept_pid) or psutil.Process(kept_pid).status() == psutil.STATUS_ZOMBIE
        for n in range(2):
            await second.stop(f"lease-new{n}", 1)
        assert stranger.poll() is None and bystander.poll() is None
    finally:
        for p in (bystander, stranger):
            p.kill()
            p.wait()
        await kill_uid(users[3].pw_uid, users[3].pw_gid, 0)


async def test_a_forking_workload_at_its_process_limit_is_stopped_whole(dirs) -> None:
    backend = ProcessBackend(settings(dirs, limits=Limits(nproc=40)))
    access = await backend.start(lease("lease-forks", ["sh", "-c", "while :; do setsid sleep 1000 & done"]))
    uid = __import__("pwd").getpwnam(access.user).pw_uid
    await eventually(lambda: len(processes_of(uid)) >= 30, what="the workload near its process limit")
    await backend.stop("lease-forks", grace_s=0.2)
    assert processes_of(uid) == []
