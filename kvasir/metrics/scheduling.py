"""Prometheus series of the scheduling policies (``kvasir.core.sched_stats``): the
step's token budget, decisions with their reasons, SLO attainment per class and
tenant, output-length prediction error and Jain's fairness index over tenants."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from kvasir.core.outputs import SchedulerStats


class SchedulingMetrics:
    def __init__(self, model_name: str, registry: CollectorRegistry) -> None:
        m, r = model_name, registry
        self._model_name = m
        self.token_budget = Gauge(
            "kvasir:scheduler_token_budget",
            "Token budget of the last step (--target-tpot-ms / slo make it adaptive).",
            ["model_name"],
            registry=r,
        ).labels(m)
        self.decisions = Counter(
            "kvasir:scheduler_decisions",
            "Scheduling policy decisions on requests (admitted, deferred, rejected).",
            ["model_name", "policy", "decision", "reason"],
            registry=r,
        )
        self.slo_requests = Counter(
            "kvasir:slo_requests",
            "Finished requests that had an SLO, per service tier and tenant.",
            ["model_name", "service_tier", "tenant"],
            registry=r,
        )
        self.slo_met = Counter(
            "kvasir:slo_requests_met",
            "Finished requests that met their TTFT and TPOT SLOs (goodput).",
            ["model_name", "service_tier", "tenant"],
            registry=r,
        )
        self.predictions = Counter(
            "kvasir:output_length_predictions",
            "Finished requests whose output length was predicted (sjf).",
            ["model_name"],
            registry=r,
        ).labels(m)
        self.predicted_tokens = Counter(
            "kvasir:output_length_predicted_tokens",
            "Sum of predicted output lengths.",
            ["model_name"],
            registry=r,
        ).labels(m)
        self.actual_tokens = Counter(
            "kvasir:output_length_actual_tokens",
            "Sum of the actual output lengths of the predicted requests.",
            ["model_name"],
            registry=r,
        ).labels(m)
        self.abs_error = Counter(
            "kvasir:output_length_prediction_abs_error_tokens",
            "Sum of |predicted - actual| output length.",
            ["model_name"],
            registry=r,
        ).labels(m)
        self.jain = Gauge(
            "kvasir:tenant_fairness_jain",
            "Jain's fairness index over tenants' service in the trailing window.",
            ["model_name"],
            registry=r,
        ).labels(m)
        self._last: dict[str, dict[str, int]] = {"d": {}, "t": {}, "m": {}}
        self._last_pred = (0, 0, 0, 0)

    def record(self, stats: SchedulerStats) -> None:
        policy = stats.policy
        self.token_budget.set(stats.token_budget)
        self.jain.set(stats.jain_fairness)
        m = self._model_name
        for key, cur in (
            ("d", stats.sched_decisions),
            ("t", stats.slo_total),
            ("m", stats.slo_met),
        ):
            last = self._last[key]
            for label, n in cur.items():
                delta = n - last.get(label, 0)
                if delta <= 0:
                    continue
                a, b = label.split("/", 1)
                if key == "d":
                    self.decisions.labels(m, policy, a, b).inc(delta)
                elif key == "t":
                    self.slo_requests.labels(m, a, b).inc(delta)
                else:
                    self.slo_met.labels(m, a, b).inc(delta)
            self._last[key] = dict(cur)
        cur_pred = (
            stats.num_length_predictions,
            stats.predicted_output_tokens,
            stats.actual_output_tokens,
            stats.prediction_abs_error,
        )
        counters = (self.predictions, self.predicted_tokens, self.actual_tokens, self.abs_error)
        for counter, new, old in zip(counters, cur_pred, self._last_pred, strict=True):
            if new > old:
                counter.inc(new - old)
        self._last_pred = cur_pred
