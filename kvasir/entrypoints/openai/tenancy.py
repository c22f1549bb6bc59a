"""The server side of ``--api-keys-file``: who a request belongs to, whether its
tenant's limits let it in (429 + Retry-After, or 400/403 naming the parameter), the
tenant's cache salt, and per-tenant usage and query-pattern metrics.

``ServerMiddleware`` resolves the key to a ``Tenant`` and leaves it in the ASGI scope
(``request_tenant``); ``ServingContext.generate`` calls ``Tenancy.admit`` before the
request reaches the engine and ``Ticket.finish`` when its generator closes.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from kvasir.entrypoints.openai.errors import OpenAIError
from kvasir.metrics.http import OTHER_TENANT
from kvasir.sampling_params import SamplingParams
from kvasir.security.tenants import Tenant, TenantLimitError, TenantRegistry, Ticket

logger = logging.getLogger(__name__)
TENANT_KEY = "kvasir_tenant"
# Distinct prompts remembered per tenant per minute window (bounds the monitor's memory).
_MAX_PROMPTS_PER_WINDOW = 10_000


class TenantLimitHTTPError(OpenAIError, ValueError):
    """A tenant limit as an OpenAI error. A ``ValueError`` too, so the handlers'
    existing ``except ValueError`` paths close the request's other generators."""


def request_tenant(raw_request: Any) -> Tenant | None:
    return raw_request.scope.get("state", {}).get(TENANT_KEY)


def to_http_error(e: TenantLimitError) -> TenantLimitHTTPError:
    if e.retry_after_s is not None:
        return TenantLimitHTTPError(
            429,
            str(e),
            "rate_limit_error",
            None,
            f"{e.limit}_exceeded",
            {"Retry-After": str(e.retry_after_s)},
        )
    status = 403 if e.limit == "allowed_models" else 400
    return TenantLimitHTTPError(
        status, str(e), "invalid_request_error", e.param, f"{e.limit}_exceeded"
    )


def combine_salts(tenant_salt: str | None, request_salt: str | None) -> str | None:
    if tenant_salt is None:
        return request_salt
    if request_salt is None:
        return tenant_salt
    # Length-prefixed: no (tenant, salt) pair collides with another's concatenation.
    return f"{len(tenant_salt)}:{tenant_salt}|{request_salt}"


class _PromptWindow:
    """Distinct prompt digests of one tenant in the current minute."""

    def __init__(self) -> None:
        self.start = 0.0
        self.seen: OrderedDict[bytes, None] = OrderedDict()


