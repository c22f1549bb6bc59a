"""The outermost ASGI middleware: counts every response by endpoint and status
(``kvasir:http_requests``), works out the tenant (``--enable-tenant-metrics``) and, with
tracing on, opens the request's server span (joined to the caller's ``traceparent``).

Handlers read both from ``request.state`` (``observation(raw_request)``) and pass them
to ``AsyncLLM.generate``; the tokenize span is opened with ``tokenize_span``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvasir.metrics.http import ANONYMOUS_TENANT, HttpMetrics, tenant_of_key
from kvasir.observability.tracing import Tracing

# Traced paths -> GenAI operation name.
TRACED_PATHS = {"/v1/chat/completions": "chat", "/v1/completions": "text_completion"}
OBSERVATION_KEY = _STATE_KEY = "kvasir_observation"


@dataclass
class Observation:
    """What one request carries into the engine: its server span and tenant label."""

    span: Any = None
    tenant: str | None = None


def observation(raw_request: Any) -> Observation:
    return raw_request.scope.get("state", {}).get(_STATE_KEY) or Observation()


@contextmanager
def tokenize_span(tracing: Tracing | None, obs: Observation) -> Iterator[None]:
    if tracing is None or obs.span is None:
        with nullcontext():
            yield
        return
    with tracing.child_span(obs.span, "tokenize"):
        yield


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())}


class ObservabilityMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        http_metrics: HttpMetrics,
        tracing: Tracing | None,
        model_name: str,
        tenant_header: str = "x-tenant-id",
    ) -> None:
        self.app = app
        self.http = http_metrics
        self.tracing = tracing
        self.model_name = model_name
        self.tenant_header = tenant_header.lower()

    def _tenant(self, headers: dict[str, str]) -> str:
        t = headers.get(self.tenant_header)
        if not t:
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            key = token.strip() if scheme.lower() == "bearer" else headers.get("x-api-key")
            t = tenant_of_key(key) if key else ANONYMOUS_TENANT
        return self.http.tenant_label(t)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        op = TRACED_PATHS.get(path)
        obs = None
        if op is not None and (self.tracing is not None or self.http.tenants_enabled):
            headers = _headers(scope)
            obs = Observation()
            if self.http.tenants_enabled:
                obs.tenant = self._tenant(headers)
            if self.tracing is not None:
                obs.span = self.tracing.start_request_span(
                    f"{op} {self.model_name}",
                    headers,
                    {
                        "gen_ai.operation.name": op,
                        "http.request.method": scope["method"],
                        "url.path": path,
                    },
                )
            scope.setdefault("state", {})[_STATE_KEY] = obs
        status = 500  # if the app raises before answering

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            tenant = obs.tenant if obs is not None and op is not None else None
            self.http.record_response(path, status, tenant)
            if obs is not None and obs.span is not None and self.tracing is not None:
                self.tracing.end_request_span(obs.span, status)
