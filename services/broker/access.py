"""The broker's private bucket (a JetStream key-value bucket that ops may not read):

* access details: how a tenant reaches what its provider delivered (host, port, user,
  urls, env...), one entry per lease (its id). Something a client was told, so stored
  durably before the provider's ``ready`` is answered; never put in an event, a log line
  or an error message; deleted when the lease ends;
* workloads: what a delivering request asks to run, one entry per request
  (``workload.<request id>``), written before it is placed, so that its provider still
  learns what to deliver after a Redis loss took the request record.

Redis holds none of it, so a Redis loss loses none of it. The bucket's TTL (longer than
the longest lease) removes what a crash left behind (docs/decisions.md, "Lease
delivery")."""

from __future__ import annotations

import contextlib
import logging

import msgspec
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from services.common.delivery import MAX_ACCESS_BYTES, Access, Workload
from services.common.errors import BadRequest

from .domain.printable import check_printable

log = logging.getLogger("broker")
TTL_S = 400 * 86_400  # longer than a reserved year (the longest lease)
_access = msgspec.json.Decoder(Access)
_workload = msgspec.json.Decoder(Workload)


def encoded(access: Access) -> bytes:
    """The blob as stored; 400 when it is larger than ``MAX_ACCESS_BYTES``."""
    check_printable(access, "access")
    raw = msgspec.json.encode(access)
    if len(raw) > MAX_ACCESS_BYTES:
        raise BadRequest(f"access details are {len(raw)} bytes JSON-encoded; at most {MAX_ACCESS_BYTES} "
                         "are accepted", max_bytes=MAX_ACCESS_BYTES)
    return raw


class AccessStore:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    @classmethod
    async def open(cls, nc: NATS, name: str, replicas: int = 1, timeout: float = 2.0) -> AccessStore:
        js = nc.jetstream(timeout=timeout)
        try:
            return cls(await js.key_value(name))
        except nats.js.errors.BucketNotFoundError:
            pass
        with contextlib.suppress(nats.js.errors.APIError):  # another replica created it meanwhile
            return cls(await js.create_key_value(KeyValueConfig(bucket=name, storage=StorageType.FILE, history=1,
                                                                ttl=TTL_S, replicas=replicas)))
        return cls(await js.key_value(name))

    async def put(self, lease_id: str, raw: bytes) -> None:
        """Stored once JetStream acknowledged it (raises otherwise)."""
        await self.kv.put(lease_id, raw)

    async def get(self, lease_id: str) -> Access | None:
        try:
            entry = await self.kv.get(lease_id)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        return _access.decode(entry.value) if entry.value else None

    async def put_workload(self, request_id: str, workload: Workload) -> None:
        await self.kv.put(f"workload.{request_id}", msgspec.json.encode(workload))

    async def workload(self, request_id: str) -> Workload | None:
        try:
            entry = await self.kv.get(f"workload.{request_id}")
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        return _workload.decode(entry.value) if entry.value else None

    async def delete(self, lease_id: str) -> None:
        """Best effort: what is left behind expires with the bucket's TTL."""
        try:
            await self.kv.delete(lease_id)  # a delete marker replaces the value (history 1)
        except Exception as exc:  # noqa: BLE001 - logged; the TTL removes it later
            log.warning("access details of lease %s not deleted (%s); they expire with the bucket's TTL",
                        lease_id, type(exc).__name__)
