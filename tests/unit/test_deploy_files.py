"""Consistency of the deployment files with the code (no Docker engine needed).

docker-compose.yml, Dockerfile, .dockerignore, deploy/ and docs/deployment.md are
checked against ``services.common.settings.Settings``: every variable a service is
given is a real setting, ports agree everywhere, the URLs point at the compose
services, NATS runs JetStream durably and Redis never evicts.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import threading
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from services.common.settings import Settings, env_name, settings_from_env

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
NATS_CONF = ROOT / "deploy" / "nats" / "nats.conf"
REDIS_CONF = ROOT / "deploy" / "redis" / "redis.conf"
HEALTHCHECK = ROOT / "deploy" / "docker" / "healthcheck.py"
DOCS = ROOT / "docs" / "deployment.md"

DEFAULTS = Settings()
# registry -> registry_port, broker -> broker_port, meter -> meter_port
PORT_FIELDS = {f.removesuffix("_port"): f for f in Settings.__struct_fields__ if f.endswith("_port")}
APP_SERVICES = sorted(PORT_FIELDS)
SETTING_NAMES = {env_name(f) for f in Settings.__struct_fields__} | {"CB_PORT"}
SAMPLE = {"CB_ADMIN_KEY": "admin-sample-key-0123456789"}


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), "compose has no services"
    return data


def _service(compose: Mapping[str, Any], name: str) -> dict[str, Any]:
    assert name in compose["services"], f"compose has no service {name!r}"
    return compose["services"][name]


def _argv(command: str | list[str] | None) -> list[str]:
    if command is None:
        return []
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def _environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # ["NAME=value", ...]
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


_VAR = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}")


def interpolate(value: str, environ: Mapping[str, str]) -> str:
    """Compose's ``${NAME}``, ``${NAME:-default}``, ``${NAME:?error}`` and ``$$``."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group("name"), m.group("op"), m.group("arg") or ""
        present = name in environ and (environ[name] != "" or not (op or "").startswith(":"))
        if op in ("?", ":?") and not present:
            raise KeyError(f"{name}: {arg}")
        if op in ("-", ":-") and not present:
            return arg
        if op in ("+", ":+"):
            return arg if present else ""
        return environ.get(name, "")

    return _VAR.sub(sub, value)


