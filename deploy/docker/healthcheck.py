"""Container healthcheck for the Compute Broker image: ``GET <path>`` on this
container's service, exit 0 on HTTP 200 and 1 otherwise.

    python /opt/cb/healthcheck.py /health

One image runs every service, chosen by its command (``python -m services.registry``),
so the port is found the way ``services.common.serve`` finds it: ``CB_PORT`` when set,
otherwise the ``<service>_port`` setting (``CB_REGISTRY_PORT`` or its default) of the
service named in PID 1's command line. Standard library plus the project's settings
only: the slim image has no curl.
"""

from __future__ import annotations

import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence

_SERVICE = re.compile(r"^services\.([a-z_][a-z0-9_]*)(?:\.__main__)?$")
_WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]", "*"}


def service_from_argv(argv: Sequence[str]) -> str | None:
    """``registry`` from ``python -m services.registry`` (also behind an init such as
    ``docker-init -- python -m services.registry``)."""
    for arg in argv:
        match = _SERVICE.match(arg)
        if match:
            return match.group(1)
    return None


def pid1_argv() -> list[str]:
    try:
        with open("/proc/1/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def resolve_port(environ: Mapping[str, str], argv: Sequence[str]) -> int:
    if environ.get("CB_PORT"):
        return int(environ["CB_PORT"])
    service = service_from_argv(argv)
    if service is None:
        raise LookupError(f"no CB_PORT and no `python -m services.<name>` in {list(argv)!r}")
    from services.common.settings import settings_from_env

    port = getattr(settings_from_env(environ), f"{service}_port", None)
    if not isinstance(port, int):
        raise LookupError(f"no setting {service}_port for service {service!r}")
    return port


def health_url(environ: Mapping[str, str], argv: Sequence[str], path: str = "/health") -> str:
    host = environ.get("CB_HOST", "").strip()
    if host in _WILDCARD_HOSTS:
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{resolve_port(environ, argv)}{path}"


def main(args: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if args is None else args)
    path = args[0] if args else "/health"
    try:
        url = health_url(os.environ, pid1_argv(), path)
        with urllib.request.urlopen(url, timeout=3) as response:  # noqa: S310 (http on loopback)
            if response.status == 200:
                return 0
            print(f"{url}: HTTP {response.status}", file=sys.stderr)
    except (OSError, LookupError, ValueError, urllib.error.URLError) as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
