"""agent.toml → the process and Slurm backends' settings (pure: no users, no Slurm)."""

from __future__ import annotations

import pytest

from services.agent.backends.build import process_settings, slurm_settings
from services.agent.backends.process import Limits
from services.agent.config import ConfigError, parse

BASE = {"broker_url": "http://127.0.0.1:1", "registry_url": "http://127.0.0.1:2", "key": "k",
        "state_dir": "/srv/agent", "pools": [{"id": "p1", "region": "r", "prices": {"on_demand": "1"}}]}


def test_process_and_slurm_settings_from_the_config() -> None:
    config = parse({**BASE, "process": {"users": ["cbw1", "cbw2"], "limits": {"nofile": 64, "cpu_s": 3600}},
                    "slurm": {"submit_as": "cbslurm", "work_dir": "/shared/cb", "partition": "gpu", "qos": "broker",
                              "gres": "gpu:h100", "start_timeout_s": 60}})
    p = process_settings(config)
    assert (p.users, p.state_dir, p.limits) == (["cbw1", "cbw2"], "/srv/agent/process",
                                                Limits(nofile=64, cpu_s=3600))
    assert p.limits.nproc == 512 and p.path.startswith("/usr/local/bin")
    s = slurm_settings(config)
    assert (s.submit_as, s.work_dir, s.state_dir, s.partition, s.qos, s.gres, s.start_timeout_s) == (
        "cbslurm", "/shared/cb", "/srv/agent/slurm", "gpu", "broker", "gpu:h100", 60)
    assert slurm_settings(parse(BASE)).work_dir == "/srv/agent/slurm-jobs"


@pytest.mark.parametrize(("section", "message"), [
    ({"process": {"limits": {"nfile": 10}}}, r"process\.limits: Object contains unknown field `nfile`"),
    ({"process": {"limits": {"nproc": 0}}}, r"process\.limits\.nproc: Expected `int` >= 1"),
    ({"slurm": {"submit_as": "Bad User"}}, r"slurm\.submit_as: Expected `str` matching"),
])
def test_bad_backend_settings_name_the_field(section, message) -> None:
    with pytest.raises(ConfigError, match=message):
        parse({**BASE, **section})


@pytest.mark.parametrize(("user", "message"), [("root", "never submitted as root"), ("nobody-here", "no such user")])
def test_slurm_submit_as_root_or_missing_is_refused(user, message) -> None:
    import pwd

    from services.agent.config import check

    def lookup(name: str) -> pwd.struct_passwd:
        if name != "root":
            raise KeyError(name)
        return pwd.struct_passwd(("root", "x", 0, 0, "", "/root", "/bin/sh"))

    config = parse({**BASE, "slurm": {"submit_as": user}, "pools": [{**BASE["pools"][0], "backend": "slurm"}]})
    with pytest.raises(ConfigError, match=rf"slurm\.submit_as: .*{message}"):
        check(config, which=lambda name: f"/usr/bin/{name}", lookup_user=lookup)
