"""Multi-LoRA metrics: per-adapter request and token counters, vLLM's
``lora_requests_info`` gauge, and the adapter cache's tiers, cold starts and strategy.

Created by the server only when LoRA is enabled (no series otherwise)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge

from kvasir.core.outputs import SchedulerStats


class LoRAMetrics:
    def __init__(self, registry: CollectorRegistry, model_name: str) -> None:
        self.model_name = model_name
        labels = ["model_name", "lora_name"]
        self.request_success = Counter(
            "kvasir:lora_request_success",
            "Finished requests per adapter and finish reason.",
            [*labels, "finished_reason"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "kvasir:lora_prompt_tokens", "Prompt tokens per adapter.", labels, registry=registry
        )
        self.generation_tokens = Counter(
            "kvasir:lora_generation_tokens",
            "Generated tokens per adapter.",
            labels,
            registry=registry,
        )
        # vLLM's gauge: the value is the update's timestamp, the labels the adapters.
        self.requests_info = Gauge(
            "kvasir:lora_requests_info",
            "Running stats on LoRA requests: running and waiting adapters (comma-separated).",
            ["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
            registry=registry,
        )
        self._info_labels: tuple[str, str, str] | None = None
        self.cache_events = Counter(
            "kvasir:lora_cache_events",
            "Adapter cache events: device_hits (resident in a slot at admission), "
            "device_loads, host_hits, host_misses, disk_loads.",
            ["model_name", "event"],
            registry=registry,
        )
        self.cold_starts = Counter(
            "kvasir:lora_cold_starts",
            "Adapters read from disk for a waiting request.",
            ["model_name"],
            registry=registry,
        ).labels(model_name)
        self.cold_start_seconds = Counter(
            "kvasir:lora_cold_start_seconds",
            "Total seconds from a cold adapter's first request to its being in host memory "
            "(read from disk; ready for a device slot).",
            ["model_name"],
            registry=registry,
        ).labels(model_name)
        self.steps = Counter(
            "kvasir:lora_steps",
            "Steps with adapters, by strategy (merged: B A folded into the base weights).",
            ["model_name", "strategy"],
            registry=registry,
        )
        self.merged = Gauge(
            "kvasir:lora_merged",
            "1 while an adapter is merged into the base weights.",
            ["model_name"],
            registry=registry,
        ).labels(model_name)
        self._last: dict[str, float] = {}

    def record_finished(
        self, lora_name: str, finish_reason: str, num_prompt: int, num_generated: int
    ) -> None:
        self.request_success.labels(self.model_name, lora_name, finish_reason).inc()
        self.prompt_tokens.labels(self.model_name, lora_name).inc(num_prompt)
        self.generation_tokens.labels(self.model_name, lora_name).inc(num_generated)

    def record_stats(self, stats: SchedulerStats, names: dict[int, str]) -> None:
        def join(ids: list[int]) -> str:
            return ",".join(names.get(i, str(i)) for i in ids)

        labels = (str(stats.max_loras), join(stats.lora_waiting_ids), join(stats.lora_running_ids))
        if labels != self._info_labels:
            if self._info_labels is not None:
                self.requests_info.remove(*self._info_labels)
            self._info_labels = labels
        self.requests_info.labels(*labels).set(time.time())
        cur = stats.lora_stats
        last = self._last
        for event in ("device_hits", "device_loads", "host_hits", "host_misses", "disk_loads"):
            d = cur.get(event, 0.0) - last.get(event, 0.0)
            if d > 0:
                self.cache_events.labels(self.model_name, event).inc(d)
        for key, counter in (
            ("cold_starts", self.cold_starts),
            ("cold_start_seconds_sum", self.cold_start_seconds),
        ):
            d = cur.get(key, 0.0) - last.get(key, 0.0)
            if d > 0:
                counter.inc(d)
        for key, strategy in (("merged_steps", "merged"), ("unmerged_steps", "unmerged")):
            d = cur.get(key, 0.0) - last.get(key, 0.0)
            if d > 0:
                self.steps.labels(self.model_name, strategy).inc(d)
        self.merged.set(cur.get("merged", 0.0))
        self._last = dict(cur)
