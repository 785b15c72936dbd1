"""A real single-node Slurm cluster (Debian's slurmctld + slurmd) for the Slurm backend's tests.

Started in a private folder on free ports, with eight GPUs backed by symlinks to
/dev/null (Slurm 22.05 wants character devices for ``gres/gpu``; with them jobs get
``CUDA_VISIBLE_DEVICES`` as on a real GPU node), each also configured as 1,000
``gres/shard`` (a share of m milli is ``--gres=shard:m``). Auth is ``auth/none``: this cluster is
throw-away, lives for one test session and listens on loopback only.

Missing binaries are an error, not a skip: ``.ci/run`` installs the packages.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from services.cli.servers import free_port

from .helpers import wait_until

BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")
GPUS = 8
SHARDS_PER_GPU = 1000  # one shard = one milli of a GPU (the agent's slurm.shards_per_gpu)
NODE = "n1"

_CONF = """\
ClusterName=cbtest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/slurmd-%n
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu,shard
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=300
KillWait=2
NodeName={node} NodeAddr=127.0.0.1 NodeHostname=localhost CPUs=16 RealMemory=64000 Gres=gpu:{gpus},shard:{shards} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """One slurmctld and one slurmd; ``env`` points the clients at them (``SLURM_CONF``)."""

    def __init__(self) -> None:
        missing = [b for b in BINARIES if shutil.which(b) is None]
        if missing:
            raise RuntimeError(
                f"Slurm is not installed (missing {', '.join(missing)}): install Debian's packages with "
                "`apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge` "
                "(.ci/run does this)")
        # world-readable: slurmd and the jobs' users read the config; tempfile makes it 700
        self.dir = Path(tempfile.mkdtemp(prefix="cb-slurm-"))
        self.dir.chmod(0o755)
        self.conf = self.dir / "etc" / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._procs: list[subprocess.Popen] = []

    def start(self) -> None:
        d = self.dir
        for sub in ("etc", "state", "spool", "run", "log", "dev"):
            (d / sub).mkdir(mode=0o755)
        for i in range(GPUS):
            (d / "dev" / f"gpu{i}").symlink_to("/dev/null")
        self.conf.write_text(_CONF.format(d=d, ctld_port=free_port(), slurmd_port=free_port(),
                                          node=NODE, gpus=GPUS, shards=GPUS * SHARDS_PER_GPU))
        # each GPU also sold as SHARDS_PER_GPU shards (gres/shard; a GPU is taken either as gpu or as shards)
        gres = [f"Name=gpu File={d}/dev/gpu[0-{GPUS - 1}]"]
        gres += [f"Name=shard Count={SHARDS_PER_GPU} File={d}/dev/gpu{i}" for i in range(GPUS)]
        (d / "etc" / "gres.conf").write_text("\n".join(gres) + "\n")
        (d / "etc" / "cgroup.conf").write_text("")
        for argv in (["slurmctld", "-D", "-f", str(self.conf)],
                     ["slurmd", "-D", "-N", NODE, "-f", str(self.conf)]):
            log = open(d / "log" / f"{argv[0]}.out", "wb")
            self._procs.append(subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True))
            log.close()
        try:
            wait_until(lambda: self._node_state() == "idle", timeout=30, what="the Slurm node idle")
        except AssertionError:
            self.stop()
            raise AssertionError(f"Slurm did not come up; logs:\n{self.logs()}") from None

    def _node_state(self) -> str:
        for p in self._procs:
            if p.poll() is not None:
                raise AssertionError(f"{p.args[0]} exited with {p.returncode}:\n{self.logs()}")
        try:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True,
                                 text=True, timeout=3)
        except subprocess.TimeoutExpired:
            return ""
        return out.stdout.strip()

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster (from the tests, as root)."""
        return subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=15, check=check)

    def job_ids(self) -> list[str]:
        return self.run("squeue", "-h", "-o", "%i").stdout.split()

    def logs(self) -> str:
        parts = []
        for f in sorted((self.dir / "log").glob("*")):
            parts.append(f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel every job and wait for the queue to drain before stopping the daemons: a
        running job's slurmstepd outlives slurmd and ignores SIGTERM."""
        if all(p.poll() is None for p in self._procs):
            try:
                self.run("scancel", "--full", "--signal=KILL", "--partition=debug", check=False)
                self.run("scancel", "--partition=debug", check=False)
                wait_until(lambda: not self.job_ids(), timeout=20, what="the Slurm queue empty")
            except (AssertionError, subprocess.SubprocessError):
                pass  # the daemons go below regardless; a stray slurmstepd is swept next
        for p in reversed(self._procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self._procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
