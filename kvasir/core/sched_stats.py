"""What the scheduling policies decide and what it buys: decision counts, SLO
attainment per class and tenant, output-length prediction error, Jain's fairness index.

Kept by the scheduler for every policy (so ``fcfs`` can be compared with ``slo``
on the same numbers) and shipped in ``SchedulerStats``; the API server turns them
into Prometheus series (``kvasir.metrics.prometheus``).
"""

from __future__ import annotations

import logging
from collections import deque

from kvasir.config import SchedulerConfig
from kvasir.core.request import Request

logger = logging.getLogger(__name__)

INTERACTIVE, BATCH = "interactive", "batch"
# OpenAI's service_tier values, mapped onto kvasir's two classes.
_TIER_ALIASES = {"auto": INTERACTIVE, "default": INTERACTIVE, "priority": INTERACTIVE}
_TIER_ALIASES.update({"flex": BATCH, INTERACTIVE: INTERACTIVE, BATCH: BATCH})
SERVICE_TIER_VALUES = tuple(_TIER_ALIASES)
# Tenants beyond this many share the label "other" (Prometheus label cardinality).
MAX_TENANT_LABELS = 64
DEFAULT_TENANT = ""


def normalize_service_tier(tier: str | None) -> str:
    """``interactive`` or ``batch`` for a request's ``service_tier`` (None: interactive);
    ValueError naming the field for anything else."""
    if tier is None:
        return INTERACTIVE
    try:
        return _TIER_ALIASES[tier]
    except KeyError:
        raise ValueError(
            f"service_tier must be one of {list(SERVICE_TIER_VALUES)}, got {tier!r}"
        ) from None


def resolve_slos(request: Request, config: SchedulerConfig) -> None:
    """Fill in the request's class (its own, else its tenant's from
    ``tenant_service_tiers``, else interactive) and its SLOs from the class's defaults
    (its own ``ttft_slo_ms`` / ``tpot_slo_ms`` win)."""
    tier_name = request.service_tier
    if tier_name is None and config.tenant_service_tiers and request.tenant is not None:
        tier_name = dict(config.tenant_service_tiers).get(request.tenant)
    tier = normalize_service_tier(tier_name)
    request.service_tier = tier
    for name in ("ttft_slo_ms", "tpot_slo_ms"):
        value = getattr(request, name)
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
        if value is None:
            setattr(request, name, getattr(config, f"{tier}_{name}"))


def jain_index(values: list[float]) -> float:
    """(sum x)^2 / (n * sum x^2): 1.0 when all are equal, 1/n when one has it all."""
    if not values:
        return 1.0
    sq = sum(v * v for v in values)
    if sq == 0:
        return 1.0
    total = sum(values)
    return total * total / (len(values) * sq)


class SchedulingStats:
    """Cumulative counters (decisions, SLOs, predictions) and a trailing window of
    tenants' service. Plain Python; the scheduler calls it a few times per step."""

    def __init__(self, fairness_window_s: float) -> None:
        self.window_s = fairness_window_s
        # "admitted/<reason>", "deferred/<reason>", "rejected/<reason>" -> count
        self.decisions: dict[str, int] = {}
        # "<class>/<tenant>" -> requests with an SLO that finished / met all of them
        self.slo_total: dict[str, int] = {}
        self.slo_met: dict[str, int] = {}
        self.num_predictions = 0
        self.predicted_tokens = 0
        self.actual_tokens = 0
        self.prediction_abs_error = 0
        # One entry per step: (time, {tenant: tokens}).
        self._window: deque[tuple[float, dict[str, int]]] = deque()
        self._window_service: dict[str, int] = {}
        self._tenant_labels: set[str] = set()

    def tenant_label(self, tenant: str | None) -> str:
        tenant = tenant or DEFAULT_TENANT
        if tenant in self._tenant_labels:
            return tenant
        if len(self._tenant_labels) < MAX_TENANT_LABELS:
            self._tenant_labels.add(tenant)
            return tenant
        return "other"

    def record_decision(self, decision: str, reason: str, request: Request) -> None:
        key = f"{decision}/{reason}"
        self.decisions[key] = self.decisions.get(key, 0) + 1
        logger.debug("%s %s (%s)", decision, request.request_id, reason)

    def record_service(self, now: float, tokens_by_tenant: dict[str, int]) -> None:
        """One step's scheduled tokens per tenant."""
        self._window.append((now, tokens_by_tenant))
        service = self._window_service
        for label, n in tokens_by_tenant.items():
            service[label] = service.get(label, 0) + n

    def jain_fairness(self, now: float) -> float:
        """Jain's index over the tokens each tenant was served in the trailing window."""
        window, service = self._window, self._window_service
        while window and window[0][0] < now - self.window_s:
            for label, n in window.popleft()[1].items():
                left = service[label] - n
                if left:
                    service[label] = left
                else:
                    del service[label]
        return jain_index([float(v) for v in service.values()])

    def record_finished(self, request: Request) -> None:
        if request.predicted_output_tokens is not None:
            self.num_predictions += 1
            self.predicted_tokens += request.predicted_output_tokens
            self.actual_tokens += request.num_output_tokens
            self.prediction_abs_error += abs(
                request.predicted_output_tokens - request.num_output_tokens
            )
        met = slo_met(request)
        if met is None:
            return
        key = f"{request.service_tier or INTERACTIVE}/{self.tenant_label(request.tenant)}"
        self.slo_total[key] = self.slo_total.get(key, 0) + 1
        if met:
            self.slo_met[key] = self.slo_met.get(key, 0) + 1


def slo_met(request: Request) -> bool | None:
    """Whether a finished request met its TTFT and TPOT SLOs (None: it had none, or
    produced no token). Times are the scheduler's clock (arrival to token times)."""
    ttft, tpot = request.ttft_slo_ms, request.tpot_slo_ms
    if (ttft is None and tpot is None) or request.first_token_time is None:
        return None
    if ttft is not None and (request.first_token_time - request.arrival_time) * 1000 > ttft:
        return False
    n = request.num_output_tokens
    if tpot is not None and n > 1 and request.last_token_time is not None:
        mean_tpot_ms = (request.last_token_time - request.first_token_time) * 1000 / (n - 1)
        if mean_tpot_ms > tpot:
            return False
    return True
