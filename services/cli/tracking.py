"""Following a request to usable compute: the workload options of ``cbroker request``, its
``--wait`` progress lines, how to reach a ready lease (for ssh the exact command line), and
``cbroker status|requests|cancel``.

Progress lines go to stderr as they become true, each once: where the lease is being
provisioned, an attempt that failed and why, its replacement, ready. The result (tables,
access, or JSON) goes to stdout.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any, get_args

import click
from rich.markup import escape

from services.broker.client import BrokerClient
from services.broker.records import LeaseView, RequestState, RequestView
from services.common.delivery import Access, Attempt

from .term import handled, note, out, print_json, show, waiting

DEFAULT_WAIT_S = 600.0  # `--wait` without a number

workload_options = [
    click.option("--workload-ssh-key", "ssh_keys", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
                 help="Deliver an ssh login with this public key file (repeat for more keys)."),
    click.option("--workload-process", "process",
                 help="Deliver a process: the command line, split as a shell would (not run by one)."),
    click.option("--workload-env", "workload_env", multiple=True, metavar="NAME=VALUE",
                 help="An environment variable of --workload-process (repeat)."),
    click.option("--workload-json", "workload_json", metavar="JSON",
                 help='The whole workload, any kind, e.g. \'{"kind": "container", "image": "vllm/vllm", '
                      '"ports": [8000]}\'.'),
    click.option("--on-failure", type=click.Choice(["replace", "fail"]), default=None,
                 help="A lease that fails to deliver: replace it on another pool (default) or end there."),
    click.option("--max-replacements", type=click.IntRange(0, 10), default=None,
                 help="Replacements allowed before the request ends failed (default 2)."),
]
WORKLOAD_OPTIONS = ("ssh_keys", "process", "workload_env", "workload_json", "on_failure", "max_replacements")


def workload_body(kw: dict[str, Any]) -> dict[str, Any]:
    """The request fields the workload options give (checked by the caller against the
    broker's schema with the rest of the request)."""
    chosen = [name for name, given in (("--workload-ssh-key", kw["ssh_keys"]), ("--workload-process", kw["process"]),
                                       ("--workload-json", kw["workload_json"])) if given]
    if len(chosen) > 1:
        raise click.UsageError(f"one workload per request: {' and '.join(chosen)} were both given")
    if kw["workload_env"] and not kw["process"]:
        raise click.UsageError("--workload-env goes with --workload-process (in --workload-json, give \"env\")")
    body: dict[str, Any] = {}
    if kw["ssh_keys"]:
        body["workload"] = {"kind": "ssh", "public_keys": [_public_key(p) for p in kw["ssh_keys"]]}
    elif kw["process"]:
        try:
            command = shlex.split(kw["process"])
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="'--workload-process'") from None
        if not command:
            raise click.BadParameter("the command is empty", param_hint="'--workload-process'")
        env = {}
        for item in kw["workload_env"]:
            name, eq, value = item.partition("=")
            if not eq or not name:
                raise click.BadParameter(f"{item!r} is not NAME=VALUE", param_hint="'--workload-env'")
            env[name] = value
        body["workload"] = {"kind": "process", "command": command, **({"env": env} if env else {})}
    elif kw["workload_json"]:
        try:
            body["workload"] = json.loads(kw["workload_json"])
        except ValueError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="'--workload-json'") from None
    for name in ("on_failure", "max_replacements"):
        if kw[name] is not None:
            body[name] = kw[name]
    return body


def _public_key(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}",
                                 param_hint="'--workload-ssh-key'") from None
    if "PRIVATE KEY" in text:
        raise click.BadParameter(f"{path} is a private key; give the public one (.pub)",
                                 param_hint="'--workload-ssh-key'")
    return text


# --- progress --------------------------------------------------------------------------------
def _at(lease: LeaseView | Attempt) -> str:
    return f"pool {lease.pool_id} at provider {lease.provider} ({lease.region})"


def _ended(a: Attempt) -> str:
    return f"attempt on {_at(a)} {a.state}" + (f": {a.reason}" if a.reason else "")


def progress_lines(view: RequestView) -> list[str]:
    """What is true of the request now, one line per fact (printed once each)."""
    rid = view.request_id
    attempts = {a.lease_id: a for a in view.attempts}
    lines = [f"request {rid}: {_ended(a)}" for a in view.attempts if a.state in ("failed", "lost")]
    if view.state == "queued":
        eta = f", estimated wait {view.estimated_wait_s:.0f}s" if view.estimated_wait_s is not None else ""
        lines.append(f"request {rid}: queued at position {view.queue_position}{eta}")
    elif view.state == "replacing":
        lines.append(f"request {rid}: replacing (failover is placing another attempt)")
    elif view.state != "placed":
        lines.append(f"request {rid}: {view.state}")  # the reasons follow in the error
    for lease in view.leases:
        n = f"attempt {lease.attempt}" if lease.attempt > 1 else "lease"
        after = ""
        if lease.replaces:
            old = attempts.get(lease.replaces)
            after = f" after {old.state if old else 'failure'}" + (f": {old.reason}" if old and old.reason else "")
        if lease.state == "provisioning":
            lines.append(f"request {rid}: {n} {lease.lease_id} provisioning on {_at(lease)}{after}")
        else:
            lines.append(f"request {rid}: {n} {lease.lease_id} ready on {_at(lease)}{after}")
    return lines


class Progress:
    """Prints each progress line once, as the views come (``wait_ready``'s ``on_change``)."""

    def __init__(self) -> None:
        self.said: set[str] = set()

    def __call__(self, view: RequestView) -> None:
        for line in progress_lines(view):
            if line not in self.said:
                self.said.add(line)
                note(escape(line))


