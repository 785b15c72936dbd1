"""The ``kubernetes`` backend: a lease becomes one Job (one Pod) in the tenant's own
namespace, asking the device plugin for the leased units.

Objects are built with the official client's models and sent through its API classes,
so what reaches the API server is what the schemas in tests/data/k8s validate. The
tenant's container runs as non-root with no privilege escalation, no capabilities, the
runtime's seccomp profile, and no service-account token (it cannot talk to the cluster
it runs on). The Job never restarts the workload (``backoffLimit: 0``,
``restartPolicy: Never``) and Kubernetes ends it at the lease's end
(``activeDeadlineSeconds``) even if the agent is gone.

Needs the optional ``agent-k8s`` extra (``pip install 'compute-broker[agent-k8s]'``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from datetime import UTC, datetime

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from services.common.delivery import Access, ContainerWorkload

from .base import Assignment, Backend, Ended, StartFailed, share_percent

MANAGED_BY = "cbroker-agent"
LABEL_LEASE = "compute-broker.io/lease"
LABEL_POOL = "compute-broker.io/pool"
LABEL_TENANT = "compute-broker.io/tenant"
LABEL_AGENT = "compute-broker.io/agent"

# device plugin resource names per catalogue vendor (the plugins' documented names)
RESOURCES: dict[str, str] = {
    "nvidia": "nvidia.com/gpu",  # NVIDIA k8s-device-plugin
    "amd": "amd.com/gpu",  # ROCm k8s-device-plugin
    "huawei": "huawei.com/Ascend910",  # Ascend device plugin; 310P models below
    "intel": "habana.ai/gaudi",  # Habana device plugin
    "aws": "aws.amazon.com/neuron",  # Neuron device plugin
    "google": "google.com/tpu",  # GKE TPU
    "cambricon": "cambricon.com/mlu",  # Cambricon device plugin
}
# HAMi's resources for a share of one NVIDIA GPU (github.com/Project-HAMi/HAMi, README
# "Device resource isolation"): nvidia.com/gpu counts vGPUs, gpucores is the percentage of
# the GPU's compute, gpumem its device memory in MiB; HAMi-core enforces both in the container
HAMI_CORES = "nvidia.com/gpucores"
HAMI_MEMORY = "nvidia.com/gpumem"
_FATAL_WAITING = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
                  "CreateContainerError", "RunContainerError"}


def resource_name(vendor: str, model: str, override: str | None = None) -> str:
    if override:
        return override
    if vendor == "huawei" and "310p" in model:
        return "huawei.com/Ascend310P"
    try:
        return RESOURCES[vendor]
    except KeyError:
        raise StartFailed(f"no device plugin resource known for {vendor} devices; "
                          "set kubernetes.resource in agent.toml") from None


def device_limits(lease: Assignment, resource: str | None = None) -> dict[str, str]:
    """The container's device limits: the leased units of the device plugin's resource, or,
    for a share, one HAMi vGPU with its share of the cores (and of the memory, for a
    "memory" pool)."""
    name = resource_name(lease.vendor, lease.model, resource)
    if lease.milli >= 1000 or lease.sharing == "none":
        return {name: str(lease.units)}
    if lease.vendor != "nvidia":
        raise StartFailed(f"shares of {lease.vendor} devices cannot be asked of kubernetes (HAMi's "
                          "nvidia.com/gpucores and gpumem are NVIDIA's)")
    limits = {name: "1", HAMI_CORES: str(share_percent(lease.milli))}
    if lease.sharing == "memory" and lease.memory_mib > 0:
        limits[HAMI_MEMORY] = str(lease.memory_mib * lease.milli // 1000)
    return limits


def dns_label(text: str, prefix: str = "") -> str:
    """A DNS-1123 label (what namespace and Job names must be): lower-case alphanumerics
    and '-', at most 63 characters; a long name keeps a hash of the whole so two never
    collide by truncation."""
    label = re.sub(r"[^a-z0-9-]+", "-", (prefix + text).lower()).strip("-")
    if len(label) > 63:
        digest = hashlib.sha256(label.encode()).hexdigest()[:8]
        label = label[:54].rstrip("-") + "-" + digest
    return label


def namespace_for(tenant: str, prefix: str) -> str:
    return dns_label(tenant, prefix)


def job_name(lease_id: str) -> str:
    return dns_label(lease_id, "cb-")


def render(lease: Assignment, *, agent: str, namespace_prefix: str = "cb-",
           resource: str | None = None, now: datetime | None = None) -> tuple[k8s.V1Namespace, k8s.V1Job]:
    """The namespace and the Job for one lease (pure: no API calls)."""
    workload = lease.workload
    if not isinstance(workload, ContainerWorkload):
        kind = type(workload).__struct_config__.tag if workload is not None else "none"
        raise StartFailed(f"the kubernetes backend runs container workloads, not {kind}")
    labels = {"app.kubernetes.io/managed-by": MANAGED_BY, LABEL_LEASE: lease.lease_id,
              LABEL_POOL: lease.pool_id, LABEL_TENANT: lease.tenant, LABEL_AGENT: agent}
    namespace = k8s.V1Namespace(
        api_version="v1", kind="Namespace",
        metadata=k8s.V1ObjectMeta(
            name=namespace_for(lease.tenant, namespace_prefix),
            labels={"app.kubernetes.io/managed-by": MANAGED_BY, LABEL_TENANT: lease.tenant,
                    # the Pod Security admission's restricted profile: what the pod below meets
                    "pod-security.kubernetes.io/enforce": "restricted"}))
    container = k8s.V1Container(
        name="workload", image=workload.image, command=list(workload.command) or None,
        env=[k8s.V1EnvVar(name=k, value=v) for k, v in sorted(workload.env.items())] or None,
        ports=[k8s.V1ContainerPort(container_port=p, protocol="TCP") for p in workload.ports] or None,
        resources=k8s.V1ResourceRequirements(limits=device_limits(lease, resource)),
        security_context=k8s.V1SecurityContext(
            allow_privilege_escalation=False, run_as_non_root=True, privileged=False,
            capabilities=k8s.V1Capabilities(drop=["ALL"]),
            seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault")))
    deadline = None
    if lease.expires_at is not None:
        deadline = max(1, int((lease.expires_at - (now or datetime.now(UTC))).total_seconds()))
    job = k8s.V1Job(
        api_version="batch/v1", kind="Job",
        metadata=k8s.V1ObjectMeta(name=job_name(lease.lease_id), namespace=namespace.metadata.name, labels=labels),
        spec=k8s.V1JobSpec(
            backoff_limit=0, active_deadline_seconds=deadline, ttl_seconds_after_finished=3600,
            template=k8s.V1PodTemplateSpec(
                metadata=k8s.V1ObjectMeta(labels=labels),
                spec=k8s.V1PodSpec(
                    restart_policy="Never", containers=[container],
                    automount_service_account_token=False, enable_service_links=False,
                    security_context=k8s.V1PodSecurityContext(
                        run_as_non_root=True, seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"))))))
    return namespace, job


class KubernetesBackend(Backend):
    kind = "kubernetes"

    def __init__(self, api: k8s.ApiClient, *, agent: str, namespace_prefix: str = "cb-",
                 resource: str | None = None, start_timeout_s: float = 600.0, poll_s: float = 1.0) -> None:
        self._core = k8s.CoreV1Api(api)
        self._batch = k8s.BatchV1Api(api)
        self._agent = agent
        self._prefix = namespace_prefix
        self._resource = resource
        self._start_timeout_s = start_timeout_s  # a pod not Running by then: the start failed
        self._poll_s = poll_s
        self._jobs: dict[str, tuple[str, str]] = {}  # lease → (namespace, job)
        self._reported: set[str] = set()

    async def start(self, lease: Assignment) -> Access:
        namespace, job = render(lease, agent=self._agent, namespace_prefix=self._prefix, resource=self._resource)
        ns, name = namespace.metadata.name, job.metadata.name
        try:
            await asyncio.to_thread(self._core.create_namespace, namespace)
        except ApiException as exc:
            if exc.status != 409:  # 409: the tenant's namespace exists already
                raise StartFailed(f"kubernetes refused the namespace {ns}: {_reason(exc)}") from None
        try:
            await asyncio.to_thread(self._batch.create_namespaced_job, ns, job)
        except ApiException as exc:
            raise StartFailed(f"kubernetes refused the job {ns}/{name}: {_reason(exc)}") from None
        self._jobs[lease.lease_id] = (ns, name)
        deadline = time.monotonic() + self._start_timeout_s
        while True:
            pod = await self._pod(ns, lease.lease_id)
            if pod is not None:
                phase = pod.status.phase if pod.status else None
                if phase == "Running":
                    return Access(job_id=f"{ns}/{name}", host=pod.status.pod_ip,
                                  nodes=[pod.spec.node_name] if pod.spec and pod.spec.node_name else [],
                                  note=f"pod {ns}/{pod.metadata.name}; the host is the pod's cluster address")
                problem = _pod_problem(pod)
                if phase in ("Failed", "Succeeded") or problem:
                    await self.stop(lease.lease_id, 0)
                    raise StartFailed(problem or f"the pod ended ({phase}) before it ran")
            if time.monotonic() > deadline:
                await self.stop(lease.lease_id, 0)
                raise StartFailed(f"the pod did not run within {self._start_timeout_s:.0f} s")
            await asyncio.sleep(self._poll_s)

    async def _pod(self, namespace: str, lease_id: str) -> k8s.V1Pod | None:
        pods = await asyncio.to_thread(self._core.list_namespaced_pod, namespace,
                                       label_selector=f"{LABEL_LEASE}={lease_id}")
        return pods.items[0] if pods.items else None

    async def stop(self, lease_id: str, grace_s: float) -> None:
        where = self._jobs.pop(lease_id, None)
        if where is None:
            return
        ns, name = where
        try:
            await asyncio.to_thread(self._batch.delete_namespaced_job, name, ns,
                                    grace_period_seconds=int(grace_s), propagation_policy="Foreground")
        except ApiException as exc:
            if exc.status != 404:
                raise

    async def poll(self) -> list[Ended]:
        jobs = await asyncio.to_thread(self._batch.list_job_for_all_namespaces,
                                       label_selector=f"{LABEL_AGENT}={self._agent}")
        ended = []
        for job in jobs.items:
            lease_id = (job.metadata.labels or {}).get(LABEL_LEASE, "")
            if lease_id not in self._jobs or lease_id in self._reported:
                continue
            status = job.status
            if status and status.succeeded:
                ended.append(Ended(lease_id=lease_id, state="exited", exit_code=0))
            elif status and status.failed:
                condition = next((c for c in status.conditions or () if c.type == "Failed"), None)
                reason = condition.reason if condition else "Failed"
                if reason == "BackoffLimitExceeded":
                    code = await self._exit_code(job.metadata.namespace, lease_id)
                    ended.append(Ended(lease_id=lease_id, state="exited", exit_code=code, reason="the workload failed"))
                else:  # DeadlineExceeded, evicted, node lost, ...
                    ended.append(Ended(lease_id=lease_id, state="lost",
                                       reason=f"kubernetes ended the job: {reason}"
                                       + (f": {condition.message}" if condition and condition.message else "")))
            else:
                continue
            self._reported.add(lease_id)
            self._jobs.pop(lease_id, None)
        return ended

    async def _exit_code(self, namespace: str, lease_id: str) -> int | None:
        pod = await self._pod(namespace, lease_id)
        for status in (pod.status.container_statuses or ()) if pod and pod.status else ():
            if status.state and status.state.terminated:
                return status.state.terminated.exit_code
        return None

    async def recover(self) -> list[str]:
        jobs = await asyncio.to_thread(self._batch.list_job_for_all_namespaces,
                                       label_selector=f"{LABEL_AGENT}={self._agent}")
        running = []
        for job in jobs.items:
            lease_id = (job.metadata.labels or {}).get(LABEL_LEASE, "")
            status = job.status
            if lease_id and not (status and (status.succeeded or status.failed)):
                self._jobs[lease_id] = (job.metadata.namespace, job.metadata.name)
                running.append(lease_id)
        return running


def _pod_problem(pod: k8s.V1Pod) -> str:
    for status in (pod.status.container_statuses or ()) if pod.status else ():
        waiting = status.state.waiting if status.state else None
        if waiting and waiting.reason in _FATAL_WAITING:
            return f"{waiting.reason}: {waiting.message or ''}".strip(": ")
    for condition in (pod.status.conditions or ()) if pod.status else ():
        if condition.type == "PodScheduled" and condition.status == "False" and condition.reason == "Unschedulable":
            return ""  # may schedule later (autoscaler); the start timeout decides
    return ""


def _reason(exc: ApiException) -> str:
    try:
        return json.loads(exc.body or "{}").get("message") or exc.reason or str(exc.status)
    except ValueError:
        return exc.reason or str(exc.status)
