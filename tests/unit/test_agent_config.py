"""agent.toml: a bad config is one line naming the field, before anything starts."""

from __future__ import annotations

import json
import os
import pwd
from pathlib import Path

import msgspec
import pytest

from services.agent import config as agent_config
from services.agent.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CATALOGUE = {m["model"]: m for m in json.loads(
    (ROOT / "services" / "registry" / "domain" / "accelerators.json").read_text())}

GOOD = """
broker_url = "http://127.0.0.1:8082"
registry_url = "http://127.0.0.1:8081"
key_file = "{key}"
heartbeat_s = 5

[process]
users = ["cbwork1", "cbwork2"]

[discovery]
mode = "static"
[[discovery.static]]
model = "nvidia-h100-sxm-80gb"
indices = [0, 1, 2, 3]

[[pools]]
id = "acme-h100-a"
region = "eu-west"
model = "nvidia-h100-sxm-80gb"
devices = [0, 1]
prices = {{ on_demand = "2.50" }}

[[pools]]
id = "acme-h100-b"
region = "eu-west"
model = "nvidia-h100-sxm-80gb"
devices = [2, 3]
backend = "slurm"
prices = {{ on_demand = "2.10", interruptible = "0.90" }}
"""


def fake_user(name: str) -> pwd.struct_passwd:
    users = {"cbwork1": 1500, "cbwork2": 1501, "root": 0}
    if name not in users:
        raise KeyError(name)
    return pwd.struct_passwd((name, "x", users[name], users[name], "", "/nonexistent", "/usr/sbin/nologin"))


def all_binaries(name: str) -> str | None:
    return f"/usr/bin/{name}"


def write(tmp_path: Path, text: str, *, key_mode: int = 0o600) -> Path:
    key = tmp_path / "agent.key"
    key.write_text("cbk_provider_secret\n")
    os.chmod(key, key_mode)
    path = tmp_path / "agent.toml"
    path.write_text(text.format(key=key))
    return path


def load(path: Path, **kwargs):
    kwargs.setdefault("catalogue", CATALOGUE)
    kwargs.setdefault("which", all_binaries)
    kwargs.setdefault("lookup_user", fake_user)
    return agent_config.load(path, **kwargs)


def test_good_config_loads_into_a_frozen_struct(tmp_path):
    config = load(write(tmp_path, GOOD))
    assert config.api_key() == "cbk_provider_secret"
    assert [(p.id, p.backend, p.devices) for p in config.pools] == [
        ("acme-h100-a", "process", [0, 1]), ("acme-h100-b", "slurm", [2, 3])]
    spec = config.pools[1].spec("nvidia-h100-sxm-80gb", 2)
    assert (spec.model, spec.units, spec.delivery, str(spec.prices.interruptible)) == (
        "nvidia-h100-sxm-80gb", 2, ("slurm",), "0.90")
    with pytest.raises(AttributeError):
        config.heartbeat_s = 1  # frozen


@pytest.mark.parametrize(("change", "message"), [
    (('model = "nvidia-h100-sxm-80gb"\ndevices = [0, 1]', 'model = "h100"\ndevices = [0, 1]'),
     "pools[0].model: unknown model 'h100' (see GET /v1/accelerators)"),
    (('"cbwork2"]', '"root"]'),
     "process.users[1]: 'root' is root: workloads are untrusted code and never run as root"),
    (('"cbwork2"]', '"nosuchuser"]'), "process.users[1]: no such user 'nosuchuser'"),
    (('"cbwork2"]', '"cbwork1"]'), "process.users: a user is listed twice"),
    (("devices = [2, 3]", "devices = [1, 3]"), "pools[1].devices: device 1 is already sold by pool 'acme-h100-a'"),
    (('id = "acme-h100-b"', 'id = "acme-h100-a"'), "pools[1].id: pool id 'acme-h100-a' is used twice"),
    (("heartbeat_s = 5", 'heartbeat_s = "often"'), "heartbeat_s: Expected `float`, got `str`"),
    (("heartbeat_s = 5", "heartbeat_s = 5\nheartbeat = 5"), "Object contains unknown field `heartbeat`"),
    (('backend = "slurm"', 'backend = "lsf"'), "pools[1].backend: Invalid enum value 'lsf'"),
    (('registry_url = "http://127.0.0.1:8081"', 'registry_url = "127.0.0.1:8081"'), "registry_url: Expected `str` matching"),
    (('backend = "slurm"', 'backend = "slurm"\ndelivery = ["container"]'),
     "pools[1].delivery: the slurm backend cannot deliver 'container'"),
    (('model = "nvidia-h100-sxm-80gb"\nindices', 'model = "nope"\nindices'), "discovery.static[0].model: unknown model 'nope'"),
])
def test_bad_config_is_one_line_naming_the_field(tmp_path, change, message):
    old, new = change
    assert old in GOOD
    with pytest.raises(ConfigError) as caught:
        load(write(tmp_path, GOOD.replace(old, new, 1)))
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith(str(tmp_path / "agent.toml") + ": ")
    assert message in text, text


