"""The ``cbroker`` command line."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import traceback
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from .apps import register as register_app_commands
from .audit import register as register_audit_command
from .billing import register as register_billing_commands
from .events import register as register_events_command
from .importer import import_group
from .provider import register as register_provider_commands
from .term import INTERNAL, INTERRUPTED, LocalError, as_click_error
from .up import UpOptions, run_up

console = Console()
_verbose = False
PORT = click.IntRange(1, 65535)


class Cli(click.Group):
    """The command group, which turns every failure into one line on stderr and an exit
    code; ``-v`` adds the traceback of an unexpected one."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:  # a program calling in: it handles the exceptions
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            click.echo("interrupted", err=True)
            sys.exit(INTERRUPTED)
        except click.exceptions.NoArgsIsHelpError as e:  # a bare command group: its help, as click shows it
            e.show()
            sys.exit(e.exit_code)
        except click.ClickException as e:
            _say(e)
            sys.exit(e.exit_code)
        except Exception as e:  # noqa: BLE001 - the one place every failure ends up
            known = as_click_error(e)
            if known is not None:
                _say(known)
                sys.exit(known.exit_code)
            if _verbose:
                traceback.print_exc()
            click.echo(f"Error: internal error: {type(e).__name__}: {e} (run with -v for the traceback)".replace(
                "\n", " "), err=True)
            sys.exit(INTERNAL)
        sys.exit(0)


def _say(e: click.ClickException) -> None:
    message = " ".join(e.format_message().split())
    hint = ""
    if isinstance(e, click.UsageError) and e.ctx is not None:
        hint = f" (see {e.ctx.command_path} --help)"
    click.echo(f"Error: {message}{hint}", err=True)


@click.group(cls=Cli)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging, and the traceback of an unexpected error.")
def cli(verbose: bool) -> None:
    """Compute Broker: a cross-region broker for accelerated compute.

    Exit codes: 0 done, 1 refused by the service, 2 bad usage, 3 service unreachable,
    4 service failed (5xx), 5 local problem (e.g. a port in use), 70 internal error,
    130 interrupted (docs/cli.md)."""
    global _verbose
    _verbose = verbose
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.DEBUG if verbose else logging.WARNING)


def check_ports_free(ports: dict[str, int | None]) -> None:
    """Refuse at once, naming the option, when a port asked for is taken (a server that
    cannot bind would otherwise fail later, in its own log)."""
    for option, port in ports.items():
        if port is None:
            continue
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no owner
            try:
                s.bind(("127.0.0.1", port))
            except OSError as exc:
                raise LocalError(f"port {port} ({option}) is not free on 127.0.0.1: {exc.strerror}") from None


@cli.command()
@click.option("--demo", is_flag=True, help="Load the demo world and keep its providers heartbeating.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=Path(".cbroker"),
              show_default=True, help="Server data, logs and key files.")
@click.option("--nats-port", type=PORT, default=None, help="nats-server port (default: a free port).")
@click.option("--redis-port", type=PORT, default=None, help="redis-server port (default: a free port).")
@click.option("--registry-port", type=PORT, default=8081, show_default=True)
@click.option("--broker-port", type=PORT, default=8082, show_default=True)
@click.option("--meter-port", type=PORT, default=8083, show_default=True)
@click.option("--demo-pace", type=click.FloatRange(min=0.001), default=1.0, show_default=True,
              help="Speed of the demo tenants' workload: every wait is multiplied by this (0.1 = ten times faster).")
@click.option("--json", "as_json", is_flag=True,
              help="Once everything is up, print one line of JSON (every URL, the data dir) instead of the table.")
def up(demo: bool, data_dir: Path, nats_port: int | None, redis_port: int | None, registry_port: int,
       broker_port: int, meter_port: int, demo_pace: float, as_json: bool) -> None:
    """Start NATS, Redis and every service on loopback (NATS_URL/REDIS_URL: use running servers)."""
    check_ports_free({"--registry-port": registry_port, "--broker-port": broker_port, "--meter-port": meter_port,
                      "--nats-port": nats_port, "--redis-port": redis_port})
    opts = UpOptions(data_dir=data_dir.resolve(), demo=demo, nats_port=nats_port, redis_port=redis_port,
                     ports={"registry": registry_port, "broker": broker_port, "meter": meter_port},
                     demo_pace=demo_pace, as_json=as_json)
    raise SystemExit(asyncio.run(run_up(opts, console)))


cli.add_command(import_group)
register_app_commands(cli)
register_billing_commands(cli)
register_events_command(cli)
register_audit_command(cli)
register_provider_commands(cli)
