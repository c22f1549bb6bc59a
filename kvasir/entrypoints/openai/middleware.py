"""One pure-ASGI middleware in front of the app: API-key check (401), or with
``--api-keys-file`` the key's tenant (left in the scope for the handlers; /admin/* only
for --api-key or an ``admin`` tenant: 403), drain/dead gate (503), request-body limit
(413), and a count of requests in flight (for the drain).

Pure ASGI rather than ``BaseHTTPMiddleware`` so streaming responses and the client's
``http.disconnect`` pass through untouched.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvasir.entrypoints.openai.errors import OpenAIError
from kvasir.entrypoints.openai.observability import OBSERVATION_KEY
from kvasir.entrypoints.openai.tenancy import TENANT_KEY

# Open without a key and while draining (health checks must see the 503 themselves).
OPEN_PATHS = frozenset({"/health", "/metrics", "/version", "/ping"})
# Admin paths (key-protected) that still answer while draining.
ADMIN_PATHS = frozenset({"/admin/drain", "/admin/undrain", "/admin/tenants/reload"})
# API documentation is not an inference path either.
DOC_PATHS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})


@dataclass
class ServerState:
    """Mutable per-server state shared by the middleware, the routes and the drain."""

    api_key: str | None = None
    # --api-keys-file: key -> tenant (kvasir.security.tenants.TenantRegistry).
    tenants: Any = None
    max_request_body_bytes: int = 8 * 2**20
    max_header_bytes: int = 64 * 1024  # the request head (all header names and values)
    draining: bool = False
    dead: bool = False
    num_active_requests: int = 0  # HTTP requests through the gate, not yet finished
    # Maps a tenant name onto its (bounded) metrics label; set with tenant metrics on.
    tenant_label: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


async def _send_error(send: Send, err: OpenAIError) -> None:
    resp = err.to_response()
    await send(
        {"type": "http.response.start", "status": resp.status_code, "headers": resp.raw_headers}
    )
    await send({"type": "http.response.body", "body": resp.body})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v
    return None


def _unauthorized() -> OpenAIError:
    return OpenAIError(
        401,
        "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
        "invalid_request_error",
        None,
        "invalid_api_key",
    )


class ServerMiddleware:
    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    def _authorized(self, scope: Scope) -> bool:
        key = self.state.api_key
        assert key is not None
        auth = _header(scope, b"authorization") or b""
        scheme, _, token = auth.decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip(), key):
            return True
        x_key = _header(scope, b"x-api-key")
        return x_key is not None and hmac.compare_digest(x_key.decode("latin-1"), key)

    @staticmethod
    def _presented_key(scope: Scope) -> str | None:
        auth = (_header(scope, b"authorization") or b"").decode("latin-1")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        x_key = _header(scope, b"x-api-key")
        return x_key.decode("latin-1") if x_key else None

    def _check_tenant(self, scope: Scope, path: str) -> OpenAIError | None:
        """With tenants: the --api-key (operator) passes as no tenant; a tenant's key
        leaves its ``Tenant`` in the scope; anything else is a 401."""
        st = self.state
        if st.api_key is not None and self._authorized(scope):
            return None
        tenant = st.tenants.lookup(self._presented_key(scope))
        if tenant is None:
            return _unauthorized()
        if path.startswith("/admin/") and not tenant.admin:
            return OpenAIError(
                403, "This key may not call /admin endpoints.", "permission_error", None,
                "admin_required",
            )  # fmt: skip
        state = scope.setdefault("state", {})
        state[TENANT_KEY] = tenant
        obs = state.get(OBSERVATION_KEY)
        if obs is not None and obs.tenant is not None and st.tenant_label is not None:
            obs.tenant = st.tenant_label(tenant.name)  # the tenant's name, not a key digest
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        st = self.state
        head = sum(len(k) + len(v) for k, v in scope.get("headers", ()))
        if head > st.max_header_bytes:
            await _send_error(
                send,
                OpenAIError(
                    431,
                    f"Request headers are larger than {st.max_header_bytes} bytes "
                    "(--max-header-bytes).",
                    "invalid_request_error",
                    None,
                    "headers_too_large",
                ),
            )
            return
        if path in OPEN_PATHS or path in DOC_PATHS:
            await self.app(scope, receive, send)
            return
        if st.tenants is not None:
            err = self._check_tenant(scope, path)
            if err is not None:
                await _send_error(send, err)
                return
        elif st.api_key is not None and not self._authorized(scope):
            await _send_error(send, _unauthorized())
            return
        if (st.dead or st.draining) and path not in ADMIN_PATHS:
            msg = "The engine is dead." if st.dead else "The server is shutting down."
            await _send_error(
                send,
                OpenAIError(
                    503,
                    msg,
                    "service_unavailable_error",
                    None,
                    "engine_dead" if st.dead else "server_draining",
                ),
            )
            return
        if scope["method"] in ("POST", "PUT", "PATCH"):
            got = await self._read_body(scope, receive, send)
            if got is None:
                return
            receive = got
        st.num_active_requests += 1
        try:
            await self.app(scope, receive, send)
        finally:
            st.num_active_requests -= 1

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """Buffer the body (at most the limit) and return a receive that replays it and
        then passes through (so disconnects still arrive). None: already answered."""
        limit = self.state.max_request_body_bytes
        too_large = OpenAIError(
            413,
            f"Request body is larger than the limit of {limit} bytes (--max-request-body-bytes).",
            "invalid_request_error",
            None,
            "request_too_large",
        )
        cl = _header(scope, b"content-length")
        if cl is not None and cl.isdigit() and int(cl) > limit:
            await _send_error(send, too_large)
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                await _send_error(send, too_large)
                return None
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replay: list[Message] = [
            {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        ]

        async def replay_receive() -> Message:
            if replay:
                return replay.pop()
            return await receive()

        return replay_receive


# Sent with every response: the API serves JSON and SSE to programs, never pages.
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
]
# The interactive docs load their scripts from a CDN: no CSP there.
_DOC_HEADERS = [h for h in SECURITY_HEADERS if h[0] != b"content-security-policy"]


class SecurityHeadersMiddleware:
    """Adds ``SECURITY_HEADERS`` (and HSTS when serving TLS) to every response."""

    def __init__(self, app: ASGIApp, tls: bool = False) -> None:
        self.app = app
        self.hsts = [(b"strict-transport-security", b"max-age=31536000")] if tls else []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = (_DOC_HEADERS if scope["path"] in DOC_PATHS else SECURITY_HEADERS) + self.hsts

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", [])}
                headers = list(message.get("headers", []))
                headers += [(k, v) for k, v in extra if k not in have]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
