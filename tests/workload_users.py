"""Dedicated unprivileged users for the agent's workload tests, created when missing.

The process backend starts workloads as other users, so its tests need root (as the
agent does) and a few system users. Neither is skipped around: without them the tests
fail with the reason.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest


def ensure_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    if os.geteuid() != 0:
        pytest.fail(f"the agent's workload tests must run as root (they start workloads as user {name!r}, "
                    "which is missing and cannot be created without root)")
    if shutil.which("useradd") is None:
        pytest.fail(f"user {name!r} is missing and `useradd` is not on PATH to create it")
    done = subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                           "--shell", "/usr/sbin/nologin", name], capture_output=True, text=True)
    if done.returncode != 0 and done.returncode != 9:  # 9: created meanwhile by a parallel run
        pytest.fail(f"could not create user {name!r}: {done.stderr.strip()}")
    return pwd.getpwnam(name)


def ensure_users(*names: str) -> list[pwd.struct_passwd]:
    if os.geteuid() != 0:
        pytest.fail("the agent's workload tests must run as root, as the agent does: it starts workloads as "
                    f"its dedicated users ({', '.join(names)})")
    return [ensure_user(n) for n in names]


def open_dir(prefix: str) -> Path:
    """A temp folder other users can enter (pytest's own are 700 all the way down)."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    d.chmod(0o755)
    return d
