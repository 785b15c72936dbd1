"""docs/events.md lists every event type and subject of the wire contract, so that
`nats sub 'cb.events.>'` is usable from the page alone."""

from __future__ import annotations

import typing
from pathlib import Path

import msgspec

from services.common import messages
from services.common.subjects import EVENT_KINDS, Subjects

DOC = (Path(__file__).parents[2] / "docs" / "events.md").read_text()


def test_every_event_type_and_field_is_documented() -> None:
    for union in (messages.CapacityEvent, messages.AllocEvent, messages.RequestEvent, messages.BillingEvent):
        for struct in typing.get_args(union):
            tag = struct.__struct_config__.tag
            row = next((line for line in DOC.splitlines() if line.startswith(f"| `{tag}` |")), None)
            assert row is not None, f"{tag} missing from docs/events.md"
            base = {f.name for f in msgspec.inspect.type_info(struct.__mro__[1]).fields}
            for field in msgspec.inspect.type_info(struct).fields:
                if field.name not in base:  # the type's own fields are listed in its row
                    assert f"`{field.name}`" in row, f"{tag}.{field.name} missing from its row"


def test_every_subject_and_stream_is_documented() -> None:
    s = Subjects("cb")
    for subject in (s.capacity("<region>", "<provider>"), s.alloc("<region>", "<tenant>"), s.request("<tenant>"),
                    s.billing("<tenant>"), s.rpc("registry", "catalogue"),
                    s.key_revoked()):
        assert f"`{subject}`" in DOC, subject
    for kind in EVENT_KINDS:
        assert f"`{s.stream(kind)}`" in DOC
