"""API keys and principals, shared by every service's HTTP layer.

A key looks like ``cbk_<key_id>_<secret>``. Only a SHA-256 of the whole key is stored
(keys are 192-bit random, so a fast hash is the right tool: there is nothing to
brute-force). The durable record is a JetStream key-value bucket keyed by key id;
Redis holds the live lookup and is refilled from the bucket on a miss, so losing
Redis never locks anybody out, and a revocation (delete in both) is seen at once by
every replica.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from datetime import datetime
from typing import Literal

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from redis.asyncio import Redis

from .errors import Forbidden, Unauthorized
from .keys import Keys

Role = Literal["admin", "ops", "provider", "tenant"]
SCOPED_ROLES = ("provider", "tenant")


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    role: Role
    subject: str = ""  # provider id or tenant id for scoped roles
    key_id: str = ""

    def require(self, *roles: Role) -> None:
        if self.role not in roles:
            raise Forbidden(f"role {self.role} may not do this (needs {' or '.join(roles)})")

    def may_act_for(self, role: Role, subject: str) -> bool:
        """Admin acts for anyone; a scoped key only for its own subject."""
        return self.role == "admin" or (self.role == role and self.subject == subject)


class KeyRecord(msgspec.Struct, frozen=True, kw_only=True):
    key_id: str
    key_hash: str
    role: Role
    subject: str = ""
    name: str = ""
    created_at: datetime


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """Returns ``(key_id, key)``."""
    key_id = secrets.token_hex(8)
    return key_id, f"cbk_{key_id}_{secrets.token_hex(24)}"


def key_id_of(key: str) -> str | None:
    parts = key.split("_")
    if len(parts) != 3 or parts[0] != "cbk" or len(parts[1]) != 16:
        return None
    return parts[1]


_record_decoder = msgspec.json.Decoder(KeyRecord)
_KEY_ID = re.compile(r"[0-9a-f]{16}")


class KeyLookup:
    """Authenticates bearer keys. Each replica caches what it looked up for a few
    seconds (a heartbeat must not cost a Redis round trip for its key); a revocation
    is broadcast on ``Subjects.key_revoked`` and drops the entry in every replica at
    once, and the short TTL bounds the damage of a missed broadcast."""

    def __init__(self, redis: Redis, kv: KeyValue, keys: Keys, admin_key: str | None, *,
                 nc: NATS | None = None, revoked_subject: str = "", cache_ttl_s: float = 5.0) -> None:
        self.redis, self.kv, self.keys = redis, kv, keys
        self.nc, self.revoked_subject = nc, revoked_subject
        self._admin_hash = hash_key(admin_key) if admin_key else None
        self._cache: dict[str, tuple[float, Principal]] = {}
        self._ttl = cache_ttl_s

    @classmethod
    async def open(cls, nc: NATS, redis: Redis, keys: Keys, bucket: str, admin_key: str | None,
                   revoked_subject: str) -> KeyLookup:
        """The lookup every service uses: durable bucket, Redis cache, revocations heard."""
        from .nats_conn import ensure_bucket

        lookup = cls(redis, await ensure_bucket(nc.jetstream(), bucket), keys, admin_key, nc=nc,
                     revoked_subject=revoked_subject)
        await lookup.listen()
        return lookup

    async def listen(self) -> None:
        """Drop revoked keys from this replica's cache as soon as any replica says so."""
        if self.nc is not None:
            async def on_revoked(msg: Msg) -> None:
                self.forget(msg.data.decode())

            await self.nc.subscribe(self.revoked_subject, cb=on_revoked)

    def forget(self, key_id: str) -> None:
        for token_hash, (_, principal) in list(self._cache.items()):
            if principal.key_id == key_id:
                self._cache.pop(token_hash, None)

    async def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise Unauthorized("missing Authorization: Bearer <api key>")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("Authorization must be 'Bearer <api key>'")
        presented = hash_key(token)
        if self._admin_hash and hmac.compare_digest(presented, self._admin_hash):
            return Principal(role="admin", subject="bootstrap")
        cached = self._cache.get(presented)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        key_id = key_id_of(token)
        record = await self._record(key_id) if key_id else None
        if record is None or not hmac.compare_digest(presented, record.key_hash):
            self._cache.pop(presented, None)
            raise Unauthorized("unknown or revoked API key")
        principal = Principal(role=record.role, subject=record.subject, key_id=record.key_id)
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[presented] = (now + self._ttl, principal)
        return principal

    async def confirm(self, principal: Principal) -> Principal:
        """A cached key whose live record has gone from Redis: revoked (a 401, at once, in
        every replica) or Redis lost it (refilled from the bucket; the key still works)."""
        self.forget(principal.key_id)
        if await self._record(principal.key_id) is None:
            raise Unauthorized("unknown or revoked API key")
        return principal

    async def _record(self, key_id: str) -> KeyRecord | None:
        raw = await self.redis.get(self.keys.api_key(key_id))
        if raw is None:
            raw = await self._durable(key_id)
            if raw is None:
                return None
            await self.redis.set(self.keys.api_key(key_id), raw)
            # a revocation may have run between the read and the refill (its Redis delete
            # before our set): look again, or the refill would bring a revoked key back
            if await self._durable(key_id) is None:
                await self.redis.delete(self.keys.api_key(key_id))
                return None
        return _record_decoder.decode(raw)

    async def _durable(self, key_id: str) -> bytes | None:
        try:
            entry = await self.kv.get(key_id)
        except KeyNotFoundError:
            return None
        return entry.value or None

    async def issue(self, role: Role, subject: str, name: str, now: datetime) -> tuple[KeyRecord, str]:
        key_id, key = new_key()
        record = KeyRecord(key_id=key_id, key_hash=hash_key(key), role=role, subject=subject, name=name,
                           created_at=now)
        raw = msgspec.json.encode(record)
        await self.kv.put(key_id, raw)  # durable first
        await self.redis.set(self.keys.api_key(key_id), raw)
        return record, key

    async def record(self, key_id: str) -> KeyRecord | None:
        """The live record of a key id (``None`` if unknown, revoked or malformed)."""
        return await self._record(key_id) if _KEY_ID.fullmatch(key_id) else None

    async def rotate(self, old: KeyRecord, now: datetime) -> tuple[KeyRecord, str]:
        """A new key for the same role, subject and name; the old one is revoked (in
        every replica at once) only after the new one is stored, so the holder is never
        without a working key."""
        record, key = await self.issue(old.role, old.subject, old.name, now)
        await self.revoke(old.key_id)
        return record, key

    async def revoke(self, key_id: str) -> bool:
        if not _KEY_ID.fullmatch(key_id):
            return False
        try:
            await self.kv.get(key_id)
        except KeyNotFoundError:
            return False
        await self.kv.delete(key_id)
        await self.redis.delete(self.keys.api_key(key_id))
        self.forget(key_id)
        if self.nc is not None:
            await self.nc.publish(self.revoked_subject, key_id.encode())
            await self.nc.flush()
        return True