def _published(entry: str | int | Mapping[str, Any]) -> tuple[int, int]:
    """(published, target) of a compose port entry, short or long syntax."""
    if isinstance(entry, Mapping):
        return int(entry["published"]), int(entry["target"])
    parts = str(entry).split("/")[0].split(":")
    assert len(parts) >= 2, f"port {entry!r} is not published on the host"
    return int(parts[-2]), int(parts[-1])


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [ln for ln in DOCKERFILE.read_text(encoding="utf-8").splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            instr, _, args = line.strip().partition(" ")
            out.append((instr.upper(), args.strip()))
    return out


def _conf_lines(path: Path) -> list[str]:
    return [ln.split("#", 1)[0].strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.split("#", 1)[0].strip()]


def _nats_conf() -> str:
    return "\n".join(_conf_lines(NATS_CONF))


def _redis_conf() -> dict[str, str]:
    conf = {}
    for line in _conf_lines(REDIS_CONF):
        key, _, value = line.partition(" ")
        conf[key.lower()] = value.strip()
    return conf


def _load_healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cb_healthcheck", HEALTHCHECK)
    assert spec and spec.loader, f"cannot load {HEALTHCHECK}"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- compose


def test_compose_has_infrastructure_and_every_service(compose: dict[str, Any]) -> None:
    services = set(compose["services"])
    assert {"nats", "redis", "registry"} <= services
    # one compose service per service that has a port setting (broker/meter profiled)
    assert set(APP_SERVICES) <= services, f"missing {set(APP_SERVICES) - services}"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_service_runs_the_image_with_its_module(compose: dict[str, Any], name: str) -> None:
    svc = _service(compose, name)
    assert _argv(svc.get("command")) == ["python", "-m", f"services.{name}"]
    build = svc.get("build")
    context = build.get("context", ".") if isinstance(build, Mapping) else build
    assert context in (".", "./"), f"{name} is not built from the project's Dockerfile"
    if name == "registry":
        assert not svc.get("profiles"), "registry must start by default"
    else:  # not implemented yet: only with --profile full
        assert svc.get("profiles") == ["full"]


@pytest.mark.parametrize("name", APP_SERVICES)
def test_service_environment_names_are_settings(compose: dict[str, Any], name: str) -> None:
    env = _environment(_service(compose, name))
    assert env, f"{name} has no environment"
    unknown = sorted(set(env) - SETTING_NAMES)
    assert not unknown, f"{name}: {unknown} are not settings (known: {sorted(SETTING_NAMES)})"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_published_port_is_the_env_port_and_the_default(compose: dict[str, Any], name: str) -> None:
    svc = _service(compose, name)
    field = PORT_FIELDS[name]
    env = _environment(svc)
    port = int(interpolate(env.get("CB_PORT") or env[env_name(field)], SAMPLE))
    assert port == getattr(DEFAULTS, field), f"{name} listens on {port}, the default is {getattr(DEFAULTS, field)}"
    published = [_published(p) for p in svc.get("ports", [])]
    assert published == [(port, port)], f"{name} publishes {published}, listens on {port}"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_urls_point_at_the_compose_servers(compose: dict[str, Any], name: str) -> None:
    env = _environment(_service(compose, name))
    nats = urlsplit(interpolate(env["NATS_URL"], SAMPLE))
    redis = urlsplit(interpolate(env["REDIS_URL"], SAMPLE))
    assert (nats.scheme, nats.hostname, nats.port) == ("nats", "nats", _nats_client_port())
    assert (redis.scheme, redis.hostname, redis.port) == ("redis", "redis", int(_redis_conf()["port"]))
    assert "nats" in compose["services"] and "redis" in compose["services"]
    # a service in a container must listen beyond its own loopback
    assert interpolate(env.get("CB_HOST", DEFAULTS.host), SAMPLE) == "0.0.0.0"


def _nats_client_port() -> int:
    m = re.search(r"^listen\s*[:=]?\s*(?:[\w.]*:)?(\d+)\s*$", _nats_conf(), re.M)
    return int(m.group(1)) if m else 4222


@pytest.mark.parametrize("name", APP_SERVICES)
def test_services_wait_for_healthy_nats_and_redis(compose: dict[str, Any], name: str) -> None:
    depends = _service(compose, name).get("depends_on")
    assert isinstance(depends, Mapping), f"{name}: depends_on must be the long form with conditions"
    for server in ("nats", "redis"):
        assert depends.get(server, {}).get("condition") == "service_healthy", f"{name} does not wait for {server}"
        assert _service(compose, server).get("healthcheck", {}).get("test"), f"{server} has no healthcheck"


def test_nats_runs_jetstream_with_the_config_and_a_named_volume(compose: dict[str, Any]) -> None:
    nats = _service(compose, "nats")
    argv = _argv(nats.get("command"))
    assert "-js" in argv or "--jetstream" in argv
    assert "-m" in argv and argv[argv.index("-m") + 1] == "8222"
    # the config file mounted is the one in deploy/
    config = argv[argv.index("--config") + 1] if "--config" in argv else argv[argv.index("-c") + 1]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in nats.get("volumes", [])}
    assert (ROOT / mounts[config]).resolve() == NATS_CONF.resolve()
    # nats-server refuses a store dir given both as a flag and in the file
    store_dir = re.search(r"^store_dir\s*[:=]\s*\"?([^\"\s]+)", _nats_conf(), re.M)
    assert store_dir, "nats.conf sets no store_dir"
    assert "-sd" not in argv and "--store_dir" not in argv, "store_dir is in nats.conf; -sd would stop nats-server"
    # ... and that directory is a named volume, not the container's writable layer
    volume = mounts.get(store_dir.group(1))
    assert volume in (compose.get("volumes") or {}), f"{store_dir.group(1)} is not on a named volume"


def test_nats_healthcheck_asks_for_jetstream_with_a_tool_the_image_has(compose: dict[str, Any]) -> None:
    nats = _service(compose, "nats")
    test = " ".join(_argv(nats["healthcheck"]["test"]))
    assert "8222/healthz?js-enabled-only=true" in test
    if "wget" in test or "CMD-SHELL" in test:  # the scratch-based image has neither
        assert nats["image"].startswith("nats:2.10") and "alpine" in nats["image"]


