"""``cbroker events``: the registry's event stream, one readable line per event.

Without ``--follow`` it prints what happened since ``--since`` (default the last hour),
in time order across the kinds, and exits; with ``--follow`` it keeps printing, and
reconnects after a drop from the last event id it printed, so nothing is missed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import click
import httpx
from rich.markup import escape

from .apps import demo_keys
from .options import data_dir_option, key_option, url_option
from .term import Refused, ServiceFailed, handled, note, out


@dataclass
class SseEvent:
    data: str = ""
    event: str = "message"
    id: str | None = None
    fields: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.data)


def parse_sse(lines: Iterable[str]) -> Iterator[SseEvent]:
    """The text/event-stream format (WHATWG), line by line: comments skipped, ``data``
    lines joined, an event dispatched at each blank line."""
    data: list[str] = []
    event, last_id, has = "message", None, False
    for line in lines:
        line = line.rstrip("\r\n")
        if line == "":
            if has:
                yield SseEvent(data="\n".join(data), event=event, id=last_id)
            data, event, has = [], "message", False
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
            has = True
        elif name == "event":
            event, has = value, True
        elif name == "id":
            last_id, has = value, True


# --- one line per event -----------------------------------------------------------------
_STYLE = {"capacity": "cyan", "alloc": "green", "request": "yellow", "billing": "magenta"}
_BASIS = {"unit_hour": "unit-h", "unit_month": "unit-month"}
_BAD = ("offline", "removed", "lost", "revoked", "preempted", "rejected", "exhausted", "expired")


def describe(kind: str, e: dict[str, Any]) -> str:
    """The facts an operator scans for, per event type."""
    t = e.get("type", "?")
    if kind == "capacity":
        pool = e.get("pool") or {}
        spec = pool.get("spec") or {}
        sharing = (spec.get("sharing") or {}).get("mode", "none")
        extra = (f" {spec.get('units')}× {spec.get('model')}" + (f" shared by {sharing}" if sharing != "none" else "")
                 if spec else "")
        tail = f" free {e['free']}" if "free" in e and t != "pool.offline" else ""
        reason = f" ({e['reason']})" if e.get("reason") else ""
        return f"{e.get('region')}/{e.get('provider')} pool {e.get('pool_id')}{extra}{tail}{reason}"
    if kind == "alloc":
        lease = e.get("lease") or {}
        why = e.get("reason") or (f"by {e['by_request']}" if e.get("by_request") else "")
        milli = lease.get("milli", 1000)
        share = f"{milli}/1000 of " if milli != 1000 else ""
        devices = f" device {','.join(map(str, lease['devices']))}" if lease.get("devices") else ""
        return (f"{lease.get('tenant')} lease {lease.get('lease_id')} {lease.get('units')}× {share}{lease.get('model')} "
                f"on {lease.get('region')}/{lease.get('pool_id')}{devices} {lease.get('billing')} "
                f"{lease.get('unit_price')} {lease.get('currency')}/{_BASIS.get(lease.get('price_basis'), 'unit-h')}"
                + (f" ({why})" if why else ""))
    if kind == "request":
        bits = [str(e.get("tenant")), f"request {e.get('request_id')}"]
        if e.get("units"):
            bits.append(f"{e['units']} units")
        if e.get("lease_ids"):
            bits.append("leases " + ",".join(e["lease_ids"]))
        if e.get("reasons"):
            bits.append("; ".join(e["reasons"])[:200])
        return " ".join(bits)
    if kind == "billing":
        if t == "invoice.issued":
            return f"{e.get('tenant')} {e.get('period')} " + ", ".join(f"{v} {k}" for k, v in
                                                                     (e.get("totals") or {}).items())
        return f"{e.get('tenant')} spent {e.get('spent')} of {e.get('budget')} {e.get('currency')}"
    return json.dumps(e)[:200]


def line_for(envelope: dict[str, Any]) -> str:
    """Rich markup for one event envelope (``{kind, seq, subject, event}``)."""
    kind, e = envelope["kind"], envelope["event"]
    t = e.get("type", "?")
    at = str(e.get("at", ""))[:19].replace("T", " ")
    style = "red" if any(b in t for b in _BAD) else _STYLE.get(kind, "white")
    return f"[dim]{at}[/] [{style}]{t:<17}[/] {escape(describe(kind, e))}"


# --- the command ---------------------------------------------------------------------------
def _key(key: str | None, data_dir: Path) -> str:
    if key:
        return key
    keys = demo_keys(data_dir)
    if keys is not None and keys.get("ops"):
        return keys["ops"]
    admin = data_dir / "admin-key"
    if admin.exists():
        return admin.read_text().strip()
    raise click.UsageError("give --key (or $CB_KEY), or run from where `cbroker up` wrote its keys")


@dataclass
class Cursor:
    """Where a reconnect resumes (``Last-Event-ID``): the id of the last event printed, or
    before the first, the id of the stream's start (its ``ready`` event)."""
    last_id: str | None = None


