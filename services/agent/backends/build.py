"""``agent.toml`` → the process and Slurm backends' settings: which of the agent's
folders each keeps its records and logs in (``cbroker logs`` reads them from there)."""

from __future__ import annotations

from pathlib import Path

from services.agent.config import AgentConfig

from .process import DEFAULT_PATH, ProcessSettings, log_path
from .slurm import SlurmSettings


def process_settings(config: AgentConfig) -> ProcessSettings:
    p = config.process
    return ProcessSettings(users=list(p.users), work_dir=p.work_dir, state_dir=str(Path(config.state_dir) / "process"),
                           path=p.path or DEFAULT_PATH, limits=p.limits)


def slurm_settings(config: AgentConfig) -> SlurmSettings:
    s = config.slurm
    return SlurmSettings(work_dir=s.work_dir or str(Path(config.state_dir) / "slurm-jobs"),
                         state_dir=str(Path(config.state_dir) / "slurm"), submit_as=s.submit_as, gres=s.gres,
                         partition=s.partition, account=s.account, qos=s.qos, start_timeout_s=s.start_timeout_s,
                         shards_per_gpu=s.shards_per_gpu)


def output_log(config: AgentConfig, lease_id: str) -> Path | None:
    """A lease's output (process or Slurm backend), if this agent has one for it."""
    candidates = [log_path(process_settings(config).state_dir, lease_id),
                  Path(slurm_settings(config).work_dir) / lease_id / "output.log"]
    return next((c for c in candidates if c.exists()), None)
