"""``kvasir_router:*`` Prometheus metrics, on the router's own registry (``/metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]


class RouterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "kvasir_router:requests_total",
            "Requests sent to a replica, by the policy and its decision (a retry counts again).",
            ["replica", "policy", "decision", "version"],
            registry=r,
        )
        self.responses = Counter(
            "kvasir_router:responses_total",
            "Client requests answered, by HTTP status.",
            ["status"],
            registry=r,
        )
        self.retries = Counter(
            "kvasir_router:retries_total",
            "Requests retried on another replica before their first byte.",
            ["replica", "reason"],
            registry=r,
        )
        self.migrations = Counter(
            "kvasir_router:migrations_total",
            "Streams moved mid-generation (prompt + generated tokens replayed elsewhere).",
            ["from_replica", "to_replica", "reason"],
            registry=r,
        )
        self.migrated_tokens = Counter(
            "kvasir_router:migrated_tokens_total",
            "Generated tokens replayed as prompt by migrations (the recomputation cost).",
            registry=r,
        )
        self.ejections = Counter(
            "kvasir_router:ejections_total",
            "Replicas ejected by passive (error rate) or active (probe) health checks.",
            ["replica", "reason"],
            registry=r,
        )
        self.hedges = Counter(
            "kvasir_router:hedges_total",
            "Duplicate requests sent because no first byte came within --hedge-after; "
            "outcome says which copy won.",
            ["outcome"],
            registry=r,
        )
        self.shadow = Counter(
            "kvasir_router:shadow_requests_total",
            "Copies of requests sent to a shadow version (answers discarded).",
            ["version", "status"],
            registry=r,
        )
        self.shadow_latency = Histogram(
            "kvasir_router:shadow_latency_seconds",
            "Latency of shadow copies.",
            ["version"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "kvasir_router:request_latency_seconds",
            "Time from the router receiving a request to its last byte, by final replica.",
            ["replica", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttfb = Histogram(
            "kvasir_router:time_to_first_byte_seconds",
            "Time from the router receiving a request to the replica's response headers.",
            ["replica"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.healthy = Gauge(
            "kvasir_router:replica_healthy",
            "1 if the replica takes new requests (healthy, not ejected, cordoned or draining).",
            ["replica"],
            registry=r,
        )
        self.outstanding = Gauge(
            "kvasir_router:replica_outstanding_requests",
            "Requests the router has in flight on the replica.",
            ["replica"],
            registry=r,
        )
        self.no_replica = Counter(
            "kvasir_router:no_healthy_replica_total",
            "Requests answered 503 because no replica could take them.",
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