def _at(envelope: dict[str, Any]) -> float:
    """When the event happened (events without a readable time sort first)."""
    try:
        return datetime.fromisoformat(str(envelope["event"]["at"])).timestamp()
    except (KeyError, TypeError, ValueError):
        return 0.0


def _stream(url: str, key: str, params: dict[str, str], cursor: Cursor, as_json: bool) -> bool:
    """One connection; True when the server ended the feed. Without ``follow`` the events
    are gathered and printed in time order (the server sends each kind's backlog as it
    comes); with it, each is printed as it arrives and the cursor moves past it."""
    headers = {"Authorization": f"Bearer {key}", "Accept": "text/event-stream"}
    if cursor.last_id:
        headers["Last-Event-ID"] = cursor.last_id
    follow = params.get("follow") != "false"
    history: list[tuple[float, int, SseEvent]] = []
    console, ended = out(), False
    with httpx.stream("GET", f"{url}/v1/events", params=params, headers=headers,
                      timeout=httpx.Timeout(10.0, read=60.0)) as r:
        if r.status_code != 200:
            r.read()
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise (ServiceFailed if r.status_code >= 500 else Refused)(f"{r.status_code}: {detail}")
        for ev in parse_sse(r.iter_lines()):
            if ev.event == "end":
                ended = True
                break
            if ev.event == "ready" and follow:  # where this connection starts: a reconnect resumes there
                cursor.last_id = ev.id or cursor.last_id
            if ev.event != "message":
                continue
            if not follow:
                history.append((_at(ev.json()), len(history), ev))
                continue
            _print(ev, as_json, console)
            cursor.last_id = ev.id or cursor.last_id
    for _, _, ev in sorted(history, key=lambda h: h[:2]):
        _print(ev, as_json, console)
    return ended


def _print(ev: SseEvent, as_json: bool, console) -> None:  # noqa: ANN001
    if as_json:
        click.echo(ev.data)
    else:
        console.print(line_for(ev.json()), soft_wrap=True)  # one line per event, for grep


def register(cli: click.Group) -> None:
    @cli.command("events")
    @click.option("--follow", "-f", is_flag=True, help="Keep printing new events (Ctrl-C stops).")
    @click.option("--kind", help="capacity, alloc, request, billing (comma-separated).")
    @click.option("--type", "type_", help="Event types, e.g. lease.granted,pool.offline.")
    @click.option("--region")
    @click.option("--provider")
    @click.option("--tenant")
    @click.option("--since", default=None,
                  help="An event id, a duration (15m, 2h, 1d), an ISO time, or 'all'. "
                       "Default: 1h without --follow, now with it.")
    @click.option("--json", "as_json", is_flag=True, help="Print each event envelope as JSON.")
    @url_option("registry")
    @key_option("API key (default $CB_KEY, else the ops key of `cbroker up --demo`).")
    @data_dir_option
    @handled
    def events(follow: bool, kind: str | None, type_: str | None, region: str | None, provider: str | None,
               tenant: str | None, since: str | None, as_json: bool, url: str, key: str | None,
               data_dir: Path) -> None:
        """Watch the event stream (capacity, allocations, requests, billing)."""
        params = {k: v for k, v in (("kind", kind), ("type", type_), ("region", region), ("provider", provider),
                                    ("tenant", tenant)) if v}
        since = since or (None if follow else "1h")
        if since:
            params["since"] = since
        if not follow:
            params["follow"] = "false"
        token = _key(key, data_dir)
        cursor = Cursor()
        backoff = 0.5
        try:
            while True:
                seen = cursor.last_id
                try:
                    if _stream(url.rstrip("/"), token, params, cursor, as_json) or not follow:
                        return
                    why = "the server closed the stream"
                except httpx.TransportError as exc:
                    if not follow:
                        raise
                    why = f"connection lost ({exc or type(exc).__name__})"
                note(f"[dim]{why}; resuming after {cursor.last_id or 'now'}[/]")
                backoff = 0.5 if cursor.last_id != seen else min(backoff * 2, 10.0)
                time.sleep(backoff)
        except KeyboardInterrupt:
            return