def test_redis_keeps_nothing_and_answers_ping(compose: dict[str, Any]) -> None:
    redis = _service(compose, "redis")
    assert redis["image"].startswith("redis:7")
    argv = _argv(redis.get("command"))
    assert argv[argv.index("--save") + 1] == ""
    assert argv[argv.index("--appendonly") + 1] == "no"
    assert _argv(redis["healthcheck"]["test"])[-2:] == ["redis-cli", "ping"]
    mounted = [m.split(":") for m in redis.get("volumes", [])]
    conf = [src for src, dst, *_ in mounted if dst in argv]
    assert conf and (ROOT / conf[0]).resolve() == REDIS_CONF.resolve(), "redis does not load deploy/redis/redis.conf"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_compose_environment_parses_into_settings(compose: dict[str, Any], name: str) -> None:
    env = {k: interpolate(v, SAMPLE) for k, v in _environment(_service(compose, name)).items()}
    settings = settings_from_env(environ=env)  # msgspec.convert: raises on a bad value
    assert getattr(settings, PORT_FIELDS[name]) == getattr(DEFAULTS, PORT_FIELDS[name])
    assert settings.nats_url == "nats://nats:4222"
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.host == "0.0.0.0"
    assert settings.admin_key == SAMPLE["CB_ADMIN_KEY"]
    assert settings.heartbeat_ttl_s == DEFAULTS.heartbeat_ttl_s


def test_admin_key_is_required(compose: dict[str, Any]) -> None:
    raw = _environment(_service(compose, "registry"))["CB_ADMIN_KEY"]
    with pytest.raises(KeyError):
        interpolate(raw, {})
    assert interpolate(raw, SAMPLE) == SAMPLE["CB_ADMIN_KEY"]


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_installs_the_project_as_non_root() -> None:
    instructions = _dockerfile()
    froms = [args.split()[0] for instr, args in instructions if instr == "FROM"]
    assert froms and all(f == "python:3.11-slim" for f in froms)
    assert any(instr == "RUN" and re.search(r"\bpip install \.(\s|$)", args) for instr, args in instructions)
    users = [args for instr, args in instructions if instr == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    cmd = [args for instr, args in instructions if instr == "CMD"]
    assert cmd and re.search(r'"python",\s*"-m",\s*"services\.\w+"', cmd[-1])


def test_dockerfile_exposes_the_default_ports() -> None:
    exposed = {int(p.split("/")[0]) for instr, args in _dockerfile() if instr == "EXPOSE" for p in args.split()}
    assert exposed == {getattr(DEFAULTS, f) for f in PORT_FIELDS.values()}


def test_dockerfile_healthcheck_gets_health_with_urllib() -> None:
    checks = [args for instr, args in _dockerfile() if instr == "HEALTHCHECK"]
    assert len(checks) == 1, "one HEALTHCHECK"
    cmd = re.search(r"\bCMD\s+(\[.*\])\s*$", checks[0])
    assert cmd, "HEALTHCHECK CMD must be the exec form"
    argv = json.loads(cmd.group(1))
    assert argv[0] == "python" and argv[-1] == "/health", argv
    script = argv[1]
    copied = [args.split() for instr, args in _dockerfile() if instr == "COPY"]
    assert ["deploy/docker/healthcheck.py", script] in copied, f"{script} is not the copied healthcheck"
    source = HEALTHCHECK.read_text(encoding="utf-8")
    assert "urllib.request" in source and "curl" not in re.sub(r"#.*|\"\"\"[\s\S]*?\"\"\"", "", source)


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    candidates = [path] + ["/".join(path.split("/")[:i]) for i in range(1, path.count("/") + 1)]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        rx = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                rx, i = rx + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                rx, i = rx + ".*", i + 2
            elif pattern[i] == "*":
                rx, i = rx + "[^/]*", i + 1
            elif pattern[i] == "?":
                rx, i = rx + "[^/]", i + 1
            elif pattern[i] == "[":
                j = pattern.index("]", i)
                rx, i = rx + pattern[i : j + 1], j + 1
            else:
                rx, i = rx + re.escape(pattern[i]), i + 1
        if any(re.fullmatch(rx, c) for c in candidates):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_the_build_copies_and_nothing_else() -> None:
    patterns = [ln.strip() for ln in DOCKERIGNORE.read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.startswith("#")]
    needed = ["pyproject.toml", "deploy/docker/healthcheck.py", "services/registry/__main__.py",
              "services/registry/lua/pool.lua", "services/registry/domain/accelerators.json",
              "services/common/settings.py"]
    for path in needed:
        assert (ROOT / path).exists(), path
        assert not _dockerignored(path, patterns), f"{path} is left out of the build context"
    for path in [".git/HEAD", "tests/unit/test_deploy_files.py", ".cbroker/nats/x",
                 "services/registry/__pycache__/app.cpython-311.pyc", "bench/x.py"]:
        assert _dockerignored(path, patterns), f"{path} is sent to the build context"


# ---------------------------------------------------------------- healthcheck script


@pytest.fixture
def http_server() -> Iterator[tuple[int, list[int]]]:
    """A local HTTP server answering the status at the head of ``status``."""
    status = [200]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            code = status[0] if self.path == "/health" else 404
            self.send_response(code)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], status
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_finds_the_port_of_the_service_it_runs() -> None:
    hc = _load_healthcheck()
    assert hc.service_from_argv(["python", "-m", "services.registry"]) == "registry"
    assert hc.service_from_argv(["/sbin/docker-init", "--", "python", "-m", "services.meter"]) == "meter"
    assert hc.service_from_argv(["python", "-c", "pass"]) is None
    argv = ["python", "-m", "services.broker"]
    assert hc.resolve_port({}, argv) == DEFAULTS.broker_port
    assert hc.resolve_port({"CB_BROKER_PORT": "9002"}, argv) == 9002
    assert hc.resolve_port({"CB_PORT": "9100", "CB_BROKER_PORT": "9002"}, argv) == 9100  # as serve() does
    with pytest.raises(LookupError):
        hc.resolve_port({}, ["python", "-c", "pass"])
    assert hc.health_url({"CB_HOST": "0.0.0.0"}, argv) == f"http://127.0.0.1:{DEFAULTS.broker_port}/health"
    assert hc.health_url({"CB_HOST": "10.0.0.5", "CB_PORT": "1"}, argv, "/x") == "http://10.0.0.5:1/x"


