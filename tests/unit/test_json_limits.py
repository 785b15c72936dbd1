"""The nesting check on raw bytes agrees with the depth of the decoded value, whatever
the strings hold (brackets, quotes, backslashes) and however the JSON is spaced."""

from __future__ import annotations

import json

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from litestar import Litestar, post

from services.common.json_limits import LimitedRequest, too_deep

TRICKY = st.text(alphabet='[]{}"\\, :abc\u00e9', max_size=12)


def depth(value: object) -> int:
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    return 0


values = st.recursive(st.none() | st.integers() | TRICKY,
                      lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TRICKY, inner, max_size=3),
                      max_leaves=40)


@given(value=values, limit=st.integers(0, 8), indent=st.sampled_from([None, 1]), ascii_only=st.booleans())
def test_agrees_with_the_decoded_depth(value: object, limit: int, indent: int | None, ascii_only: bool) -> None:
    body = json.dumps(value, indent=indent, ensure_ascii=ascii_only).encode()
    assert too_deep(body, limit) == (depth(value) > limit)


def test_unclosed_brackets_count_as_open() -> None:
    assert too_deep(b"[" * 65)
    assert not too_deep(b"[" * 64)
    assert too_deep(b'{"a":' * 65)


def test_a_deep_body_disguised_by_brackets_in_strings() -> None:
    """Strings that close and reopen brackets make the bare bracket count look shallow."""
    body = b"[" + b'["]",' * 200 + b"1" + b',"["]' * 200 + b"]"
    assert depth(json.loads(body)) == 201 and too_deep(body)


# LimitedRequest reads the body its own short way: litestar's limits and answers hold


class Body(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    n: int = 0


def _app() -> Litestar:
    @post("/echo", status_code=200)
    async def echo(data: Body) -> dict:
        return {"name": data.name, "n": data.n}

    return Litestar([echo], request_class=LimitedRequest, request_max_body_size=64, debug=False,
                    logging_config=None)


async def _post(chunks: list[bytes], headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes]:
    app = _app()
    events = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/echo", "raw_path": b"/echo", "query_string": b"", "root_path": "", "client": ("t", 1),
             "server": ("t", 80), "state": {}, "headers": [(b"content-type", b"application/json"), *headers]}
    sent: list[dict] = []

    async def receive() -> dict:
        return events.pop(0) if events else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


async def test_a_body_in_several_chunks_is_read_whole() -> None:
    status, body = await _post([b'{"na', b'me": "x",', b' "n": 3}'], [])
    assert (status, json.loads(body)) == (200, {"name": "x", "n": 3})


async def test_announced_or_streamed_bodies_over_the_limit_are_413() -> None:
    status, _ = await _post([b'{"name": "x"}'], [(b"content-length", b"65")])
    assert status == 413
    status, _ = await _post([b'{"name": "' + b"x" * 40, b"x" * 40 + b'"}'], [])  # no length announced
    assert status == 413


async def test_a_content_length_that_is_not_a_number_is_a_400_naming_it() -> None:
    status, body = await _post([b'{"name": "x"}'], [(b"Content-Length", b"12x")])
    assert status == 400 and b"content-length" in body.lower(), body


async def test_a_field_of_the_wrong_type_is_a_400_naming_the_field() -> None:
    status, body = await _post([b'{"name": 5}'], [])
    assert status == 400 and b"name" in body, body
