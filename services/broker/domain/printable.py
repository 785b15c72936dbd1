"""Control characters in what a tenant or a provider sends (workloads, access details,
reasons), refused at the door with the field that has one.

The contract's patterns (``services.common.delivery``) end in ``$``, which Python's
``re`` (msgspec's) also matches before a final newline: ``"value\\n"`` and an environment
variable named ``"NAME\\n"`` passed them. This walk over the decoded value checks every
string, keys included, whatever the pattern says."""

from __future__ import annotations

import re

import msgspec

from services.common.errors import BadRequest

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _where(value: object, path: str, allow_newlines: bool) -> str | None:
    if isinstance(value, str):
        text = value.replace("\n", "").replace("\t", "") if allow_newlines else value
        return path if _CONTROL.search(text) else None
    if isinstance(value, dict):
        for k, v in value.items():
            if (bad := _where(k, f"{path} key", False) or _where(v, f"{path}.{k}", allow_newlines)) is not None:
                return bad
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if (bad := _where(v, f"{path}[{i}]", allow_newlines)) is not None:
                return bad
    return None


def check_printable(value: msgspec.Struct, field: str, *, multiline: frozenset[str] = frozenset()) -> None:
    """400 naming the first string of ``value`` (keys included) with a control character;
    the fields named in ``multiline`` may hold newlines and tabs (a Slurm script). The
    offending value is never echoed (it may be a secret)."""
    for name, item in msgspec.to_builtins(value).items():  # type: ignore[union-attr]
        bad = _where(item, f"{field}.{name}", name in multiline)
        if bad is not None:
            raise BadRequest(f"{bad} holds a control character; only printable text is accepted")
