"""Options several commands share, written once: where each service is, the API key,
the data directory of ``cbroker up``, and applying a list of them to a command."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import click

PORTS = {"registry": 8081, "broker": 8082, "meter": 8083}  # the ports ``cbroker up`` uses by default


def url_option(service: str, dest: str | None = "url") -> Callable:
    """``--<service>-url``: default ``$CB_<SERVICE>_URL``, else the service on loopback."""
    env, default = f"CB_{service.upper()}_URL", f"http://127.0.0.1:{PORTS[service]}"
    names = [f"--{service}-url", *([dest] if dest else [])]
    return click.option(*names, default=lambda: os.environ.get(env, default), show_default=f"${env} or {default}")


def key_option(help: str, required: bool = False) -> Callable:  # noqa: A002 - click's name
    return click.option("--key", default=lambda: os.environ.get("CB_KEY"), required=required, help=help)


data_dir_option = click.option("--data-dir", type=click.Path(path_type=Path), default=Path(".cbroker"),
                               show_default=True)


def with_options(options: Sequence[Callable]) -> Callable:
    """The options applied to a command, shown in ``--help`` in the order listed."""
    def decorate(f):  # noqa: ANN001, ANN202
        for option in reversed(options):
            f = option(f)
        return f
    return decorate