def wait_for_ready(broker: BrokerClient, view: RequestView, seconds: float) -> RequestView:
    """``request --wait``: until every lease is ready, saying how it goes."""
    progress = Progress()
    progress(view)
    with waiting(f"request {view.request_id}: waiting until ready"):
        return broker.wait_ready(view.request_id, timeout=seconds, on_change=progress)


# --- how to reach it -------------------------------------------------------------------------
def reach_lines(lease: LeaseView) -> list[str]:
    """How the tenant uses a ready lease: for ssh the exact command, else the job, nodes,
    devices, URLs and variables the provider gave."""
    a: Access | None = lease.access
    if lease.state != "ready":
        return [f"still provisioning on {lease.pool_id} (until {_time(lease.provision_deadline)})"]
    if a is None:
        return ["capacity only: nothing was delivered (no workload)"] if not lease.delivery else []
    lines = []
    if lease.delivery == "ssh" and a.host:
        target = f"{a.user}@{a.host}" if a.user else a.host
        lines.append("ssh " + (f"-p {a.port} " if a.port else "") + target)
    elif a.host:
        lines.append(f"host {a.host}" + (f" port {a.port}" if a.port else "") + (f" user {a.user}" if a.user else ""))
    if a.job_id:
        lines.append(f"job {a.job_id}")
    if a.nodes:
        lines.append("nodes " + ", ".join(a.nodes))
    if a.devices:
        lines.append("devices " + ",".join(str(d) for d in a.devices))
    lines += [f"url {u}" for u in a.urls]
    lines += [f"env {k}={v}" for k, v in a.env.items()]
    if a.note:
        lines.append(f"note {a.note}")
    return lines


def _time(at: Any) -> str:
    return at.isoformat(timespec="seconds") if at is not None else "-"


def show_access(view: RequestView) -> None:
    """Each lease and how to reach it, as plain lines a person can copy."""
    console = out()
    for lease in view.leases:  # the heading wraps; a line to copy (a command, a URL) never does
        console.print(f"lease {lease.lease_id} {lease.state}: {lease.units}× {lease.model} on {lease.pool_id} "
                      f"({lease.provider})", highlight=False, markup=False)
        for line in reach_lines(lease):
            console.print(f"  {line}", soft_wrap=True, highlight=False, markup=False)


# --- status, requests ------------------------------------------------------------------------
def show_status(view: RequestView) -> None:
    console = out()
    console.print(f"request {view.request_id}: {view.state}", highlight=False, markup=False)
    for reason in view.reasons:
        console.print(f"  • {reason}", soft_wrap=True, highlight=False, markup=False)
    if view.state == "queued":
        eta = f", estimated wait {view.estimated_wait_s:.0f}s" if view.estimated_wait_s is not None else ""
        console.print(f"  queued at position {view.queue_position}{eta}", highlight=False, markup=False)
    if view.attempts:
        rows = [[str(n), a.lease_id, a.pool_id, a.provider, a.state, a.reason or "-", "yes" if a.charged else "no"]
                for n, a in enumerate(view.attempts, 1)]
        show("attempts", ("#", "lease", "pool", "provider", "state", "reason", "charged"), rows, right=("#",))
    if view.leases:
        show_access(view)


def show_requests(views: list[RequestView]) -> None:
    rows = []
    for v in views:
        ready = sum(1 for lease in v.leases if lease.state == "ready")
        leases = f"{ready}/{len(v.leases)} ready" if v.leases else ("none live" if v.state == "placed" else "-")
        failed = sum(1 for a in v.attempts if a.state in ("failed", "lost"))
        rows.append([v.request_id, v.state, v.created_at.isoformat(timespec="seconds"), leases,
                     str(len(v.attempts)) + (f" ({failed} failed)" if failed else "")])
    show("requests" if rows else "no requests", ("request", "state", "created", "leases", "attempts"), rows)


def register(cli: click.Group, setup: Any, json_option: Any, client: Any) -> None:
    """``status``, ``requests``, ``cancel`` (``setup`` and ``client`` as in apps.py)."""

    @cli.command()
    @click.argument("request_id")
    @setup
    @json_option
    @handled
    def status(ctx, request_id, url, key, tenant, data_dir, as_json) -> None:  # noqa: ANN001
        """A request: its state, attempts, leases and how to reach them."""
        with client(url, key, tenant, data_dir) as broker, waiting("asking the broker"):
            view = broker.status(request_id)
        print_json(view) if as_json else show_status(view)

    @cli.command()
    @click.option("--state", type=click.Choice(get_args(RequestState)), help="Only requests in this state.")
    @click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True)
    @setup
    @json_option
    @handled
    def requests(ctx, state, limit, url, key, tenant, data_dir, as_json) -> None:  # noqa: ANN001
        """Your requests, newest first."""
        with client(url, key, tenant, data_dir) as broker, waiting("asking the broker"):
            found = broker.requests(state=state, limit=limit)
        print_json(found) if as_json else show_requests(found)

    @cli.command()
    @click.argument("request_id")
    @setup
    @json_option
    @handled
    def cancel(ctx, request_id, url, key, tenant, data_dir, as_json) -> None:  # noqa: ANN001
        """Cancel a queued request (release the leases of a placed one)."""
        with client(url, key, tenant, data_dir) as broker:
            view = broker.cancel(request_id)
        if as_json:
            print_json(view)
        else:
            out().print(f"request {view.request_id}: {view.state}", highlight=False, markup=False)
