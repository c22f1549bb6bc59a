"""Prometheus metrics ``kvasir:*``, named and bucketed like vLLM's ``vllm:*`` set so
existing dashboards and autoscalers work with a prefix change.

Each server owns its own ``CollectorRegistry`` (no module-level state); ``/metrics``
renders it with ``render()``.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401 - re-export
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kvasir.core.outputs import SchedulerStats
from kvasir.engine.step_stats import PREEMPTION_REASONS, StepStats
from kvasir.metrics.http import HttpMetrics
from kvasir.metrics.scheduling import SchedulingMetrics
from kvasir.metrics.stats import FinishedRequestStats, IterationStats

_TTFT_BUCKETS = [
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
]
_ITL_BUCKETS = [
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
]
_LATENCY_BUCKETS = [
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
]
_TOKEN_BUCKETS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
_LEN_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000]
# Engine steps: a CPU decode step is ~10 ms, a GPU one ~1-30 ms, a long prefill ~1 s.
_STEP_BUCKETS = [
    0.0001,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
]
_BATCH_REQ_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
# KV-block residency: seconds to hours.
_RESIDENCY_BUCKETS = [0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 600, 1800, 3600, 7200]
FINISH_REASONS = ("stop", "length", "abort")


class PrometheusMetrics:
    """The server's metric set. ``record_*`` are called from the output handler."""

    def __init__(
        self,
        model_name: str,
        registry: CollectorRegistry | None = None,
        tenant_metrics: bool = False,
        max_tenant_labels: int = 100,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.http = HttpMetrics(model_name, r, tenant_metrics, max_tenant_labels)
        self.scheduling = SchedulingMetrics(model_name, r)
        labels = ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=r).labels(model_name)

        def hist(name: str, doc: str, buckets: list) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.num_requests_running = gauge(
            "kvasir:num_requests_running", "Number of requests in model execution batches."
        )
        self.num_requests_waiting = gauge(
            "kvasir:num_requests_waiting", "Number of requests waiting to be processed."
        )
        self.kv_cache_usage = gauge(
            "kvasir:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."
        )
        self.prefix_cache_queries = counter(
            "kvasir:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
        )
        self.prefix_cache_hits = counter(
            "kvasir:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
        )
        # vLLM's name plus a reason label (kvasir.engine.step_stats.PREEMPTION_REASONS).
        preemptions = Counter(
            "kvasir:num_preemptions",
            "Cumulative number of preemptions from the engine.",
            labels + ["reason"],
            registry=r,
        )
        self.num_preemptions = {x: preemptions.labels(model_name, x) for x in PREEMPTION_REASONS}
        self.prompt_tokens = counter("kvasir:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter(
            "kvasir:generation_tokens", "Number of generation tokens processed."
        )
        success = Counter(
            "kvasir:request_success",
            "Count of successfully processed requests.",
            labels + ["finished_reason"],
            registry=r,
        )
        self.request_success = {fr: success.labels(model_name, fr) for fr in FINISH_REASONS}
        self._request_success = success
        self._model_name = model_name
        self.ttft = hist(
            "kvasir:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            _TTFT_BUCKETS,
        )
        self.itl = hist(
            "kvasir:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            _ITL_BUCKETS,
        )
        self.e2e = hist(
            "kvasir:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            _LATENCY_BUCKETS,
        )
        self.queue_time = hist(
            "kvasir:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            _LATENCY_BUCKETS,
        )
        self.prefill_time = hist(
            "kvasir:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            _LATENCY_BUCKETS,
        )
        self.decode_time = hist(
            "kvasir:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            _LATENCY_BUCKETS,
        )
        self.iteration_tokens = hist(
            "kvasir:iteration_tokens_total",
            "Histogram of number of tokens per engine_step.",
            _TOKEN_BUCKETS,
        )
        self.request_prompt_tokens = hist(
            "kvasir:request_prompt_tokens", "Number of prefill tokens processed.", _LEN_BUCKETS
        )
        self.request_generation_tokens = hist(
            "kvasir:request_generation_tokens",
            "Number of generation tokens processed.",
            _LEN_BUCKETS,
        )
        # Speculative decoding (vLLM's names).
        self.spec_num_drafts = counter(
            "kvasir:spec_decode_num_drafts",
            "Number of spec decoding drafts (requests that verified drafts in a step).",
        )
        self.spec_num_draft_tokens = counter(
            "kvasir:spec_decode_num_draft_tokens", "Number of draft tokens."
        )
        self.spec_num_accepted_tokens = counter(
            "kvasir:spec_decode_num_accepted_tokens", "Number of accepted tokens."
        )
        self._spec_per_pos = Counter(
            "kvasir:spec_decode_num_accepted_tokens_per_pos",
            "Accepted tokens per draft position.",
            labels + ["position"],
            registry=r,
        )
        self.spec_k = gauge(
            "kvasir:spec_decode_num_speculative_tokens",
            "Mean drafts per speculating request in the last step with drafts (the k chosen).",
        )
        self._last_per_pos: list[int] = []
        # The core reports cumulative counts; Prometheus counters take increments.
        self._last_cumulative = (0, 0, 0, 0, 0)
        # Per engine step (kvasir.engine.step_stats.StepStats).
        self.step_duration = hist(
            "kvasir:engine_step_duration_seconds",
            "Histogram of engine step duration (schedule + execute + update) in seconds.",
            _STEP_BUCKETS,
        )
        self.schedule_duration = hist(
            "kvasir:engine_schedule_duration_seconds",
            "Histogram of time the scheduler spent per engine step in seconds.",
            _STEP_BUCKETS,
        )
        self.execute_duration = hist(
            "kvasir:engine_execute_duration_seconds",
            "Histogram of model execution time per engine step in seconds.",
            _STEP_BUCKETS,
        )
        self.batch_num_requests = hist(
            "kvasir:iteration_num_requests",
            "Histogram of number of requests per engine step.",
            _BATCH_REQ_BUCKETS,
        )
        self.tpot = hist(
            "kvasir:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            _ITL_BUCKETS,
        )
        self.kv_block_lifetime = hist(
            "kvasir:kv_block_lifetime_seconds",
            "Sampled KV-cache block lifetime from allocation to eviction (--kv-cache-metrics).",
            _RESIDENCY_BUCKETS,
        )
        self.kv_block_idle_before_evict = hist(
            "kvasir:kv_block_idle_before_evict_seconds",
            "Sampled idle time of a cached KV block from its last use to its eviction.",
            _RESIDENCY_BUCKETS,
        )
        self.kv_block_reuse_gap = hist(
            "kvasir:kv_block_reuse_gap_seconds",
            "Sampled time between a cached KV block's release and its next prefix hit.",
            _RESIDENCY_BUCKETS,
        )
        # Goodput: finished requests within --slo-ttft-ms and --slo-tpot-ms.
        self.request_goodput = counter(
            "kvasir:request_goodput",
            "Requests that finished (stop or length) within the TTFT and TPOT SLOs.",
        )
        self.slo_ttft_s: float | None = None
        self.slo_tpot_s: float | None = None

    def record_scheduler_stats(self, stats: SchedulerStats) -> None:
        self.scheduling.record(stats)
        self.num_requests_running.set(stats.num_running_reqs)
        self.num_requests_waiting.set(stats.num_waiting_reqs)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        cur = (
            stats.prefix_cache_queries,
            stats.prefix_cache_hits,
            stats.spec_num_drafts,
            stats.spec_num_draft_tokens,
            stats.spec_num_accepted_tokens,
        )
        counters = (
            self.prefix_cache_queries,
            self.prefix_cache_hits,
            self.spec_num_drafts,
            self.spec_num_draft_tokens,
            self.spec_num_accepted_tokens,
        )
        for counter, new, old in zip(counters, cur, self._last_cumulative, strict=True):
            if new > old:
                counter.inc(new - old)
        self._last_cumulative = cur
        if stats.spec_accepted_per_pos:
            last = self._last_per_pos
            for pos, n in enumerate(stats.spec_accepted_per_pos):
                prev = last[pos] if pos < len(last) else 0
                if n > prev or pos >= len(last):
                    self._spec_per_pos.labels(self._model_name, str(pos)).inc(max(n - prev, 0))
            self._last_per_pos = list(stats.spec_accepted_per_pos)
        if stats.spec_k:
            self.spec_k.set(stats.spec_k)
        if stats.num_scheduled_tokens > 0:
            self.iteration_tokens.observe(stats.num_scheduled_tokens)

    def record_step(self, st: StepStats) -> None:
        self.step_duration.observe(st.schedule_s + st.execute_s + st.update_s)
        self.schedule_duration.observe(st.schedule_s)
        self.execute_duration.observe(st.execute_s)
        if st.num_reqs:
            self.batch_num_requests.observe(st.num_reqs)
        for reason in st.preemption_reasons:
            self.num_preemptions[reason].inc()
        for x in st.kv_block_lifetimes:
            self.kv_block_lifetime.observe(x)
        for x in st.kv_block_idle_before_evict:
            self.kv_block_idle_before_evict.observe(x)
        for x in st.kv_block_reuse_gaps:
            self.kv_block_reuse_gap.observe(x)

    def record_iteration(self, it: IterationStats) -> None:
        if it.num_prompt_tokens:
            self.prompt_tokens.inc(it.num_prompt_tokens)
        if it.num_generation_tokens:
            self.generation_tokens.inc(it.num_generation_tokens)
        for x in it.time_to_first_tokens:
            self.ttft.observe(x)
        for x in it.inter_token_latencies:
            self.itl.observe(x)
        self.record_finished(it.finished)

    def record_finished(self, finished: list[FinishedRequestStats]) -> None:
        for f in finished:
            c = self.request_success.get(f.finish_reason)
            if c is None:
                c = self._request_success.labels(self._model_name, f.finish_reason)
            c.inc()
            self.e2e.observe(f.e2e_latency)
            if f.queued_time is not None:
                self.queue_time.observe(f.queued_time)
            if f.prefill_time is not None:
                self.prefill_time.observe(f.prefill_time)
            if f.decode_time is not None:
                self.decode_time.observe(f.decode_time)
            self.request_prompt_tokens.observe(f.num_prompt_tokens)
            self.request_generation_tokens.observe(f.num_generation_tokens)
            tpot = f.tpot
            if tpot is not None:
                self.tpot.observe(tpot)
            if f.finish_reason in ("stop", "length") and f.ttft is not None:
                ok_ttft = self.slo_ttft_s is None or f.ttft <= self.slo_ttft_s
                ok_tpot = self.slo_tpot_s is None or tpot is None or tpot <= self.slo_tpot_s
                if ok_ttft and ok_tpot:
                    self.request_goodput.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
