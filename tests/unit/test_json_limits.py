"""The nesting check on raw bytes agrees with the depth of the decoded value, whatever
the strings hold (brackets, quotes, backslashes) and however the JSON is spaced."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from services.common.json_limits import too_deep

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