def test_slurm_pool_without_sbatch_on_path(tmp_path):
    def no_sbatch(name: str) -> str | None:
        return None if name == "sbatch" else f"/usr/bin/{name}"

    with pytest.raises(ConfigError, match=r"pools\[1\]\.backend: slurm needs 'sbatch' on PATH and it is not there"):
        load(write(tmp_path, GOOD), which=no_sbatch)


def test_key_file_readable_by_others_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="key_file: .* is readable by others; chmod 600 it"):
        load(write(tmp_path, GOOD, key_mode=0o644))


def test_key_and_key_file_together_or_neither(tmp_path):
    with pytest.raises(ConfigError, match="key: give exactly one of key and key_file"):
        load(write(tmp_path, GOOD.replace('key_file = "{key}"', 'key_file = "{key}"\nkey = "cbk_x"')))
    with pytest.raises(ConfigError, match="key: give exactly one of key and key_file"):
        load(write(tmp_path, GOOD.replace('key_file = "{key}"', "")))


def test_process_pool_without_a_user(tmp_path):
    with pytest.raises(ConfigError, match="process.users: the process backend needs unprivileged users"):
        load(write(tmp_path, GOOD.replace('[process]\nusers = ["cbwork1", "cbwork2"]', "")))


def test_not_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(write(tmp_path, GOOD + "\n[[pools]\n"))
    with pytest.raises(ConfigError, match="no such file"):
        load(tmp_path / "absent.toml")


def test_real_root_user_is_refused_with_the_system_user_database(tmp_path):
    # no lookup override: the host's own user database says root is uid 0
    with pytest.raises(ConfigError, match="'root' is root"):
        agent_config.load(write(tmp_path, GOOD.replace('users = ["cbwork1", "cbwork2"]', 'users = ["root"]')),
                          catalogue=CATALOGUE, which=all_binaries)


SHARED = GOOD.replace('devices = [0, 1]\n', 'devices = [0, 1]\nsharing = {{ mode = "time_slice", min_milli = 250 }}\n', 1)


def test_a_sharing_pool_registers_its_sharing(tmp_path):
    config = load(write(tmp_path, SHARED))
    spec = config.pools[0].spec("nvidia-h100-sxm-80gb", 2)
    assert (spec.sharing.mode, spec.sharing.min_milli) == ("time_slice", 250)
    wire = msgspec.json.decode(msgspec.json.encode(spec))
    assert wire["sharing"] == {"mode": "time_slice", "min_milli": 250, "max_milli": 1000}  # the PUT /v1/pools body carries it
    assert config.pools[1].spec("nvidia-h100-sxm-80gb", 2).sharing.mode == "none"  # the default: whole devices


@pytest.mark.parametrize(("change", "message"), [
    (('mode = "time_slice"', 'mode = "mps"'), "pools[0].sharing.mode: Invalid enum value 'mps'"),
    (("min_milli = 250", "min_milli = 0"), "pools[0].sharing.min_milli: Expected `int` >= 1"),
    (("min_milli = 250", "min_milli = 250, slices = 4"), "Object contains unknown field `slices`"),
    (("devices = [0, 1]\nsharing", "units = 1025\ndevices = [0, 1]\nsharing"),
     "pools[0].units: 1025 units but only 2 devices listed"),
])
def test_bad_sharing_is_one_line_naming_the_field(tmp_path, change, message):
    old, new = change
    assert old in SHARED
    with pytest.raises(ConfigError) as caught:
        load(write(tmp_path, SHARED.replace(old, new, 1)))
    assert message in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


def test_a_sharing_pool_has_at_most_max_shared_units_devices(tmp_path):
    many = SHARED.replace("devices = [0, 1]\nsharing", "units = 1025\nsharing", 1)
    with pytest.raises(ConfigError, match=r"pools\[0\]\.sharing: a sharing pool has at most 1024 devices; this one has 1025"):
        load(write(tmp_path, many))
    load(write(tmp_path, many.replace("units = 1025", "units = 1024")))  # the limit itself is fine


def test_a_slurm_sharing_pool_needs_shards_that_can_hold_its_smallest_share(tmp_path):
    slurm = GOOD.replace('backend = "slurm"', 'backend = "slurm"\nsharing = {{ mode = "time_slice", min_milli = 100 }}')
    with pytest.raises(ConfigError, match=r"pools\[1\]\.sharing: the slurm backend sells shares as gres/shard: set "
                                          r"slurm\.shards_per_gpu"):
        load(write(tmp_path, slurm))
    coarse = slurm.replace("[process]", "[slurm]\nshards_per_gpu = 8\n\n[process]")
    with pytest.raises(ConfigError, match="min_milli 100 is less than one of slurm.shards_per_gpu = 8 shards per GPU; "
                                          "raise min_milli to at least 125"):
        load(write(tmp_path, coarse))
    config = load(write(tmp_path, coarse.replace("min_milli = 100", "min_milli = 125")))
    assert config.slurm.shards_per_gpu == 8 and config.pools[1].sharing.min_milli == 125
