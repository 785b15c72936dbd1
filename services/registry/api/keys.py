"""API key administration (admin only)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import msgspec
from litestar import Controller, delete, get, post
from litestar.params import Parameter

from services.common.auth import KeyLookup, Role
from services.common.http import AuthedRequest
from services.common.errors import NotFound, Unprocessable
from services.common.ids import is_valid_id


class KeyRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    role: Role
    subject: str = ""  # provider id for role provider, tenant id for role tenant
    name: Annotated[str, msgspec.Meta(max_length=200)] = ""


class IssuedKey(msgspec.Struct, frozen=True, kw_only=True):
    key_id: str
    key: str  # shown once; only its hash is kept
    role: Role
    subject: str
    name: str


class KeyController(Controller):
    path = "/v1/keys"
    tags = ["auth"]

    @get("/self", summary="Who this key is: its role and subject (a provider's agent or CLI finds its provider id)")
    async def whoami(self, request: AuthedRequest) -> dict[str, str]:
        return {"role": request.user.role, "subject": request.user.subject, "key_id": request.user.key_id}

    @post("/", summary="Issue an API key (admin)")
    async def issue(self, request: AuthedRequest, data: KeyRequest) -> IssuedKey:
        request.user.require("admin")
        if data.role in ("provider", "tenant"):
            if not is_valid_id(data.subject):
                raise Unprocessable(f"role {data.role} needs a valid subject id (the {data.role} id)")
        elif data.subject:
            raise Unprocessable(f"role {data.role} is not scoped: leave subject empty")
        lookup: KeyLookup = request.app.state.key_lookup
        record, key = await lookup.issue(data.role, data.subject, data.name, datetime.now(UTC))
        return IssuedKey(key_id=record.key_id, key=key, role=record.role, subject=record.subject, name=record.name)

    @delete("/{key_id:str}", summary="Revoke an API key (admin)", status_code=200)
    async def revoke(self, request: AuthedRequest, key_id: str) -> dict[str, object]:
        request.user.require("admin")
        lookup: KeyLookup = request.app.state.key_lookup
        if len(key_id) > 64 or not await lookup.revoke(key_id):
            raise NotFound(f"no key {key_id}")
        return {"key_id": key_id, "revoked": True}

    @post("/{key_id:str}/rotate", summary="Replace a key: a new key for the same role and subject, the old one "
          "revoked at once (admin: any key; any other key: itself)", status_code=201)
    async def rotate(self, request: AuthedRequest, key_id: Annotated[str, Parameter(max_length=64)]) -> IssuedKey:
        lookup: KeyLookup = request.app.state.key_lookup
        old = await lookup.record(key_id)
        if old is None or not (request.user.role == "admin" or request.user.key_id == key_id):
            raise NotFound(f"no key {key_id}")  # another holder's key id leaks nothing
        record, key = await lookup.rotate(old, datetime.now(UTC))
        return IssuedKey(key_id=record.key_id, key=key, role=record.role, subject=record.subject, name=record.name)
