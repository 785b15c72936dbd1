"""HTTP pieces every service shares: problem-details errors, authentication, the
probes and the scrape (``ops_routes``), and the app itself (``service_app``: one place
for the middleware and settings all three use).

Errors are translated in exactly one place per service: the exception handlers
returned by ``problem_handlers``. Every 4xx carries a human reason (``detail``) and,
for body validation, the field that was wrong.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import redis.exceptions

from litestar import Litestar, Request, Response
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import OpenAPIConfig
from litestar.response.base import ASGIResponse
from litestar.plugins.prometheus import PrometheusConfig, PrometheusController, PrometheusMiddleware
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR
from litestar.types import ASGIApp, Receive, Scope, Send

from .api_docs import assets_router, render_plugins
from .auth import KeyLookup, Principal
from .errors import BrokerError
from .json_limits import LimitedRequest
from .overload import shed_load
from .nats_conn import FAILOVER_ERRORS
from .problem_docs import document_problems
from .ratelimit import RateLimiter
from .ready import Check, Fact, health_route, ready_route
from .scrape import Refresh, metrics_controller
from .settings import Settings
from .tracing import RequestIdMiddleware, add_request_id_header

log = logging.getLogger(__name__)
PROBLEM = "application/problem+json"


def problem(status: int, title: str, detail: str, **extra: Any) -> Response:
    """Every 503 says when to retry (1 s unless the error knows better), as does a 429."""
    if status == 503:
        extra.setdefault("retry_after", 1)
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    if "retry_after" in extra:  # 429 over a rate limit, 503 a store not answering, 409 a key in progress
        headers = {"Retry-After": str(extra["retry_after"])}
    return Response(body, status_code=status, media_type=PROBLEM, headers=headers)


def _domain(_: Request, exc: BrokerError) -> Response:
    return problem(exc.status, exc.title, exc.detail, **exc.extra)


def _validation(_: Request, exc: ValidationException) -> Response:
    errors = exc.extra if isinstance(exc.extra, list) else []
    reasons = "; ".join(f"{e.get('key', '')}: {e.get('message', '')}".strip(": ") for e in errors
                        if isinstance(e, dict))
    return problem(400, "invalid request", reasons or str(exc.detail), errors=errors)


def _http(_: Request, exc: HTTPException) -> Response:
    return problem(exc.status_code, exc.detail if exc.status_code < 500 else "error", str(exc.detail))


def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem(HTTP_500_INTERNAL_SERVER_ERROR, "internal error", "unexpected error; it has been logged")


def _unavailable(store: str) -> Callable[[Request, Exception], Response]:
    def handler(request: Request, exc: Exception) -> Response:
        """NATS or Redis did not answer (a cluster failing over, a server restarting): a
        passing condition, so the client is told to retry rather than that the service
        is broken (a 500 says "bug")."""
        log.warning("%s unavailable on %s %s: %s", store, request.method, request.url.path,
                    type(exc).__name__)
        return problem(503, "unavailable", f"the {store} did not answer in time; retry shortly")

    return handler


# Redis not reachable, or a Redis Cluster slot without a master for the moment
REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.ClusterDownError,
              redis.exceptions.TryAgainError, redis.exceptions.SlotNotCoveredError)


def problem_handlers() -> dict:
    return {
        BrokerError: _domain,
        ValidationException: _validation,
        HTTPException: _http,
        **dict.fromkeys(FAILOVER_ERRORS, _unavailable("event store")),
        **dict.fromkeys(REDIS_DOWN, _unavailable("live state store")),
        Exception: _unexpected,
    }


def prometheus(service: str, hot_paths: list[str] | None = None) -> tuple[PrometheusConfig, type[PrometheusController]]:
    """Request metrics with litestar's Prometheus plugin; paths are grouped by route
    template so pool ids never become label values. ``hot_paths`` (regexes) are left
    to domain counters: the middleware costs a heartbeat ~15% of its throughput."""
    config = PrometheusConfig(app_name=service, prefix="cb", group_path=True,
                              exclude=["^/metrics", "^/health", *(hot_paths or [])])
    # litestar declares cb_requests_error_total at the first 5xx; declared now, it is
    # listed from the start (docs/metrics.md), with a series per path once one fails
    PrometheusMiddleware(app=None, config=config).requests_error_count(  # type: ignore[arg-type]
        {"method": "", "path": "", "status_code": 0, "app_name": service})
    return config, PrometheusController


PUBLIC = {"exclude_from_auth": True}  # route opt: served without a key (reference data, docs, probes)
AuthedRequest = Request[Principal, None, Any]


_AUTHORIZATION = b"authorization"
_OPEN_PATHS = ("/schema", "/health", "/metrics")


class JsonAnswer(ASGIResponse):
    """JSON already encoded, sent as it is: litestar's ``Response`` builds a header
    multidict and then an ``ASGIResponse`` for each answer (~7 us of a placement's CPU).
    For a hot endpoint whose handler encodes its own answer; its schema is documented
    with ``responses=`` on the route."""

    __slots__ = ()

    def __init__(self, body: bytes, status_code: int = 200) -> None:  # noqa: D107 - no ASGIResponse.__init__: it builds the multidict
        self.body, self.status_code = body, status_code

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(self.body))]})
        await send({"type": "http.response.body", "body": self.body, "more_body": False})


def raw_header(scope: Scope, name: bytes) -> str | None:
    """One request header (``name`` lower-case), read from the ASGI scope: on a hot
    path, ``request.headers`` builds a multidict of every header to answer one."""
    value = next((v for k, v in scope["headers"] if k.lower() == name), None)
    return value.decode("latin-1") if value is not None else None


class ApiKeyAuth(ASGIMiddleware):
    """Bearer API keys; ``request.user`` is the ``Principal``. Routes opt out with
    ``opt=PUBLIC``; the schema, health and metrics paths are open.

    Written on ``ASGIMiddleware`` and reading the one header it needs straight from the
    scope: litestar's ``AbstractAuthenticationMiddleware`` builds a connection and parses
    every header first, ~28 us a request where this takes a few (docs/benchmarks.md,
    session 4). One middleware instead of a dependency keeps handlers free of injected
    dependencies (litestar's dependency resolution costs ~19 us a request)."""

    scopes = (ScopeType.HTTP, ScopeType.WEBSOCKET)
    exclude_opt_key = "exclude_from_auth"

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        # the open paths and OPTIONS (as AbstractAuthenticationMiddleware left them open),
        # checked here rather than with should_bypass_for_scope, which litestar < 2.19 ignores
        if scope.get("method") == "OPTIONS" or scope["path"].startswith(_OPEN_PATHS):
            await next_app(scope, receive, send)
            return
        state = scope["litestar_app"].state
        lookup: KeyLookup = state.key_lookup
        principal = await lookup.authenticate(raw_header(scope, _AUTHORIZATION))
        limiter: RateLimiter | None = getattr(state, "rate_limiter", None)
        # after authentication (a bad key costs nothing): rate limit, and is the key still there?
        if limiter is not None and not await limiter.hit(principal):
            principal = await lookup.confirm(principal)  # its live record is gone: revoked, or Redis lost it
        scope["user"] = principal
        scope["auth"] = None
        await next_app(scope, receive, send)


def api_key_auth() -> ApiKeyAuth:
    return ApiKeyAuth()


def ops_routes(service: str, refresh: Refresh, checks: Sequence[Check] = (), **facts: Fact) -> list[Any]:
    """``/health`` (with ``facts``), ``/ready`` (with ``checks``) and ``/metrics`` (its
    gauges refreshed by ``refresh`` at each scrape): what an orchestrator and Prometheus
    ask every service, without a key, and never shed."""
    return [health_route(service, **facts), ready_route(service, checks), metrics_controller(refresh)]


def service_app(service: str, description: str, *, settings: Settings, metrics: PrometheusConfig,
                route_handlers: list[Any], lifespan: Callable[..., Any], **extra: Any) -> Litestar:
    """A service's litestar app with what every service shares, said once: load
    shedding past ``settings.max_in_flight`` requests, request ids (middleware and response
    header), request metrics, API-key auth, problem details (handled and documented in
    the schema), the body size and nesting limits, the OpenAPI title and documentation
    pages (their files served here: ``api_docs.py``), and no logging
    config of litestar's own (the process logs JSON lines: ``logs.py``)."""
    return shed_load(document_problems(Litestar(
        route_handlers=[*route_handlers, assets_router()],
        middleware=[RequestIdMiddleware(), metrics.middleware, api_key_auth()],
        before_send=[add_request_id_header],
        lifespan=[lifespan],
        exception_handlers=problem_handlers(),
        request_max_body_size=settings.max_body_bytes,
        request_class=LimitedRequest,  # JSON bodies nested too deep are refused before decoding
        openapi_config=OpenAPIConfig(title=f"Compute Broker — {service}", version="0.1.0", description=description,
                                     render_plugins=render_plugins()),  # pages that work offline
        debug=False,
        logging_config=None,
        **extra,
    )), settings.max_in_flight)
