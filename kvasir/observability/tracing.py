"""OpenTelemetry traces of requests, exported over OTLP (gRPC or HTTP/protobuf).

One server span per inference request (``chat MODEL`` / ``text_completion MODEL``),
joined to the caller's W3C ``traceparent`` when there is one, with child spans in time
order and never overlapping:

    tokenize    the prompt (or chat template) to token ids, in the API server
    queue       arrival -> first scheduled by the engine core
    prefill     first scheduled -> first token (recomputation after a preemption too)
    decode      first token -> last token
    detokenize  last token in the core -> its text ready in the API server (transfer,
                incremental detokenisation and stop-string check of the last output)

Events: ``kvasir.prefix_cache_hit`` (tokens) at the first schedule,
``kvasir.preemption`` (reason) when the core preempted the request,
``kvasir.spec_decode`` (drafts, accepted, rate) at the end of decode. Adapter loads join
once LoRA exists. Attributes follow OpenTelemetry's GenAI semantic conventions
(``gen_ai.*``) plus ``kvasir.*`` timings.

The engine core only stamps times into its outputs (``kvasir.engine.step_stats``); the
queue/prefill/decode spans are built here, after the fact, with those times, and the
SDK's ``BatchSpanProcessor`` exports them from its own thread. With tracing off none of
this module's SDK parts are imported and no exporter exists.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:
    from kvasir.metrics.stats import FinishedRequestStats
    from kvasir.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

PROTOCOLS = ("grpc", "http/protobuf")
_EXPORTER_MODULES = {
    "grpc": (
        "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
        "opentelemetry-exporter-otlp-proto-grpc",
    ),
    "http/protobuf": (
        "opentelemetry.exporter.otlp.proto.http.trace_exporter",
        "opentelemetry-exporter-otlp-proto-http",
    ),
}


@dataclass(frozen=True)
class TracingConfig:
    """Where traces go. ``endpoint`` None: tracing off."""

    endpoint: str | None = None
    protocol: str = "grpc"
    service_name: str = "kvasir"

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(
                f"otlp_traces_protocol must be one of {PROTOCOLS}, got {self.protocol!r}"
            )

    @property
    def enabled(self) -> bool:
        return bool(self.endpoint)

    @classmethod
    def from_flags(
        cls,
        endpoint: str | None,
        protocol: str | None,
        service_name: str | None,
        environ: Mapping[str, str] | None = None,
    ) -> TracingConfig:
        """Flags first, then OpenTelemetry's standard variables (``OTEL_EXPORTER_OTLP_
        TRACES_ENDPOINT``, ``OTEL_EXPORTER_OTLP_ENDPOINT``, ``..._PROTOCOL``,
        ``OTEL_SERVICE_NAME``)."""
        env = os.environ if environ is None else environ
        proto = (
            protocol
            or env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "grpc"
        )
        ep = endpoint or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        generic = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        if not ep and generic:
            # The generic variable names the collector; HTTP appends the signal's path.
            ep = generic.rstrip("/") + "/v1/traces" if proto == "http/protobuf" else generic
        if ep and proto == "http/protobuf" and urlparse(ep).path in ("", "/"):
            ep = ep.rstrip("/") + "/v1/traces"
        name = service_name or env.get("OTEL_SERVICE_NAME") or "kvasir"
        return cls(ep or None, proto, name)


def _import(module: str, package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise RuntimeError(
            f"tracing (--otlp-traces-endpoint) needs the Python package {package!r}, "
            f"which is not installed ({e}); pip install 'kvasir[otel]'"
        ) from None


def _ns(t: float) -> int:
    return int(t * 1e9)


class Tracing:
    """The server's tracer provider, exporter and propagator (no global OTel state).

    Construct at start-up: a missing package raises RuntimeError naming it."""

    def __init__(self, config: TracingConfig, exporter: Any = None) -> None:
        assert config.enabled or exporter is not None
        sdk_trace = _import("opentelemetry.sdk.trace", "opentelemetry-sdk")
        export = _import("opentelemetry.sdk.trace.export", "opentelemetry-sdk")
        resources = _import("opentelemetry.sdk.resources", "opentelemetry-sdk")
        tc = _import("opentelemetry.trace.propagation.tracecontext", "opentelemetry-api")
        self._trace = _import("opentelemetry.trace", "opentelemetry-api")
        if exporter is None:
            module, package = _EXPORTER_MODULES[config.protocol]
            exporter = _import(module, package).OTLPSpanExporter(endpoint=config.endpoint)
        self.config = config
        self.exporter = exporter
        self.provider = sdk_trace.TracerProvider(
            resource=resources.Resource.create({"service.name": config.service_name})
        )
        self.provider.add_span_processor(export.BatchSpanProcessor(exporter))
        from kvasir import __version__

        self.tracer = self.provider.get_tracer("kvasir", __version__)
        self.propagator = tc.TraceContextTextMapPropagator()
        self._kind_server = self._trace.SpanKind.SERVER
        self._status_error = self._trace.StatusCode.ERROR
        logger.info(
            "tracing: OTLP %s to %s as service %r",
            config.protocol,
            config.endpoint,
            config.service_name,
        )

    # ---------------------------------------------------------------- spans

    def start_request_span(self, name: str, headers: Mapping[str, str], attributes: dict) -> Any:
        """The server span of one HTTP request, child of the caller's ``traceparent``."""
        parent = self.propagator.extract(headers)
        return self.tracer.start_span(
            name, context=parent, kind=self._kind_server, attributes=attributes
        )

    def end_request_span(self, span: Any, status: int) -> None:
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(self._status_error, f"HTTP {status}")
        span.end()

    @contextmanager
    def child_span(self, parent: Any, name: str) -> Iterator[Any]:
        ctx = self._trace.set_span_in_context(parent)
        span = self.tracer.start_span(name, context=ctx)
        try:
            yield span
        finally:
            span.end()

    def _span(self, parent_ctx: Any, name: str, start: float, end: float, attrs: dict) -> Any:
        span = self.tracer.start_span(
            name, context=parent_ctx, start_time=_ns(start), attributes=attrs
        )
        return span

    def begin(
        self, span: Any, model: str, params: SamplingParams, num_prompt_tokens: int
    ) -> RequestTrace:
        span.set_attribute("gen_ai.request.model", model)
        span.set_attribute("gen_ai.response.model", model)
        span.set_attribute("gen_ai.system", "kvasir")
        span.set_attribute("gen_ai.provider.name", "kvasir")
        if params.max_tokens is not None:
            span.set_attribute("gen_ai.request.max_tokens", params.max_tokens)
        span.set_attribute("gen_ai.request.temperature", params.temperature)
        span.set_attribute("gen_ai.request.top_p", params.top_p)
        if params.top_k > 0:
            span.set_attribute("gen_ai.request.top_k", params.top_k)
        if params.seed is not None:
            span.set_attribute("gen_ai.request.seed", params.seed)
        if params.n != 1:
            span.set_attribute("gen_ai.request.choice.count", params.n)
        if params.presence_penalty:
            span.set_attribute("gen_ai.request.presence_penalty", params.presence_penalty)
        if params.frequency_penalty:
            span.set_attribute("gen_ai.request.frequency_penalty", params.frequency_penalty)
        return RequestTrace(self, span, num_prompt_tokens, params.n)


