"""The agent's own record of each lease it took on: which pool, which devices, and the
access details it answered (or is about to answer). Written before the backend starts
anything, so that an agent that dies at any point finds on restart every lease whose
work may be running, and kills nothing else; removed once the lease's work is over."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from services.common.delivery import Access
from services.common.ids import is_valid_id


class LeaseRecord(msgspec.Struct, kw_only=True):
    lease_id: str
    pool_id: str
    devices: tuple[int, ...] = ()
    milli: int = 1000  # of each device: a share when below 1000 (docs/sharing.md)
    access: Access | None = None  # what the backend returned (the ready answer), once started


class Records:
    def __init__(self, state_dir: str | os.PathLike) -> None:
        self.dir = Path(state_dir) / "leases"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _path(self, lease_id: str) -> Path:
        if not is_valid_id(lease_id):
            raise ValueError(f"not a lease id: {lease_id!r}")
        return self.dir / f"{lease_id}.json"

    def save(self, record: LeaseRecord) -> None:
        path = self._path(record.lease_id)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(msgspec.json.encode(record))
        os.replace(tmp, path)

    def delete(self, lease_id: str) -> None:
        self._path(lease_id).unlink(missing_ok=True)

    def all(self) -> list[LeaseRecord]:
        out = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                out.append(msgspec.json.decode(path.read_bytes(), type=LeaseRecord))
            except (OSError, msgspec.DecodeError, msgspec.ValidationError):
                continue  # a torn write of a lease never started: nothing of it runs
        return out
