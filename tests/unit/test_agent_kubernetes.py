"""The kubernetes backend without a cluster: the objects it renders validate against the
Kubernetes JSON schemas bundled in tests/data/k8s, and its client calls are checked
against a local HTTP server replaying the API exchanges in tests/data/k8s/exchanges.json
(what was and was not run against a real cluster: docs/agent.md, "Kubernetes")."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import jsonschema
import kubernetes_validate
import msgspec
import pytest
from kubernetes import client as k8s
from referencing import Registry, Resource

from services.agent.backends.base import Assignment, Ended, StartFailed
from services.agent.backends.kubernetes import KubernetesBackend, dns_label, render, resource_name
from services.common.delivery import ContainerWorkload, ProcessWorkload

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "tests" / "data" / "k8s"
NOW = datetime(2026, 1, 1, tzinfo=UTC)
LEASE = Assignment(
    lease_id="lease_18f0a1b2c3d4e5f6a7b8c9", pool_id="acme-h100", tenant="team_a", units=2, devices=(),
    vendor="nvidia", model="nvidia-h100-sxm-80gb",
    workload=ContainerWorkload(image="nvcr.io/nvidia/pytorch:24.05-py3", command=["python", "train.py"],
                               env={"EPOCHS": "3"}, ports=[8000]),
    expires_at=NOW + timedelta(hours=2))


def schema_validator(kind_file: str) -> jsonschema.Draft202012Validator:
    definitions = json.loads((K8S / "_definitions.json").read_text())
    registry = Registry().with_resource(definitions["$id"], Resource.from_contents(definitions))
    return jsonschema.Draft202012Validator(json.loads((K8S / kind_file).read_text()), registry=registry)


def as_json(obj) -> dict:
    return k8s.ApiClient().sanitize_for_serialization(obj)


@pytest.mark.parametrize("vendor_model_resource", [
    ("nvidia", "nvidia-h100-sxm-80gb", "nvidia.com/gpu"), ("amd", "amd-mi300x", "amd.com/gpu"),
    ("huawei", "huawei-ascend-910b", "huawei.com/Ascend910"), ("huawei", "huawei-ascend-310p", "huawei.com/Ascend310P")])
def test_rendered_objects_validate_against_the_bundled_schemas(vendor_model_resource):
    vendor, model, resource = vendor_model_resource
    lease = msgspec.structs.replace(LEASE, vendor=vendor, model=model)
    namespace, job = render(lease, agent="acme-agent-1", now=NOW)
    ns_doc, job_doc = as_json(namespace), as_json(job)
    for validator, doc in ((schema_validator("namespace-v1.json"), ns_doc), (schema_validator("job-batch-v1.json"), job_doc)):
        errors = [e.message for e in validator.iter_errors(doc)]
        assert errors == []
    pod_doc = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": job_doc["spec"]["template"]["spec"]}
    assert [e.message for e in schema_validator("pod-v1.json").iter_errors(pod_doc)] == []
    # and the oldest Kubernetes release still widely run (the same check as deploy/k8s)
    for doc in (ns_doc, job_doc):
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    container = job_doc["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"] == {"limits": {resource: "2"}}
    assert job_doc["metadata"]["namespace"] == ns_doc["metadata"]["name"] == "cb-team-a"
    assert job_doc["spec"]["activeDeadlineSeconds"] == 7200 and job_doc["spec"]["backoffLimit"] == 0
    assert job_doc["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    assert container["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_the_schemas_catch_a_broken_object():
    """The validation can fail: a Job without a template, an unknown field."""
    _, job = render(LEASE, agent="acme-agent-1", now=NOW)
    doc = as_json(job)
    del doc["spec"]["template"]
    doc["spec"]["gpus"] = 2
    messages = " ".join(e.message for e in schema_validator("job-batch-v1.json").iter_errors(doc))
    assert "'template' is a required property" in messages and "'gpus'" in messages


def test_render_refuses_what_it_cannot_run_and_names_stay_dns_labels():
    with pytest.raises(StartFailed, match="runs container workloads, not process"):
        render(msgspec.structs.replace(LEASE, workload=ProcessWorkload(command=["true"])), agent="a")
    with pytest.raises(StartFailed, match="set kubernetes.resource"):
        resource_name("biren", "biren-br100")
    assert resource_name("biren", "biren-br100", "birentech.com/gpu") == "birentech.com/gpu"
    long = dns_label("t" * 80 + "_x", "cb-")
    assert len(long) == 63 and long != dns_label("t" * 80 + "_y", "cb-")


class Replay:
    """A local HTTP server answering one recorded exchange in order; it fails the test
    on any request the exchange does not expect next."""

    def __init__(self, name: str) -> None:
        self.steps = json.loads((K8S / "exchanges.json").read_text())[name]
        self.seen: list[tuple[str, str, dict | None]] = []
        self.errors: list[str] = []
        replay = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                replay.seen.append((self.command, self.path, body))
                if not replay.steps:
                    replay.errors.append(f"unexpected {self.command} {self.path}")
                    self.send_response(500)
                    self.end_headers()
                    return
                step = replay.steps.pop(0)
                got, want = urlsplit(self.path), urlsplit(step["path"])
                got_q, want_q = parse_qs(got.query), parse_qs(want.query)
                if (self.command, got.path) != (step["method"], want.path) or any(
                        got_q.get(k) != v for k, v in want_q.items()):
                    replay.errors.append(f"expected {step['method']} {step['path']}, got {self.command} {self.path}")
                payload = json.dumps(step["body"]).encode()
                self.send_response(step["status"])
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_DELETE = _answer

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> KubernetesBackend:
        self.thread.start()
        configuration = k8s.Configuration(host=f"http://127.0.0.1:{self.server.server_port}")
        return KubernetesBackend(k8s.ApiClient(configuration), agent="acme-agent-1", poll_s=0.01, start_timeout_s=5)

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def check(self) -> None:
        assert self.errors == []
        assert self.steps == [], f"never asked: {self.steps}"


async def test_start_waits_for_running_then_the_workload_exit_ends_the_lease():
    replay = Replay("start-run-exit")
    with replay as backend:
        access = await backend.start(LEASE)
        assert (access.job_id, access.host, access.nodes) == (
            "cb-team-a/cb-lease-18f0a1b2c3d4e5f6a7b8c9", "10.244.1.17", ["gpu-node-3"])
        assert await backend.poll() == []  # still running
        assert await backend.poll() == [Ended(lease_id=LEASE.lease_id, state="exited", exit_code=3,
                                              reason="the workload failed")]
    replay.check()
    namespace, job = render(LEASE, agent="acme-agent-1", now=NOW)
    sent_ns, sent_job = replay.seen[0][2], replay.seen[1][2]
    assert sent_ns == as_json(namespace)
    deadline = sent_job["spec"].pop("activeDeadlineSeconds")  # counted from the time it was sent
    assert 0 < deadline <= (LEASE.expires_at - NOW).total_seconds()
    expected = as_json(job)
    expected["spec"].pop("activeDeadlineSeconds", None)
    assert sent_job == expected
    assert [e.message for e in schema_validator("job-batch-v1.json").iter_errors(sent_job)] == []


async def test_image_pull_failure_fails_the_start_and_deletes_the_job():
    replay = Replay("image-pull-fails")
    with replay as backend:
        with pytest.raises(StartFailed, match="ErrImagePull: failed to pull and unpack image"):
            await backend.start(LEASE)
    replay.check()  # the namespace existed (409 is fine); the job was deleted, nothing left behind
    method, path, body = replay.seen[-1]
    assert method == "DELETE" and "propagationPolicy=Foreground" in path + json.dumps(body or {})


async def test_recover_finds_its_running_job_and_stop_tolerates_it_gone():
    replay = Replay("recover-then-stop")
    with replay as backend:
        assert await backend.recover() == [LEASE.lease_id]
        await backend.stop(LEASE.lease_id, 30)  # 404: already deleted; not an error
        await backend.stop(LEASE.lease_id, 30)  # unknown now: no call at all
    replay.check()


async def test_a_job_kubernetes_kills_at_its_deadline_is_lost():
    replay = Replay("deadline-exceeded-is-lost")
    with replay as backend:
        assert await backend.recover() == [LEASE.lease_id]
        [ended] = await backend.poll()
    replay.check()
    assert (ended.state, ended.exit_code) == ("lost", None)
    assert ended.reason == "kubernetes ended the job: DeadlineExceeded: Job was active longer than specified deadline"


@pytest.mark.parametrize("mode, milli, limits", [
    ("time_slice", 250, {"nvidia.com/gpu": "1", "nvidia.com/gpucores": "25"}),
    ("memory", 333, {"nvidia.com/gpu": "1", "nvidia.com/gpucores": "34", "nvidia.com/gpumem": str(81920 * 333 // 1000)}),
    ("memory", 1000, {"nvidia.com/gpu": "1"}),  # a whole device of a sharing pool: no HAMi limits
])
def test_a_share_asks_hami_for_its_cores_and_memory_and_validates(mode, milli, limits):
    share = msgspec.structs.replace(LEASE, units=1, milli=milli, sharing=mode, memory_mib=81920)
    _, job = render(share, agent="acme-agent-1", now=NOW)
    doc = as_json(job)
    assert [e.message for e in schema_validator("job-batch-v1.json").iter_errors(doc)] == []
    kubernetes_validate.validate(doc, "1.30.0", strict=True)
    assert doc["spec"]["template"]["spec"]["containers"][0]["resources"] == {"limits": limits}


def test_a_share_of_another_vendor_is_refused():
    share = msgspec.structs.replace(LEASE, units=1, milli=250, sharing="time_slice", vendor="amd", model="amd-mi300x")
    with pytest.raises(StartFailed, match="shares of amd devices cannot be asked of kubernetes"):
        render(share, agent="acme-agent-1", now=NOW)