def test_healthcheck_exit_status_follows_the_http_status(
    http_server: tuple[int, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    hc = _load_healthcheck()
    port, status = http_server
    monkeypatch.setenv("CB_PORT", str(port))
    monkeypatch.setenv("CB_HOST", "0.0.0.0")
    assert hc.main(["/health"]) == 0
    status[0] = 503
    assert hc.main(["/health"]) == 1
    status[0] = 200
    assert hc.main(["/nothing-here"]) == 1


# ---------------------------------------------------------------- deploy/


def test_nats_conf_is_single_node_durable_jetstream(compose: dict[str, Any]) -> None:
    conf = _nats_conf()
    js = re.search(r"^jetstream\s*[:=]?\s*\{(?P<body>[^}]*)\}", conf, re.M)
    assert js, "nats.conf has no jetstream block"
    body = js.group("body")
    for key in ("store_dir", "max_file_store", "sync_interval"):
        assert re.search(rf"^{key}\s*[:=]", body, re.M), f"jetstream block sets no {key}"
    # one node, no replicas: acknowledged writes must be on disk (invariant 2)
    assert re.search(r"^sync_interval\s*[:=]\s*\"?always\"?\s*$", body, re.M)
    assert re.search(r"^http_port\s*[:=]\s*8222\s*$", conf, re.M), "monitoring port is not 8222"
    assert not re.search(r"^(cluster|gateway)\s*[:=]?\s*\{", conf, re.M), "single node: no cluster/gateway"


def test_redis_conf_never_evicts_and_never_persists() -> None:
    conf = _redis_conf()
    assert conf.get("maxmemory-policy") == "noeviction"
    assert conf.get("save") == '""'
    assert conf.get("appendonly") == "no"
    assert conf.get("bind"), "redis.conf has no bind"
    assert conf.get("port") == "6379"


# ---------------------------------------------------------------- docs


def test_docs_table_lists_every_setting_with_its_env_name_and_default() -> None:
    rows = {}
    for line in DOCS.read_text(encoding="utf-8").splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 4 and cells[0] in Settings.__struct_fields__:
            rows[cells[0]] = cells
    assert set(rows) == set(Settings.__struct_fields__)
    for field, (_, env, default, *_rest) in rows.items():
        assert env == env_name(field), field
        value = getattr(DEFAULTS, field)
        assert default == ("unset" if value is None else str(value)), field
