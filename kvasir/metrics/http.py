"""HTTP-level counters: every API response by endpoint and status (availability SLI),
and, behind ``--enable-tenant-metrics``, requests and tokens per tenant.

A tenant is the value of ``--tenant-header`` when the caller (or a gateway in front)
sends it, else the API key the request carried - never the key itself: a short SHA-256
digest (``key-1a2b3c4d``). Label cardinality is bounded: the first
``--max-tenant-labels`` distinct tenants get their own label, every later one is
counted under ``"__other__"``.
"""

from __future__ import annotations

import hashlib

from prometheus_client import CollectorRegistry, Counter

OTHER_TENANT = "__other__"
ANONYMOUS_TENANT = "anonymous"
# Paths counted one by one; anything else (404s of scanners...) is "other".
ENDPOINTS = frozenset(
    {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/tokenize",
        "/detokenize",
        "/health",
        "/metrics",
        "/version",
    }
)


def tenant_of_key(api_key: str) -> str:
    return "key-" + hashlib.sha256(api_key.encode()).hexdigest()[:8]


class HttpMetrics:
    """``kvasir:http_requests`` always; ``kvasir:tenant_*`` when ``tenants`` is on."""

    def __init__(
        self,
        model_name: str,
        registry: CollectorRegistry,
        tenants: bool = False,
        max_tenant_labels: int = 100,
    ) -> None:
        if max_tenant_labels < 1:
            raise ValueError(f"max_tenant_labels must be >= 1, got {max_tenant_labels}")
        self.model_name = model_name
        self.requests = Counter(
            "kvasir:http_requests",
            "HTTP responses by endpoint and status code.",
            ["model_name", "endpoint", "status"],
            registry=registry,
        )
        self.tenants_enabled = tenants
        self.max_tenant_labels = max_tenant_labels
        self._tenants: set[str] = set()
        if tenants:
            self.tenant_requests = Counter(
                "kvasir:tenant_requests",
                "Inference requests per tenant and HTTP status code.",
                ["model_name", "tenant", "status"],
                registry=registry,
            )
            self.tenant_prompt_tokens = Counter(
                "kvasir:tenant_prompt_tokens",
                "Prompt tokens per tenant.",
                ["model_name", "tenant"],
                registry=registry,
            )
            self.tenant_generation_tokens = Counter(
                "kvasir:tenant_generation_tokens",
                "Generated tokens per tenant.",
                ["model_name", "tenant"],
                registry=registry,
            )

    def tenant_label(self, tenant: str) -> str:
        """The label for ``tenant``, within the cardinality bound."""
        if tenant in self._tenants:
            return tenant
        if len(self._tenants) < self.max_tenant_labels:
            self._tenants.add(tenant)
            return tenant
        return OTHER_TENANT

    def record_response(self, path: str, status: int, tenant: str | None) -> None:
        endpoint = path if path in ENDPOINTS else "other"
        self.requests.labels(self.model_name, endpoint, str(status)).inc()
        if tenant is not None and self.tenants_enabled:
            self.tenant_requests.labels(self.model_name, tenant, str(status)).inc()

    def record_tokens(self, tenant: str, num_prompt: int, num_generated: int) -> None:
        if num_prompt:
            self.tenant_prompt_tokens.labels(self.model_name, tenant).inc(num_prompt)
        if num_generated:
            self.tenant_generation_tokens.labels(self.model_name, tenant).inc(num_generated)
