"""The ``cbroker`` command line."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import click
from rich.console import Console

from .apps import register as register_app_commands
from .audit import register as register_audit_command
from .billing import register as register_billing_commands
from .events import register as register_events_command
from .importer import import_group
from .up import UpOptions, run_up

console = Console()


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def cli(verbose: bool) -> None:
    """Compute Broker: a cross-region broker for accelerated compute."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.DEBUG if verbose else logging.WARNING)


@cli.command()
@click.option("--demo", is_flag=True, help="Load the demo world and keep its providers heartbeating.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=Path(".cbroker"),
              show_default=True, help="Server data, logs and key files.")
@click.option("--nats-port", type=int, default=None, help="nats-server port (default: a free port).")
@click.option("--redis-port", type=int, default=None, help="redis-server port (default: a free port).")
@click.option("--registry-port", type=int, default=8081, show_default=True)
@click.option("--broker-port", type=int, default=8082, show_default=True)
@click.option("--meter-port", type=int, default=8083, show_default=True)
@click.option("--demo-pace", type=click.FloatRange(min=0.001), default=1.0, show_default=True,
              help="Speed of the demo tenants' workload: every wait is multiplied by this (0.1 = ten times faster).")
def up(demo: bool, data_dir: Path, nats_port: int | None, redis_port: int | None, registry_port: int,
       broker_port: int, meter_port: int, demo_pace: float) -> None:
    """Start NATS, Redis and every service on loopback (NATS_URL/REDIS_URL: use running servers)."""
    opts = UpOptions(data_dir=data_dir.resolve(), demo=demo, nats_port=nats_port, redis_port=redis_port,
                     ports={"registry": registry_port, "broker": broker_port, "meter": meter_port},
                     demo_pace=demo_pace)
    raise SystemExit(asyncio.run(run_up(opts, console)))


cli.add_command(import_group)
register_app_commands(cli)
register_billing_commands(cli)
register_events_command(cli)
register_audit_command(cli)
