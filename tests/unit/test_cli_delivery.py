"""What the tenant's side makes of a request view: when ``wait_ready`` is done, waits on,
or gives up; the progress lines of ``request --wait``; how a ready lease is reached (the
exact ssh command); the workload options; the demo providers' access details."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import click
import msgspec
import pytest

from services.broker.domain.requests import ComputeRequest
from services.broker.ready_wait import RequestEnded, is_ready
from services.broker.records import LeaseView, RequestView
from services.cli.demo_delivery import DELIVERY, access_for
from services.cli.tracking import progress_lines, reach_lines, workload_body
from services.common.delivery import Access, Attempt

T0 = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def lease(lease_id: str = "lease_a", state: str = "provisioning", delivery: str = "ssh",
          access: Access | None = None, **over: object) -> LeaseView:
    fields = dict(lease_id=lease_id, request_id="req_1", tenant="alpha-labs", state=state, pool_id="pool-a",
                  provider="acme", region="cn-yrd", model="nvidia-a100-sxm-80gb", units=2, billing="on_demand",
                  unit_price=Decimal("2.10"), price_basis="unit_hour", currency="USD", granted_at=T0,
                  expires_at=T0 + timedelta(minutes=5), renewable=True, delivery=delivery, access=access)
    fields.update(over)
    return LeaseView(**fields)


def attempt(lease_id: str, state: str, pool: str = "pool-a", reason: str = "", ended: int | None = None) -> Attempt:
    return Attempt(lease_id=lease_id, pool_id=pool, provider="acme", region="cn-yrd", state=state, granted_at=T0,
                   ended_at=None if ended is None else T0 + timedelta(seconds=ended), reason=reason,
                   charged=state not in ("failed", "provisioning"))


def view(state: str = "placed", leases: list[LeaseView] | None = None, attempts: list[Attempt] | None = None,
         reasons: list[str] | None = None) -> RequestView:
    return RequestView(request_id="req_1", tenant="alpha-labs", state=state, created_at=T0, leases=leases or [],
                       attempts=attempts or [], reasons=reasons or [])


# --- is_ready: done, keep waiting, or over ---------------------------------------------------
def ready(v: RequestView, leaseless_for: float = 0.0) -> bool:
    return is_ready(v, leaseless_for=leaseless_for, grace_s=5.0)


def test_ready_only_when_every_lease_is_ready() -> None:
    assert not ready(view(leases=[lease(state="provisioning")]))
    assert not ready(view(leases=[lease("a", state="ready"), lease("b", state="provisioning")]))
    assert ready(view(leases=[lease("a", state="ready"), lease("b", state="ready")]))
    assert ready(view(leases=[lease(state="ready", delivery="")]))  # capacity only: ready at grant


@pytest.mark.parametrize("state", ["queued", "placing", "replacing"])
def test_queued_placing_and_replacing_keep_waiting(state: str) -> None:
    assert not ready(view(state, attempts=[attempt("lease_a", "failed", reason="boom", ended=3)]),
                     leaseless_for=60.0)


@pytest.mark.parametrize("state", ["rejected", "cancelled", "expired"])
def test_an_ended_request_raises_with_its_reasons(state: str) -> None:
    with pytest.raises(RequestEnded, match=f"{state}: no pool delivers slurm") as caught:
        ready(view(state, reasons=["no pool delivers slurm"]))
    assert caught.value.view is not None and caught.value.view.state == state


def test_a_failed_request_raises_with_the_failed_attempts() -> None:
    failed = view("failed", attempts=[attempt("lease_a", "failed", reason="image pull timed out", ended=3)])
    with pytest.raises(RequestEnded, match=r"req_1 failed: attempt on pool-a: failed \(image pull timed out\)"):
        ready(failed)


def test_placed_without_a_live_lease_waits_for_failover_to_take_it_up_then_gives_up() -> None:
    # between a lease failing and failover claiming the request, the view shows neither the lease nor its attempt
    leaseless = view(leases=[])
    assert not ready(leaseless, leaseless_for=1.0)
    with pytest.raises(RequestEnded, match="has no live lease left"):
        ready(leaseless, leaseless_for=6.0)


def test_the_replacement_provisioning_keeps_waiting_and_its_ready_ends_the_wait() -> None:
    attempts = [attempt("lease_a", "failed", reason="boom", ended=3), attempt("lease_b", "provisioning", "pool-b")]
    assert not ready(view(leases=[lease("lease_b", attempt=2, replaces="lease_a")], attempts=attempts))
    assert ready(view(leases=[lease("lease_b", state="ready", attempt=2, replaces="lease_a")], attempts=attempts))


# --- progress lines ---------------------------------------------------------------------------
def test_progress_says_where_it_provisions_the_failure_and_the_replacement() -> None:
    first = progress_lines(view(leases=[lease()], attempts=[attempt("lease_a", "provisioning")]))
    assert first == ["request req_1: lease lease_a provisioning on pool pool-a at provider acme (cn-yrd)"]
    after = progress_lines(view(
        leases=[lease("lease_b", pool_id="pool-b", provider="other", attempt=2, replaces="lease_a")],
        attempts=[attempt("lease_a", "failed", reason="no free IP address", ended=2),
                  attempt("lease_b", "provisioning", "pool-b")]))
    assert after == [
        "request req_1: attempt on pool pool-a at provider acme (cn-yrd) failed: no free IP address",
        "request req_1: attempt 2 lease_b provisioning on pool pool-b at provider other (cn-yrd) after failed: "
        "no free IP address"]
    assert progress_lines(view("queued"))[0].startswith("request req_1: queued at position")


# --- how to reach it --------------------------------------------------------------------------
def test_ssh_access_is_the_exact_command_line() -> None:
    ready_lease = lease(state="ready", access=Access(host="gpu-7.acme.example", port=22007, user="alpha"))
    assert reach_lines(ready_lease)[0] == "ssh -p 22007 alpha@gpu-7.acme.example"
    assert reach_lines(lease(state="ready", access=Access(host="h.example")))[0] == "ssh h.example"


def test_process_and_slurm_access_show_job_nodes_devices() -> None:
    a = Access(job_id="4711", nodes=["n1", "n2"], devices=[0, 1, 2, 3], env={"MASTER_ADDR": "n1"},
               urls=["http://n1:8000"])
    lines = reach_lines(lease(state="ready", delivery="slurm", access=a))
    assert lines == ["job 4711", "nodes n1, n2", "devices 0,1,2,3", "url http://n1:8000", "env MASTER_ADDR=n1"]
    assert "provisioning" in reach_lines(lease())[0]


# --- workload options -------------------------------------------------------------------------
def kw(**over: object) -> dict:
    base = {"ssh_keys": (), "process": None, "workload_env": (), "workload_json": None, "on_failure": None,
            "max_replacements": None}
    base.update(over)
    return base


def test_workload_options_build_what_the_broker_accepts(tmp_path: Path) -> None:
    pub = tmp_path / "id_ed25519.pub"
    pub.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleExampleExample me@laptop\n")
    ssh = workload_body(kw(ssh_keys=(pub,), on_failure="fail", max_replacements=0))
    assert ssh == {"workload": {"kind": "ssh", "public_keys": [pub.read_text().strip()]}, "on_failure": "fail",
                   "max_replacements": 0}
    proc = workload_body(kw(process="python train.py --name 'a b'", workload_env=("LR=3e-4",)))
    assert proc["workload"] == {"kind": "process", "command": ["python", "train.py", "--name", "a b"],
                                "env": {"LR": "3e-4"}}
    ctr = workload_body(kw(workload_json='{"kind": "container", "image": "vllm/vllm", "ports": [8000]}'))
    for body in (ssh, proc, ctr):
        msgspec.convert({"units": 1, **body}, ComputeRequest)


@pytest.mark.parametrize(("over", "says"), [
    ({"process": "x", "workload_json": "{}"}, "one workload per request"),
    ({"workload_env": ("A=1",)}, "--workload-env goes with --workload-process"),
    ({"process": "x", "workload_env": ("novalue",)}, "is not NAME=VALUE"),
    ({"process": "'unclosed"}, "quotation"),
    ({"workload_json": "{nope"}, "not JSON"),
])
def test_bad_workload_options_are_usage_errors(over: dict, says: str) -> None:
    with pytest.raises(click.UsageError, match=says):
        workload_body(kw(**over))


def test_a_private_key_file_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "id_ed25519"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nxxx\n-----END OPENSSH PRIVATE KEY-----\n")
    with pytest.raises(click.BadParameter, match="private key"):
        workload_body(kw(ssh_keys=(key,)))


# --- the demo providers' answers --------------------------------------------------------------
@pytest.mark.parametrize("kind", ["ssh", "process", "container", "slurm"])
def test_demo_access_is_valid_and_stable(kind: str) -> None:
    a = access_for("tidewater", "lease_0123456789abcdef", kind, 16, {"ports": [8000, 8080]}, "alpha-labs")
    access = msgspec.convert(a, Access)  # what the broker's ready body accepts
    assert a == access_for("tidewater", "lease_0123456789abcdef", kind, 16, {"ports": [8000, 8080]}, "alpha-labs")
    if kind == "ssh":
        assert access.host.endswith(".tidewater.demo.invalid") and access.port and access.user == "alpha_labs"
    if kind == "container":
        assert len(access.urls) == 2
    if kind in ("process", "slurm"):
        assert access.job_id and access.nodes and access.devices == list(range(8))
    assert all(DELIVERY.values())