class RequestTrace:
    """One request's trace: engine-side child spans per finished sequence, GenAI usage
    on the request span once every sequence has finished."""

    def __init__(self, tracing: Tracing, span: Any, num_prompt_tokens: int, n: int) -> None:
        self.tracing = tracing
        self.span = span
        self.ctx = tracing._trace.set_span_in_context(span)
        self.num_prompt_tokens = num_prompt_tokens
        self.num_left = n
        self.num_output_tokens = 0
        self.finish_reasons: list[str] = []

    def seq_finished(self, f: FinishedRequestStats, arrival_time: float) -> None:
        t = self.tracing
        seq = {"kvasir.seq_id": f.request_id} if self.num_left > 1 or self.finish_reasons else {}
        end = f.finished_time
        sched = f.first_scheduled_time
        first = f.first_token_engine_time
        last = f.last_token_engine_time
        # Clamp into order: the core and the server read the same wall clock, but a
        # step boundary can land a hair either side of a server timestamp.
        q_end = min(max(sched if sched is not None else end, arrival_time), end)
        spans = [("queue", arrival_time, q_end)]
        if sched is not None and first is not None:
            p_end = min(max(first, q_end), end)
            spans.append(("prefill", q_end, p_end))
            d_end = min(max(last if last is not None else p_end, p_end), end)
            spans.append(("decode", p_end, d_end))
            spans.append(("detokenize", d_end, end))
        made = {}
        for name, s, e in spans:
            sp = t._span(self.ctx, name, s, e, seq)
            made[name] = (sp, s, e)
        if f.num_cached_tokens and "prefill" in made:
            sp, s, _ = made["prefill"]
            sp.add_event(
                "kvasir.prefix_cache_hit",
                {"kvasir.cached_tokens": f.num_cached_tokens},
                timestamp=_ns(s),
            )
        for when, reason in f.preemptions:
            target = "prefill"
            if "decode" in made and when >= made["decode"][1]:
                target = "decode"
            if target in made:
                sp, s, e = made[target]
                sp.add_event(
                    "kvasir.preemption",
                    {"kvasir.preemption.reason": reason},
                    timestamp=_ns(min(max(when, s), e)),
                )
        if f.num_draft_tokens and "decode" in made:
            sp, _, e = made["decode"]
            sp.add_event(
                "kvasir.spec_decode",
                {
                    "kvasir.spec_decode.draft_tokens": f.num_draft_tokens,
                    "kvasir.spec_decode.accepted_tokens": f.num_accepted_tokens,
                    "kvasir.spec_decode.acceptance_rate": f.num_accepted_tokens
                    / f.num_draft_tokens,
                },
                timestamp=_ns(e),
            )
        for sp, _, e in made.values():
            sp.end(end_time=_ns(e))
        self.num_output_tokens += f.num_generation_tokens
        self.finish_reasons.append(f.finish_reason)
        span = self.span
        if f.ttft is not None:
            span.set_attribute("kvasir.ttft_s", f.ttft)
        if f.tpot is not None:
            span.set_attribute("kvasir.tpot_s", f.tpot)
        if f.queued_time is not None:
            span.set_attribute("kvasir.queue_s", f.queued_time)
        if f.prefill_time is not None:
            span.set_attribute("kvasir.prefill_s", f.prefill_time)
        if f.decode_time is not None:
            span.set_attribute("kvasir.decode_s", f.decode_time)
        span.set_attribute("kvasir.e2e_s", f.e2e_latency)
        span.set_attribute("kvasir.cached_tokens", f.num_cached_tokens)
        span.set_attribute("kvasir.num_preemptions", f.num_preemptions)
        if f.num_draft_tokens:
            span.set_attribute("kvasir.spec_decode.draft_tokens", f.num_draft_tokens)
            span.set_attribute("kvasir.spec_decode.accepted_tokens", f.num_accepted_tokens)
        self.num_left -= 1
        if self.num_left <= 0:
            span.set_attribute("gen_ai.usage.input_tokens", self.num_prompt_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", self.num_output_tokens)
            span.set_attribute("gen_ai.response.finish_reasons", self.finish_reasons)


def init_tracing(config: TracingConfig) -> Tracing | None:
    """None when tracing is off (nothing of the SDK is imported)."""
    return Tracing(config) if config.enabled else None
