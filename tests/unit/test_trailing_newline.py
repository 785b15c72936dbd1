"""Python's ``$`` also matches before a final newline, so a pattern ending in ``$`` let
``"pool-1\\n"`` through as an id (and into NATS subjects and Redis keys) and ``"USD\\n"``
as a currency. Every end-anchored pattern of the wire contract refuses it."""

from __future__ import annotations

import msgspec
import pytest

from services.common.delivery import Access, EnvName, ProcessWorkload
from services.common.ids import is_valid_id
from services.common.messages import Id, Region
from services.common.money import Currency


@pytest.mark.parametrize(("type_", "good"), [(Id, "pool-1"), (Currency, "USD"), (EnvName, "HOME")])
def test_a_trailing_newline_is_refused(type_: object, good: str) -> None:
    assert msgspec.convert(good, type_) == good
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(good + "\n", type_)


def test_ids_and_text_fields_refuse_a_trailing_newline() -> None:
    assert is_valid_id("pool-1") and not is_valid_id("pool-1\n")
    region = {"id": "cn-gz", "name": "Guangzhou", "country": "CN", "lat": 23.1, "lon": 113.3}
    assert msgspec.convert(region, Region).country == "CN"
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({**region, "country": "CN\n"}, Region)
    assert msgspec.convert({"command": ["python"], "env": {"A": "ok"}}, ProcessWorkload).env == {"A": "ok"}
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"command": ["python"], "env": {"A": "secret\n"}}, ProcessWorkload)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"host": "gpu-1.example\n"}, Access)
