"""Settings, parsed from the environment with ``msgspec.convert`` at start-up.

Never read at import time: every ``create_app`` takes a ``Settings`` (or builds one
from the environment when given none). Environment names are ``CB_<FIELD>`` in upper
case, except the two server URLs, which keep their conventional names.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import msgspec

ENV_ALIASES = {"nats_url": "NATS_URL", "redis_url": "REDIS_URL"}


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    nats_url: str = "nats://127.0.0.1:4222"
    redis_url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "cb"  # subjects, streams, buckets and Redis keys all carry it
    admin_key: str | None = None  # bootstrap admin API key
    host: str = "127.0.0.1"
    registry_port: int = 8081
    broker_port: int = 8082
    meter_port: int = 8083
    heartbeat_ttl_s: float = 30.0
    sweep_interval_s: float = 1.0
    max_body_bytes: int = 1_048_576  # larger request bodies get a 413
    events_keepalive_s: float = 5.0  # registry: an idle event stream's keep-alive (and revoked-key check) interval
    rate_limit_requests: int = 20_000  # per API key per window, across all replicas; 0 = no limit
    rate_limit_window_s: float = 1.0
    redis_max_connections: int = 64
    redis_timeout_s: float = 2.0  # broker: a Redis command not answered by then fails (503) instead of hanging
    # --- overload (docs/overload.md) ---
    max_in_flight: int = 64  # HTTP requests one process works on at once; more get a fast 503; 0 = no limit
    header_timeout_s: float = 10.0  # a request's headers must arrive within this, else 408 and closed
    body_timeout_s: float = 30.0  # and its body within this after them
    max_queued_per_tenant: int = 1000  # broker: a tenant's queued requests; more get a 429; 0 = no limit
    topology_file: str | None = None
    log_level: str = "info"
    placement_timeout_s: float = 4.0  # broker: a placement not done by then answers 503 and grants nothing
    pending_s: float = 30.0  # broker: an unconfirmed reservation (its grant never made durable) ends this soon
    outbox_grace_s: float = 30.0  # broker: a lease event owed this long is republished by the sweep (docs/lifecycle.md)
    budget_grace_s: float = 300.0  # broker: revoke pay-as-you-go leases this long after a budget runs out
    reliability_refresh_s: float = 2.0  # broker: how often the engine's pool scores are re-read (docs/reliability.md)
    workers: int = 1  # HTTP worker processes per service (uvicorn); replicas share state via NATS/Redis
    # --- clustered engines (docs/decisions.md, "Cluster mode") ---
    stream_replicas: int = 1  # replicas of every stream and KV bucket (3 on a NATS cluster)
    redis_cluster: bool = False  # redis_url is a seed node of a Redis Cluster (redis-py's cluster client)
    # --- meter ---
    min_bill_s: int = 60  # minimum billed increment of a per-second lease
    invoice_grace_s: float = 3 * 86400.0  # a period's invoices are final this long after it ends
    meter_state: str = ""  # prefix of the meter's own state (ledger, accounts, ...); "" = the deployment prefix
    meter_durable: str = ""  # durable consumer name on the alloc stream; "" = "meter" (or "meter_<state>")
    meter_batch: int = 1000  # events fetched per pull
    failover_ack_wait_s: float = 30.0  # broker: a failed/lost lease whose replacer died is tried again after this
    meter_ack_wait_s: float = 30.0  # unacked events are redelivered after this (e.g. the meter died)
    meter_max_attempts: int = 5  # failed processing attempts before an event is dead-lettered
    finalize_interval_s: float = 5.0  # how often a replica checks whether a period is due to be final
    budget_interval_s: float = 5.0  # how often budgets are evaluated (and on every posted entry)
    ledger_dup_window_s: float = 7 * 86400.0  # Nats-Msg-Id de-duplication window of the ledger


def env_name(field: str) -> str:
    return ENV_ALIASES.get(field, f"CB_{field.upper()}")


def settings_from_env(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build settings from ``environ`` (default ``os.environ``) plus explicit overrides."""
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    for field in Settings.__struct_fields__:
        name = env_name(field)
        if name in environ and environ[name] != "":
            raw[field] = environ[name]
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return msgspec.convert(raw, Settings, strict=False)


def settings_to_env(settings: Settings) -> dict[str, str]:
    """The environment that reproduces ``settings`` in a child process."""
    out = {}
    for field in Settings.__struct_fields__:
        value = getattr(settings, field)
        if value is not None:
            out[env_name(field)] = str(value)
    return out
