"""Who may watch what, and positions across the four event streams (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.cli.events import line_for, parse_sse
from services.common.auth import Principal
from services.common.errors import BadRequest, Forbidden
from services.registry.domain.event_scope import (
    EventFilter,
    format_cursor,
    parse_cursor,
    parse_filter,
    parse_since,
    plan,
)

OPS = Principal(role="ops")
PROV = Principal(role="provider", subject="acme")
TEN = Principal(role="tenant", subject="t1")
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def subjects_of(who: Principal, **f: object) -> dict[str, str]:
    p = plan(who, EventFilter(**f), "cb")  # type: ignore[arg-type]
    return {s.kind: s.filter_subject for s in p.streams}


def test_ops_sees_every_kind_and_filters_become_subjects() -> None:
    assert subjects_of(OPS) == {"capacity": "cb.events.capacity.*.*", "alloc": "cb.events.alloc.*.*",
                                "request": "cb.events.request.*", "billing": "cb.events.billing.*"}
    # a region filter leaves out the kinds that carry no region
    assert subjects_of(OPS, region="cn-yrd") == {"capacity": "cb.events.capacity.cn-yrd.*",
                                                 "alloc": "cb.events.alloc.cn-yrd.*"}
    assert subjects_of(OPS, tenant="t9") == {"alloc": "cb.events.alloc.*.t9", "request": "cb.events.request.t9",
                                             "billing": "cb.events.billing.t9"}


def test_scoped_roles_are_narrowed_to_their_own() -> None:
    assert subjects_of(PROV) == {"capacity": "cb.events.capacity.*.acme", "alloc": "cb.events.alloc.*.*"}
    alloc = next(s for s in plan(PROV, EventFilter(), "cb").streams if s.kind == "alloc")
    assert alloc.provider == "acme"  # leases on its own pools only, checked inside each event
    assert subjects_of(TEN) == {"alloc": "cb.events.alloc.*.t1", "request": "cb.events.request.t1",
                                "billing": "cb.events.billing.t1"}
    with pytest.raises(Forbidden):
        plan(PROV, EventFilter(provider="other"), "cb")
    with pytest.raises(Forbidden):
        plan(TEN, EventFilter(tenant="t2"), "cb")
    with pytest.raises(Forbidden):
        plan(TEN, EventFilter(kinds=("capacity",)), "cb")
    with pytest.raises(Forbidden):
        plan(PROV, EventFilter(kinds=("billing",)), "cb")


@pytest.mark.parametrize("args", [
    dict(kind="weather"), dict(region="a.b"), dict(provider=">"), dict(tenant="*"),
    dict(type_="lease"), dict(type_="lease.granted;drop"),
])
def test_bad_filters_are_refused(args: dict) -> None:
    full = dict(kind=None, type_=None, region=None, provider=None, tenant=None) | args
    with pytest.raises(BadRequest):
        parse_filter(full["kind"], full["type_"], full["region"], full["provider"], full["tenant"])


def test_lists_are_comma_separated_and_deduplicated() -> None:
    f = parse_filter("alloc, capacity,alloc,", "lease.granted", None, None, None)
    assert f.kinds == ("alloc", "capacity") and f.types == ("lease.granted",)


def test_types_narrow_the_streams_watched() -> None:
    assert set(subjects_of(OPS, types=("lease.granted", "invoice.issued"))) == {"alloc", "billing"}
    assert set(subjects_of(TEN, types=("pool.offline", "lease.lost"))) == {"alloc"}  # no capacity for a tenant
    with pytest.raises(BadRequest):
        plan(TEN, EventFilter(types=("pool.offline",)), "cb")  # nothing a tenant may watch holds it


def test_a_filter_no_kind_can_carry_is_a_400() -> None:
    with pytest.raises(BadRequest):
        plan(OPS, EventFilter(kinds=("request",), region="cn-yrd"), "cb")
    with pytest.raises(BadRequest):
        plan(OPS, EventFilter(region="cn-yrd", tenant="t1", provider="acme", kinds=("capacity",)), "cb")


@given(st.lists(st.integers(min_value=0, max_value=2**62), min_size=4, max_size=4))
def test_cursor_round_trips(seqs: list[int]) -> None:
    cursor = dict(zip(("capacity", "alloc", "request", "billing"), seqs, strict=True))
    assert parse_cursor(format_cursor(cursor)) == cursor


@pytest.mark.parametrize("raw", ["", "1-2-3", "1-2-3-4-5", "a-b-c-d", "-1-2-3", "1--2-3", "1-2-3-99999999999999999999"])
def test_bad_cursors_are_refused(raw: str) -> None:
    with pytest.raises(BadRequest):
        parse_cursor(raw)


def test_since_forms() -> None:
    assert parse_since(None, None, NOW).cursor is None and not parse_since(None, None, NOW).beginning
    assert parse_since(None, "all", NOW).beginning
    assert parse_since(None, "15m", NOW).time == NOW - timedelta(minutes=15)
    assert parse_since(None, "2d", NOW).time == NOW - timedelta(days=2)
    assert parse_since(None, "2026-11-25T10:00:00", NOW).time == datetime(2026, 11, 25, 10, tzinfo=UTC)
    assert parse_since(None, "2026-11-25", NOW).time == datetime(2026, 11, 25, tzinfo=UTC)
    assert parse_since(None, "1-2-3-4", NOW).cursor == {"capacity": 1, "alloc": 2, "request": 3, "billing": 4}
    # an EventSource reconnecting sends Last-Event-ID; the URL still has the first since
    assert parse_since("5-6-7-8", "15m", NOW).cursor == {"capacity": 5, "alloc": 6, "request": 7, "billing": 8}
    for bad in ("yesterday", "15 m", "1-2", "10x"):
        with pytest.raises(BadRequest):
            parse_since(None, bad, NOW)


def test_sse_parser_follows_the_format() -> None:
    text = ("retry: 2000\nevent: ready\nid: 0-0-0-0\ndata: {}\n\n: keep-alive\n\n"
            "id: 1-0-0-0\ndata: line one\ndata: line two\n\ndata:no space\n\n")
    events = list(parse_sse(text.splitlines(keepends=True)))
    assert [(e.event, e.id, e.data) for e in events] == [
        ("ready", "0-0-0-0", "{}"), ("message", "1-0-0-0", "line one\nline two"), ("message", "1-0-0-0", "no space")]


def test_cli_lines_say_what_happened() -> None:
    env = {"kind": "alloc", "seq": 3, "subject": "cb.events.alloc.cn-yrd.t1", "event": {
        "type": "lease.lost", "at": "2026-11-25T10:00:00Z", "reason": "pool offline",
        "lease": {"lease_id": "lease_1", "tenant": "t1", "units": 8, "model": "huawei-ascend-910b",
                  "region": "cn-yrd", "pool_id": "p1", "billing": "on_demand", "unit_price": "1.20",
                  "currency": "USD"}}}
    line = line_for(env)
    assert "[red]lease.lost" in line and "8× huawei-ascend-910b on cn-yrd/p1" in line and "pool offline" in line
