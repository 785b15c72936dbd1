"""The provider's commands: ``cbroker agent`` (run the agent), ``cbroker pools`` (mine),
``cbroker pool register|drain|undrain|remove``, ``cbroker assignments`` and
``cbroker logs LEASE_ID`` (a lease's output on this host).

Like the app commands: a table that fits the terminal or ``--json``, one-line errors with
the documented exit codes. The key is a provider's (``--key``/``$CB_KEY``, or with the
demo's keys file ``--provider NAME``).
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import click
import httpx
import msgspec

from services.common.client_errors import raise_for_problem
from services.common.messages import MILLI, PoolSpec, Sharing

from .apps import demo_keys, units_text
from .demo_agent import AGENT_DIR as DEMO_AGENT_DIR
from .demo_agent import PROVIDER as DEMO_PROVIDER
from .options import data_dir_option, key_option, url_option, with_options
from .term import LocalError, handled, print_json, show, waiting

POOL_COLUMNS = ("pool", "region", "model", "units", "free", "status", "delivers")
ASSIGNMENT_COLUMNS = ("lease", "pool", "tenant", "units", "state", "delivers", "expires")



def share_range(sharing: Sharing) -> str:
    """``time_slice >= 100/1000``, or ``memory 125-125/1000`` for a pool with a largest share."""
    if sharing.max_milli >= MILLI:
        return f"{sharing.mode} >= {sharing.min_milli}/1000"
    return f"{sharing.mode} {sharing.min_milli}-{sharing.max_milli}/1000"

def provider_key(key: str | None, provider: str | None, data_dir: Path) -> str:
    if key:
        return key
    keys = demo_keys(data_dir)
    if keys is None:
        raise click.UsageError("give --key (or $CB_KEY) with a provider key, or run from where "
                               "`cbroker up --demo` wrote its keys")
    providers = keys.get("providers", {})
    if provider is None:
        provider = DEMO_PROVIDER if DEMO_PROVIDER in providers else next(iter(providers))
    if provider not in providers:
        raise click.BadParameter(f"no demo provider {provider!r}; the demo providers are {', '.join(providers)}",
                                 param_hint="'--provider'")
    return providers[provider]


def _client(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=15)


def pool_row(p: dict[str, Any]) -> list[str]:
    return [p["pool_id"], p["region"], p["model"], str(p["capacity"]), str(p["free"]), p["status"],
            ",".join(p["spec"].get("delivery") or []) or "-"]


def register(cli: click.Group) -> None:
    registry_common = [url_option("registry"), key_option("Provider API key (default $CB_KEY)."),
                       click.option("--provider", help="With the demo keys file: which demo provider."),
                       data_dir_option]
    json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")

    @cli.command()
    @click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
                  help="The agent's agent.toml (docs/agent.md).")
    @click.option("--check", "check_only", is_flag=True,
                  help="Check the config and discovery, print the pools as they would be registered, and exit.")
    @json_option
    @handled
    def agent(config_path: Path, check_only: bool, as_json: bool) -> None:
        """Run the provider agent: register the pools, heartbeat, deliver leases (docs/agent.md)."""
        from services.agent.agent import AgentError
        from services.agent.config import ConfigError
        from services.agent.lock import AlreadyRunning
        from services.agent.run import check_only as check_agent
        from services.agent.run import run_agent

        try:
            if not check_only:
                asyncio.run(run_agent(config_path))
                return
            plans, found = asyncio.run(check_agent(config_path))
        except (ConfigError, AlreadyRunning, AgentError) as exc:
            raise LocalError(str(exc)) from None
        if as_json:
            print_json({"pools": [{"pool_id": p.pool_id, "backend": p.backend, "devices": list(p.devices),
                                   "spec": p.spec} for p in plans],
                        "unmapped": [d.unmapped for d in found.unmapped], "errors": list(found.errors)})
            return
        show("pools as the agent would register them",
             ("pool", "backend", "model", "units", "devices", "delivers", "shares"),
             [[p.pool_id, p.backend, p.model, str(p.spec.units), ",".join(map(str, p.devices)) or "-",
               ",".join(p.spec.delivery),
               "-" if p.spec.sharing.mode == "none" else share_range(p.spec.sharing)]
              for p in plans], right=("units",))
        for line in [d.unmapped for d in found.unmapped] + list(found.errors):
            click.echo(f"  • not sold: {line}")

    @cli.command()
    @with_options(registry_common)
    @json_option
    @handled
    def pools(url: str, key: str | None, provider: str | None, data_dir: Path, as_json: bool) -> None:
        """Your pools, with their live status."""
        with _client(url, provider_key(key, provider, data_dir)) as c, waiting("asking the registry"):
            me = raise_for_problem(c.get("/v1/keys/self")).json()
            if me["role"] != "provider":
                raise click.UsageError(f"this is a {me['role']} key; `cbroker pools` lists a provider's own pools")
            items, cursor = [], None
            while True:
                page = raise_for_problem(c.get("/v1/pools", params={"provider": me["subject"], "limit": 1000,
                                                                    **({"cursor": cursor} if cursor else {})})).json()
                items += page["items"]
                cursor = page.get("next_cursor")
                if not cursor:
                    break
        if as_json:
            print_json(items)
            return
        show(f"pools of {me['subject']}", POOL_COLUMNS, [pool_row(p) for p in items], right=("units", "free"))

    @cli.group()
    def pool() -> None:
        """Register, drain, undrain or remove one of your pools."""

    @pool.command("register")
    @click.argument("pool_id")
    @click.option("--spec", "spec_json", required=True,
                  help='The pool as JSON, as PUT /v1/pools takes it: {"region", "model", "units", "prices", ...}; '
                       "@FILE reads a file.")
    @with_options(registry_common)
    @json_option
    @handled
    def pool_register(pool_id: str, spec_json: str, url: str, key: str | None, provider: str | None,
                      data_dir: Path, as_json: bool) -> None:
        """Register (or replace) a pool; idempotent by pool id."""
        if spec_json.startswith("@"):
            try:
                spec_json = Path(spec_json[1:]).read_text()
            except OSError as exc:
                raise click.BadParameter(f"cannot read {spec_json[1:]}: {exc.strerror}", param_hint="'--spec'") from None
        try:
            spec = msgspec.json.decode(spec_json, type=PoolSpec)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise click.BadParameter(str(exc), param_hint="'--spec'") from None
        with _client(url, provider_key(key, provider, data_dir)) as c:
            r = raise_for_problem(c.put(f"/v1/pools/{pool_id}", content=msgspec.json.encode(spec),
                                        headers={"Content-Type": "application/json"}))
        view = r.json()
        if as_json:
            print_json(view)
            return
        show(f"pool {pool_id} {'registered' if r.status_code == 201 else 'updated'}", POOL_COLUMNS,
             [pool_row(view)], right=("units", "free"))

    def _pool_action(name: str, method: str, suffix: str, done: str, help_text: str) -> None:
        @pool.command(name, help=help_text)
        @click.argument("pool_ids", nargs=-1, required=True)
        @with_options(registry_common)
        @json_option
        @handled
        def action(pool_ids: tuple[str, ...], url: str, key: str | None, provider: str | None, data_dir: Path,
                   as_json: bool) -> None:
            results = []
            with _client(url, provider_key(key, provider, data_dir)) as c:
                for pool_id in pool_ids:
                    results.append(raise_for_problem(c.request(method, f"/v1/pools/{pool_id}{suffix}")).json())
                    if not as_json:
                        click.echo(f"{done} {pool_id}")
            if as_json:
                print_json(results)

    _pool_action("drain", "POST", "/drain", "draining", "Take no new leases on these pools (their leases go on).")
    _pool_action("undrain", "DELETE", "/drain", "undrained", "Take new leases again.")
    _pool_action("remove", "DELETE", "", "removed", "Remove pools (their leases end as lost).")

    @cli.command()
    @url_option("broker")
    @key_option("Provider API key (default $CB_KEY).")
    @click.option("--provider", help="With the demo keys file: which demo provider.")
    @data_dir_option
    @click.option("--state", "lease_state", type=click.Choice(["provisioning", "ready"]), default=None,
                  help="Only leases in this state.")
    @json_option
    @handled
    def assignments(url: str, key: str | None, provider: str | None, data_dir: Path, lease_state: str | None,
                    as_json: bool) -> None:
        """The leases on your pools: what to deliver, and where each stands."""
        params = {"state": lease_state} if lease_state else {}
        with _client(url, provider_key(key, provider, data_dir)) as c, waiting("asking the broker"):
            items = raise_for_problem(c.get("/v1/assignments", params=params)).json()
        if as_json:
            print_json(items)
            return
        rows = [[a["lease_id"], a["pool_id"], a["tenant"], _share(a), a["state"], a.get("delivery") or "-",
                 a["expires_at"][:19]] for a in items]
        show("assignments" if rows else "no assignments", ASSIGNMENT_COLUMNS, rows, right=("units",))

    @cli.command()
    @click.argument("lease_id")
    @click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
                  help="The agent's agent.toml (default: the demo agent's, under --data-dir).")
    @data_dir_option
    @click.option("-f", "--follow", is_flag=True, help="Keep printing what the workload writes until it ends.")
    @handled
    def logs(lease_id: str, config_path: Path | None, data_dir: Path, follow: bool) -> None:
        """A lease's workload output, as the agent on this host captured it."""
        from services.agent.backends.build import output_log
        from services.agent.config import ConfigError, load
        from services.common.ids import is_valid_id

        if not is_valid_id(lease_id):
            raise click.BadParameter(f"{lease_id!r} is not a lease id", param_hint="'LEASE_ID'")
        path = config_path or data_dir / DEMO_AGENT_DIR / "agent.toml"
        if not path.exists():
            raise LocalError(f"no agent config at {path}: give --config, or run from where `cbroker up --demo` "
                             "writes its data")
        try:
            config = load(path, which=lambda _: "", lookup_user=_any_user)
        except ConfigError as exc:
            raise LocalError(str(exc)) from None
        log_file = output_log(config, lease_id)
        if log_file is None:
            raise LocalError(f"no output of lease {lease_id} on this host (not run by this agent, or not started)")
        _print_log(log_file, follow, Path(config.state_dir) / "leases" / f"{lease_id}.json")


def _share(a: dict[str, Any]) -> str:
    """An assignment's units, and for a share the device it is on: "1×250/1000 @3"."""
    devices = a.get("devices") or []
    where = f" @{','.join(map(str, devices))}" if devices and a.get("milli", 1000) != 1000 else ""
    return units_text(a) + where


def _any_user(name: str) -> Any:
    """``cbroker logs`` reads files; whether the workload users exist is the agent's check."""
    import pwd
    return pwd.struct_passwd((name, "x", 65534, 65534, "", "/", "/bin/false"))


def _print_log(path: Path, follow: bool, running_marker: Path) -> None:
    try:
        with path.open("rb") as f:
            while True:
                chunk = f.read(65536)
                if chunk:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
                    continue
                if not follow or not running_marker.exists():
                    return
                time.sleep(0.3)
    except PermissionError:
        raise LocalError(f"cannot read {path}: the agent's files are readable by its user only (run as that user)") \
            from None