class Tenancy:
    """The registry plus its metrics. Labels are tenant names from the operator's file
    (bounded by it, and by ``max_labels``); keys never appear anywhere."""

    def __init__(
        self,
        registry: TenantRegistry,
        metrics_registry: CollectorRegistry,
        model_name: str,
        max_labels: int = 100,
        clock: Any = time.monotonic,
    ) -> None:
        self.registry = registry
        self.model_name = model_name
        self.max_labels = max_labels
        self.clock = clock
        self._labels: set[str] = set()
        self._windows: dict[str, _PromptWindow] = {}
        lab = ["model_name", "tenant"]
        r = metrics_registry
        self.limited = Counter(
            "kvasir:tenant_rate_limited",
            "Requests refused by a tenant limit, by the limit's name.",
            [*lab, "limit"],
            registry=r,
        )
        self.admitted = Counter(
            "kvasir:tenant_admitted_requests", "Requests admitted per tenant.", lab, registry=r
        )
        self.charged = Counter(
            "kvasir:tenant_charged_tokens",
            "Tokens charged to the tenant's tokens_per_minute bucket (prompt + budget), "
            "before refunds.",
            lab,
            registry=r,
        )
        self.refunded = Counter(
            "kvasir:tenant_refunded_tokens",
            "Unused generation budget given back to the tenant's bucket.",
            lab,
            registry=r,
        )
        self.running = Gauge(
            "kvasir:tenant_running_requests", "Admitted, unfinished requests.", lab, registry=r
        )
        self.logprob_requests = Counter(
            "kvasir:tenant_logprob_requests",
            "Requests asking for logprobs / top_logprobs / prompt_logprobs (extraction monitor).",
            lab,
            registry=r,
        )
        self.distinct_prompts = Gauge(
            "kvasir:tenant_distinct_prompts_per_minute",
            "Distinct prompts the tenant sent in the current minute (extraction monitor).",
            lab,
            registry=r,
        )

    def label(self, name: str) -> str:
        if name in self._labels:
            return name
        if len(self._labels) < self.max_labels:
            self._labels.add(name)
            return name
        return OTHER_TENANT

    def reload(self) -> list[str]:
        """Re-read the keys file; returns the tenant names (a bad file raises and the
        old tenants keep serving)."""
        tenants = self.registry.reload()
        logger.info("reloaded the API keys file: %d tenant(s)", len(tenants))
        return [t.name for t in tenants]

    def check_params(
        self, tenant: Tenant, params: SamplingParams, model: str | None, max_model_len: int,
        num_prompt_tokens: int,
    ) -> SamplingParams:  # fmt: skip
        """The limits that need no bucket: models, n, max_tokens, logprobs. Returns the
        params with ``max_tokens`` filled in from the tenant's cap when unset."""
        lim = tenant.limits
        label = self.label(tenant.name)

        def refuse(limit: str, msg: str, param: str) -> TenantLimitHTTPError:
            self.limited.labels(self.model_name, label, limit).inc()
            return to_http_error(TenantLimitError(msg, limit, None, param))

        if lim.allowed_models is not None and model is not None:
            if model not in lim.allowed_models:
                raise refuse(
                    "allowed_models",
                    f"tenant {tenant.name!r} may not use model {model!r}",
                    "model",
                )
        num = params.num_candidates
        if lim.max_n is not None and num > lim.max_n:
            raise refuse(
                "max_n", f"n (with best_of) is {num}, tenant limit max_n is {lim.max_n}", "n"
            )
        if lim.max_tokens is not None:
            if params.max_tokens is None:
                params = params.clone()
                params.max_tokens = max(1, min(lim.max_tokens, max_model_len - num_prompt_tokens))
            elif params.max_tokens > lim.max_tokens:
                raise refuse(
                    "max_tokens",
                    f"max_tokens is {params.max_tokens}, tenant limit max_tokens is "
                    f"{lim.max_tokens}",
                    "max_tokens",
                )
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(params, name)
            if v is not None and v > lim.max_logprobs:
                raise refuse(
                    "max_logprobs",
                    f"{name} asks for {v} alternatives, tenant limit max_logprobs is "
                    f"{lim.max_logprobs}",
                    name,
                )
        return params

    def admit(
        self,
        tenant: Tenant,
        prompt_token_ids: list[int],
        params: SamplingParams,
        model: str | None,
        max_model_len: int,
    ) -> tuple[SamplingParams, Ticket]:
        params = self.check_params(tenant, params, model, max_model_len, len(prompt_token_ids))
        label = self.label(tenant.name)
        budget = params.max_tokens
        if budget is None:
            budget = max_model_len - len(prompt_token_ids)
        try:
            ticket = self.registry.limiter.admit(
                tenant, len(prompt_token_ids), budget, params.num_candidates
            )
        except TenantLimitError as e:
            self.limited.labels(self.model_name, label, e.limit).inc()
            raise to_http_error(e) from None
        self.admitted.labels(self.model_name, label).inc()
        self.charged.labels(self.model_name, label).inc(len(prompt_token_ids) + ticket.budget)
        self.running.labels(self.model_name, label).inc()
        if params.logprobs is not None or params.prompt_logprobs is not None:
            self.logprob_requests.labels(self.model_name, label).inc()
        self._note_prompt(label, prompt_token_ids)
        return params, ticket

    def finish(self, ticket: Ticket, num_generated: int) -> None:
        if ticket.done:
            return
        label = self.label(ticket.tenant.name)
        self.refunded.labels(self.model_name, label).inc(max(ticket.budget - num_generated, 0))
        self.running.labels(self.model_name, label).dec()
        ticket.finish(num_generated)

    def _note_prompt(self, label: str, prompt_token_ids: list[int]) -> None:
        now = self.clock()
        w = self._windows.setdefault(label, _PromptWindow())
        if now - w.start >= 60.0:
            w.start = now
            w.seen.clear()
        d = hashlib.blake2b(repr(prompt_token_ids).encode(), digest_size=16).digest()
        if d not in w.seen and len(w.seen) < _MAX_PROMPTS_PER_WINDOW:
            w.seen[d] = None
        self.distinct_prompts.labels(self.model_name, label).set(len(w.seen))
