"""deploy/k8s and the server configs, checked without a cluster and without network.

Every manifest validates against the Kubernetes JSON schemas (``kubernetes-validate``
bundles them; strict: unknown fields are errors). The services' probes point at /health
and /ready on their HTTP port; every environment variable they are given is a setting;
every Secret and ConfigMap key they reference exists. The NATS configs parse
(``nats-server -t``), the cluster has routes for each replica and a gateway for each
region, and the generated files (auth.conf, users.acl, the ConfigMaps) are up to date.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import kubernetes_validate
import pytest
import yaml

from services.cli.servers import find_binary
from services.common.settings import Settings, env_name, settings_from_env

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
NATS_DIR = ROOT / "deploy" / "nats"
REDIS_DIR = ROOT / "deploy" / "redis"
K8S_VERSION = "1.30.0"  # the oldest Kubernetes release still widely supported by providers
SERVICES = ("registry", "broker", "meter")
SETTING_NAMES = {env_name(f) for f in Settings.__struct_fields__} | {"CB_PORT"}
DEFAULTS = Settings()


def _load_permissions() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cb_permissions", ROOT / "deploy" / "permissions.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


PERMISSIONS = _load_permissions()


def _documents() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is not None:
                docs.append((path, doc))
    return docs


DOCS = _documents()


def _all(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in DOCS if doc["kind"] == kind]


def _one(kind: str, name: str, path: Path | None = None) -> dict[str, Any]:
    found = [d for p, d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name and (path is None or p == path)]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def _containers(workload: dict[str, Any]) -> Iterator[dict[str, Any]]:
    pod = workload["spec"]["template"]["spec"]
    yield from pod.get("initContainers", [])
    yield from pod["containers"]


def _secret() -> dict[str, Any]:
    return yaml.safe_load(PERMISSIONS.render_secret())


# ------------------------------------------------------------------ schemas


def test_there_is_a_manifest_for_everything() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for _, d in DOCS}
    for name in SERVICES:
        assert {("Deployment", name), ("Service", name)} <= kinds
    assert {("StatefulSet", "nats"), ("StatefulSet", "redis"), ("ConfigMap", "cb-config"),
            ("ConfigMap", "nats-config"), ("ConfigMap", "redis-config"), ("Namespace", "compute-broker")} <= kinds


@pytest.mark.parametrize(("path", "doc"), DOCS, ids=[f"{p.relative_to(K8S)}:{d['kind']}/{d['metadata']['name']}"
                                                     for p, d in DOCS])
def test_manifest_is_valid_kubernetes(path: Path, doc: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{path.relative_to(ROOT)}: {doc['kind']}/{doc['metadata']['name']}: {exc.message} "
                    f"at {'.'.join(str(p) for p in exc.path)}")
    if doc["kind"] != "Namespace":
        assert doc["metadata"].get("namespace") == "compute-broker", "every object in the deployment's namespace"


def test_the_validator_refuses_a_broken_manifest() -> None:
    """The check above can fail: an unknown field and a wrong type are refused."""
    deployment = yaml.safe_load(yaml.safe_dump(_one("Deployment", "broker")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pathh"] = "/ready"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    deployment = yaml.safe_load(yaml.safe_dump(_one("Deployment", "broker")))
    deployment["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_the_generated_secret_is_valid_and_complete() -> None:
    secret = _secret()
    kubernetes_validate.validate(secret, K8S_VERSION, strict=True)
    data = secret["stringData"]
    passwords = [v for k, v in data.items() if k.endswith("-password")]
    assert len(passwords) == len(set(passwords)) >= 11, "one password per user and server"
    for name in SERVICES:  # each service's URLs carry its own user and password
        assert data[f"{name}-nats-url"] == f"nats://{name}:{data[f'nats-{name}-password']}@nats:4222"
        assert data[f"{name}-redis-url"] == f"redis://{name}:{data[f'redis-{name}-password']}@redis:6379/0"
    assert yaml.safe_load(PERMISSIONS.render_secret())["stringData"]["admin-key"] != data["admin-key"]  # fresh


# ------------------------------------------------------------------ the services


@pytest.mark.parametrize("name", SERVICES)
def test_service_probes_health_and_ready_on_its_port(name: str) -> None:
    deployment = _one("Deployment", name)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python", "-m", f"services.{name}"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in ports, f"{probe} targets a port the container lacks"
    # the port the container declares is the one the service listens on (its port setting)
    config = _one("ConfigMap", "cb-config")["data"]
    listens = int(config.get(env_name(f"{name}_port"), getattr(DEFAULTS, f"{name}_port")))
    assert set(ports.values()) == {listens}
    service = _one("Service", name)
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert deployment["spec"]["replicas"] >= 2, "one replica is an outage at every rollout"


def test_the_ready_endpoint_exists_in_every_service() -> None:
    """The probes are not aimed at nothing: each app routes GET /health and GET /ready."""
    for name in SERVICES:
        module = importlib.import_module(f"services.{name}.app")
        app = module.create_app(Settings(admin_key="x" * 32))
        paths = {route.path for route in app.routes}
        assert {"/health", "/ready"} <= paths, f"{name} routes {sorted(paths)}"


@pytest.mark.parametrize("name", SERVICES)
def test_every_variable_a_service_gets_is_a_setting(name: str) -> None:
    (container,) = _one("Deployment", name)["spec"]["template"]["spec"]["containers"]
    names = {e["name"] for e in container.get("env", [])}
    for source in container.get("envFrom", []):
        names |= set(_one("ConfigMap", source["configMapRef"]["name"])["data"])
    unknown = sorted(names - SETTING_NAMES)
    assert not unknown, f"{name}: {unknown} are not settings"
    # ... and the values parse into Settings, with this service's own users in the URLs
    environ = dict(_one("ConfigMap", "cb-config")["data"])
    secret = _secret()["stringData"]
    for e in container["env"]:
        ref = e["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "cb-secrets"
        environ[e["name"]] = secret[ref["key"]]
    settings = settings_from_env(environ)
    assert settings.nats_url.startswith(f"nats://{name}:") and settings.redis_url.startswith(f"redis://{name}:")
    assert settings.host == "0.0.0.0" and settings.stream_replicas == 3 and settings.admin_key


def test_every_referenced_secret_and_configmap_key_exists() -> None:
    secret_keys = set(_secret()["stringData"])
    configmaps = {d["metadata"]["name"]: set(d["data"]) for d in _all("ConfigMap")}
    refs = 0
    for workload in _all("Deployment") + _all("StatefulSet"):
        for container in _containers(workload):
            for e in container.get("env", []):
                source = e.get("valueFrom", {})
                if "secretKeyRef" in source:
                    refs += 1
                    assert source["secretKeyRef"]["key"] in secret_keys, e
                if "configMapKeyRef" in source:
                    refs += 1
                    ref = source["configMapKeyRef"]
                    assert ref["key"] in configmaps[ref["name"]], e
        for volume in workload["spec"]["template"]["spec"].get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps
    assert refs >= 3 * len(SERVICES) + 6 + 5


def test_network_policies_let_the_services_reach_nats_and_redis() -> None:
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
            for d in _all("Deployment") + _all("StatefulSet")}

    def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
        return selector["matchLabels"].items() <= labels.items()

    for server, port in (("nats", 4222), ("redis", 6379)):
        policy = _one("NetworkPolicy", server)
        assert selects(policy["spec"]["podSelector"], pods[server])
        rules = [r for r in policy["spec"]["ingress"] if {"port": port, "protocol": "TCP"} in r["ports"]]
        for name in SERVICES:  # every service's pods are let in on the client port
            assert any(selects(f["podSelector"], pods[name]) for r in rules for f in r.get("from", [])), (server, name)
        assert all(r.get("from") for r in rules), f"{server}:{port} is open to everyone"
    routes = [r for r in _one("NetworkPolicy", "nats")["spec"]["ingress"]
              if {"port": 6222, "protocol": "TCP"} in r["ports"]]
    assert routes and all(selects(f["podSelector"], pods["nats"]) and not selects(f["podSelector"], pods["broker"])
                          for r in routes for f in r["from"]), "routes carry no credentials: NATS servers only"


# ------------------------------------------------------------------ NATS


def _nats_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, **extra}
    for user in [*(u.name for u in PERMISSIONS.nats_users()), "sys"]:
        env[PERMISSIONS.password_env(user)] = f"pw-{user}"
    return env


def _nats_check(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([find_binary("nats-server"), "-t", "-c", str(config)], env=env, capture_output=True,
                          text=True, timeout=30)


def _regions() -> list[str]:
    return sorted(d["data"]["region"] for d in _all("ConfigMap") if d["metadata"]["name"] == "cb-region")


def test_nats_configs_parse(tmp_path: Path) -> None:
    # the compose/single-node file as it is, and with the service accounts switched on
    result = _nats_check(NATS_DIR / "nats.conf", _nats_env())
    assert result.returncode == 0, result.stderr
    shutil.copy(NATS_DIR / "auth.conf", tmp_path / "auth.conf")
    text = (NATS_DIR / "nats.conf").read_text(encoding="utf-8")
    assert '# include "auth.conf"' in text
    (tmp_path / "nats.conf").write_text(text.replace('# include "auth.conf"', 'include "auth.conf"'))
    result = _nats_check(tmp_path / "nats.conf", _nats_env())
    assert result.returncode == 0, result.stderr
    # the cluster file, as each region's pods run it (from the ConfigMap's copies)
    files = _one("ConfigMap", "nats-config")["data"]
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    for region in _regions():
        result = _nats_check(tmp_path / "nats.conf", _nats_env(CB_REGION=region, SERVER_NAME=f"{region}-nats-0",
                                                               CB_NATS_GATEWAY_ADVERTISE=f"gw.{region}:7222"))
        assert result.returncode == 0, result.stderr
    # a missing password stops the server: no account runs with an empty one
    env = _nats_env(CB_REGION="cn-east", SERVER_NAME="cn-east-nats-0", CB_NATS_GATEWAY_ADVERTISE="gw:7222")
    del env["CB_NATS_METER_PASSWORD"]
    result = _nats_check(tmp_path / "nats.conf", env)
    assert result.returncode != 0 and "CB_NATS_METER_PASSWORD" in result.stderr + result.stdout


def test_nats_cluster_is_durable_routed_and_joined_by_gateways() -> None:
    conf = (NATS_DIR / "cluster.conf").read_text(encoding="utf-8")
    body = "\n".join(line.split("#", 1)[0] for line in conf.splitlines())
    assert re.search(r"^\s*sync_interval:\s*always\s*$", body, re.M)
    sts = _one("StatefulSet", "nats")
    replicas = sts["spec"]["replicas"]
    assert replicas == 3
    service = sts["spec"]["serviceName"]
    routes = re.findall(r"nats://([\w.-]+):6222", body)
    assert sorted(routes) == [f"nats-{i}.{service}" for i in range(replicas)], routes
    assert _one("Service", service)["spec"]["clusterIP"] == "None"
    # the store is on the claim template's volume
    store = re.search(r"^\s*store_dir:\s*(\S+)", body, re.M).group(1)
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    claims = {c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert any(store.startswith(mounts[c]) for c in claims if c in mounts), (store, mounts)
    # one cluster per region, named after it, and a gateway to every region
    assert re.search(r"cluster\s*\{[^}]*name:\s*\$CB_REGION", body)
    assert re.search(r"gateway\s*\{\s*name:\s*\$CB_REGION", body)
    gateways = re.findall(r'\{\s*name:\s*"([\w-]+)",\s*urls:', body)
    assert sorted(gateways) == _regions() and len(gateways) >= 2
    env = {e["name"]: e for e in container["env"]}
    assert env["CB_REGION"]["valueFrom"]["configMapKeyRef"] == {"name": "cb-region", "key": "region"}
    assert env["SERVER_NAME"]["value"] == "$(CB_REGION)-$(POD_NAME)"  # unique across the super-cluster
    assert env["CB_NATS_GATEWAY_ADVERTISE"]["valueFrom"]["configMapKeyRef"]["name"] == "cb-region"
    for region_map in (d for d in _all("ConfigMap") if d["metadata"]["name"] == "cb-region"):
        region = region_map["data"]["region"]  # a region advertises the gateway URL the others dial
        advertised = region_map["data"]["gateway-advertise"]
        assert re.search(rf'name:\s*"{region}",\s*urls:\s*\["nats://{re.escape(advertised)}"\]', body), region
    assert container["livenessProbe"]["httpGet"]["path"].startswith("/healthz")


# ------------------------------------------------------------------ generated files and Redis


def test_generated_files_are_up_to_date() -> None:
    hint = "regenerate with python deploy/permissions.py (see its docstring)"
    assert (NATS_DIR / "auth.conf").read_text(encoding="utf-8") == PERMISSIONS.render_nats(), hint
    assert (REDIS_DIR / "users.acl").read_text(encoding="utf-8") == PERMISSIONS.render_redis(), hint
    assert (K8S / "server-config.yaml").read_text(encoding="utf-8") == PERMISSIONS.render_configmaps(), hint
    for name, files in PERMISSIONS.SERVER_FILES.items():
        data = _one("ConfigMap", name)["data"]
        for key, path in files.items():
            assert data[key] == (ROOT / "deploy" / path).read_text(encoding="utf-8"), f"{name}/{key}"


def test_redis_init_container_fills_every_password_hash(tmp_path: Path) -> None:
    """The init container's script, run here with sh: every placeholder becomes the SHA-256
    of its password, and a missing password stops it."""
    sts = _one("StatefulSet", "redis")
    (init,) = sts["spec"]["template"]["spec"]["initContainers"]
    script = init["command"][-1].replace("$$", "$")  # Kubernetes' own escape, undone as the kubelet does
    script = script.replace("/etc/redis-conf/", f"{REDIS_DIR}/").replace("/acl/", f"{tmp_path}/")
    passwords = {e["name"]: f"pw-{e['name']}" for e in init["env"]}
    result = subprocess.run(["sh", "-c", script], env={**os.environ, **passwords}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    acl = (tmp_path / "users.acl").read_text()
    for name, pw in passwords.items():
        user = name.removeprefix("CB_REDIS_").removesuffix("_PASSWORD").lower()
        assert f"user {user} on #{hashlib.sha256(pw.encode()).hexdigest()} " in acl
    assert "CB_REDIS_" not in acl
    del passwords["CB_REDIS_METER_PASSWORD"]
    result = subprocess.run(["sh", "-c", script], env={**os.environ, **passwords}, capture_output=True, text=True)
    assert result.returncode != 0
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    assert container["args"][-2:] == ["--aclfile", "/acl/users.acl"]
