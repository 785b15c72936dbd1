"""The services' Redis connections pack commands with hiredis: the same bytes as
redis-py's own packer, and the same refusal of values Redis cannot take."""

from __future__ import annotations

from decimal import Decimal

import pytest
from redis.asyncio.connection import Connection
from redis.exceptions import DataError

from services.common.redis_conn import HiredisPackingConnection, connect

COMMANDS = [
    ("SET", "k", "v"),
    ("EVALSHA", "abc", 2, "{cn-gz}:k1", "{cn-gz}:k2", 1.5, 0.1, 1e20, 3, -7, b"raw\x00bytes", "ünïcode"),
    ("ZADD", "z", 1700000000.123456, "m", float("inf"), "n"),
    ("CONFIG GET", "maxmemory"),
    ("SET", "big", "x" * 100_000),
    ("SET", "view", memoryview(b"abc")),
    ("SET", "array", bytearray(b"abc")),
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_same_bytes_as_redis_py(command: tuple) -> None:
    assert b"".join(HiredisPackingConnection().pack_command(*command)) == \
        b"".join(Connection().pack_command(*command))


@pytest.mark.parametrize("value", [True, None, Decimal("1.5"), {"a": 1}])
def test_values_redis_cannot_take_are_refused_the_same_way(value: object) -> None:
    with pytest.raises(DataError):
        Connection().pack_command("SET", "k", value)
    with pytest.raises(DataError):
        HiredisPackingConnection().pack_command("SET", "k", value)


def test_plain_urls_get_it_and_tls_or_unix_keep_their_own_connection_class() -> None:
    assert connect("redis://127.0.0.1:1/0").connection_pool.connection_class is HiredisPackingConnection
    assert connect("rediss://127.0.0.1:1/0").connection_pool.connection_class is not HiredisPackingConnection
    assert connect("unix:///tmp/redis.sock").connection_pool.connection_class is not HiredisPackingConnection
