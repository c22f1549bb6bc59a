"""Traces of a real ``kvasir serve`` received by a local OTLP receiver: one trace per
request, its child spans in order and never overlapping, GenAI attributes, a caller's
``traceparent`` joined; gRPC export; tracing off creates no exporter; a missing
OpenTelemetry package is a start-up error naming it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from otlp_receiver import GrpcReceiver, HttpReceiver, Span
from server_utils import MODEL, REPO_ROOT, ServerProc

CHILDREN = ["tokenize", "queue", "prefill", "decode", "detokenize"]
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


def _trace(spans: list[Span], trace_id: str) -> list[Span]:
    return [s for s in spans if s.trace_id == trace_id]


def test_one_trace_per_request_with_ordered_children(
    obs_server: ServerProc, otlp_http: HttpReceiver
) -> None:
    with obs_server.client() as c:
        joined = c.post(
            "/v1/completions",
            json={
                "model": MODEL,
                "prompt": "The capital of France is",
                "max_tokens": 4,
                "temperature": 0,
                "ignore_eos": True,
            },
            headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"},
        )
        fresh = c.post(
            "/v1/chat/completions",
            json={
                "model": MODEL,
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 3,
                "temperature": 0,
                "stream": True,
            },
        )
    assert joined.status_code == 200 and fresh.status_code == 200
    usage = joined.json()["usage"]
    joined_id = joined.json()["id"]

    def roots(spans: list[Span]) -> list[Span]:
        return [s for s in spans if s.name.split(" ")[0] in ("chat", "text_completion")]

    def complete(spans: list[Span]) -> bool:
        ids = {s.attributes.get("gen_ai.response.id") for s in roots(spans)}
        have = [r for r in roots(spans) if r.attributes.get("gen_ai.response.id") == joined_id]
        chat = [r for r in roots(spans) if r.name.startswith("chat")]
        ok = bool(have and chat)
        for r in have + chat[-1:]:
            ok = ok and len([s for s in spans if s.parent_span_id == r.span_id]) == 5
        return ok and len(ids) >= 2

    spans = otlp_http.store.wait_for(complete)
    assert complete(spans), [(s.name, s.trace_id) for s in spans]

    # The caller's trace is joined: its trace id, the caller's span as parent.
    (root,) = [r for r in roots(spans) if r.attributes.get("gen_ai.response.id") == joined_id]
    assert root.trace_id == CALLER_TRACE and root.parent_span_id == CALLER_SPAN
    assert root.name == f"text_completion {MODEL}" and root.service_name == "kvasir-test"
    a = root.attributes
    assert a["gen_ai.operation.name"] == "text_completion"
    assert a["gen_ai.request.model"] == MODEL and a["gen_ai.request.max_tokens"] == 4
    assert a["gen_ai.request.temperature"] == 0.0
    assert a["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert a["gen_ai.usage.output_tokens"] == usage["completion_tokens"] == 4
    assert a["gen_ai.response.finish_reasons"] == ["length"]
    assert a["http.response.status_code"] == 200
    assert a["kvasir.cached_tokens"] == usage["prompt_tokens_details"]["cached_tokens"]
    assert 0 < a["kvasir.ttft_s"] <= a["kvasir.e2e_s"]
    assert a["kvasir.tpot_s"] > 0
    assert abs(a["kvasir.prefill_s"] + a["kvasir.queue_s"] - a["kvasir.ttft_s"]) < 0.05

    for r in (
        root,
        roots(
            _trace(
                spans,
                fresh_trace := [s for s in roots(spans) if s.name.startswith("chat")][-1].trace_id,
            )
        )[0],
    ):
        trace = _trace(spans, r.trace_id)
        kids = sorted([s for s in trace if s.parent_span_id == r.span_id], key=lambda s: s.start_ns)
        # Exactly the expected children, in order, each inside the request span and
        # none overlapping the next.
        assert [s.name for s in kids] == CHILDREN
        for s in kids:
            assert r.start_ns <= s.start_ns <= s.end_ns <= r.end_ns, s.name
        for x, y in zip(kids, kids[1:]):
            assert x.end_ns <= y.start_ns, (x.name, y.name)
        # A new request without traceparent is the root of its own trace.
        if r is not root:
            assert r.trace_id == fresh_trace and r.parent_span_id == ""
        # Decode lasted as long as the TPOT attribute says (tokens - 1 gaps).
        decode = kids[3]
        n_out = r.attributes["gen_ai.usage.output_tokens"]
        expect = r.attributes["kvasir.tpot_s"] * (n_out - 1)
        assert abs((decode.end_ns - decode.start_ns) / 1e9 - expect) < 0.05
    # One trace per request.
    assert len({r.trace_id for r in roots(spans)}) == len(roots(spans))


def test_prefix_cache_hit_event(obs_server: ServerProc, otlp_http: HttpReceiver) -> None:
    prompt = "one two three four five six seven eight nine ten eleven twelve thirteen " * 2
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0}
    with obs_server.client() as c:
        c.post("/v1/completions", json=body)
        second = c.post("/v1/completions", json=body).json()
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= 16

    def found(spans: list[Span]) -> list[Span]:
        roots = [s for s in spans if s.attributes.get("gen_ai.response.id") == second["id"]]
        if not roots:
            return []
        return [s for s in spans if s.parent_span_id == roots[0].span_id and s.name == "prefill"]

    spans = otlp_http.store.wait_for(lambda s: bool(found(s)))
    (prefill,) = found(spans)
    events = [e for e in prefill.events if e[0] == "kvasir.prefix_cache_hit"]
    assert events and events[0][2]["kvasir.cached_tokens"] == cached
    assert events[0][1] == prefill.start_ns


def test_grpc_export_and_engine_spans_from_stats() -> None:
    """The gRPC transport, and RequestTrace's spans/events from known timestamps."""
    from kvasir.metrics.stats import FinishedRequestStats
    from kvasir.observability.tracing import Tracing, TracingConfig
    from kvasir.sampling_params import SamplingParams

    rx = GrpcReceiver()
    try:
        tracing = Tracing(TracingConfig(rx.url, "grpc", "grpc-test"))
        span = tracing.start_request_span("chat m", {}, {"gen_ai.operation.name": "chat"})
        tr = tracing.begin(span, "m", SamplingParams(max_tokens=8, temperature=0.5), 7)
        f = FinishedRequestStats(
            "r",
            "r",
            "stop",
            7,
            5,
            4,
            e2e_latency=3.0,
            queued_time=0.5,
            prefill_time=0.5,
            decode_time=1.5,
            ttft=1.0,
            num_preemptions=2,
            num_draft_tokens=6,
            num_accepted_tokens=3,
            first_scheduled_time=100.5,
            first_token_engine_time=101.0,
            last_token_engine_time=102.5,
            finished_time=103.0,
            preemptions=[(100.7, "kv_cache_full"), (101.5, "priority")],
        )
        tr.seq_finished(f, arrival_time=100.0)
        tracing.end_request_span(span, 200)
        tracing.provider.force_flush()
        spans = rx.store.wait_for(lambda s: len(s) >= 5)
        tracing.provider.shutdown()
    finally:
        rx.close()
    by = {s.name: s for s in spans}
    assert by["chat m"].service_name == "grpc-test"
    want = {
        "queue": (100.0, 100.5),
        "prefill": (100.5, 101.0),
        "decode": (101.0, 102.5),
        "detokenize": (102.5, 103.0),
    }
    for name, (s, e) in want.items():
        assert abs(by[name].start_ns / 1e9 - s) < 1e-6 and abs(by[name].end_ns / 1e9 - e) < 1e-6
    pre = [e for e in by["prefill"].events if e[0] == "kvasir.preemption"]
    dec = [e for e in by["decode"].events if e[0] == "kvasir.preemption"]
    assert [e[2]["kvasir.preemption.reason"] for e in pre] == ["kv_cache_full"]
    assert [e[2]["kvasir.preemption.reason"] for e in dec] == ["priority"]
    (spec,) = [e for e in by["decode"].events if e[0] == "kvasir.spec_decode"]
    assert spec[2]["kvasir.spec_decode.acceptance_rate"] == 0.5
    (hit,) = [e for e in by["prefill"].events if e[0] == "kvasir.prefix_cache_hit"]
    assert hit[2]["kvasir.cached_tokens"] == 4
    a = by["chat m"].attributes
    assert a["gen_ai.usage.input_tokens"] == 7 and a["gen_ai.usage.output_tokens"] == 5
    assert a["kvasir.tpot_s"] == 1.5 / 4 and a["kvasir.num_preemptions"] == 2


def test_tracing_off_creates_no_exporter() -> None:
    code = textwrap.dedent(
        """
        import sys
        import kvasir.entrypoints.openai.launcher  # the whole server stack
        from kvasir.observability.tracing import TracingConfig, init_tracing
        cfg = TracingConfig.from_flags(None, None, None, environ={})
        assert not cfg.enabled
        assert init_tracing(cfg) is None
        sdk = [m for m in sys.modules if m.startswith(("opentelemetry.sdk", "opentelemetry.exporter"))]
        assert not sdk, sdk
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_env_config() -> None:
    from kvasir.observability.tracing import TracingConfig

    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://col:4318",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_SERVICE_NAME": "svc",
    }
    assert TracingConfig.from_flags(None, None, None, env) == TracingConfig(
        "http://col:4318/v1/traces", "http/protobuf", "svc"
    )
    env = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://col:4317"}
    assert TracingConfig.from_flags(None, None, "flag", env) == TracingConfig(
        "http://col:4317", "grpc", "flag"
    )
    # Flags win over the environment.
    assert TracingConfig.from_flags("http://x:1", "grpc", None, env).endpoint == "http://x:1"


def test_missing_otel_package_is_a_startup_error(tmp_path) -> None:  # noqa: ANN001
    # A sitecustomize that makes the SDK unimportable, as if it were not installed.
    (tmp_path / "sitecustomize.py").write_text(
        textwrap.dedent(
            """
            import sys
            class _Block:
                def find_spec(self, name, path=None, target=None):
                    if name == "opentelemetry.sdk" or name.startswith("opentelemetry.sdk."):
                        raise ModuleNotFoundError(f"No module named {name!r}")
                    return None
            sys.meta_path.insert(0, _Block())
            """
        )
    )
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO_ROOT}")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvasir.entrypoints.cli",
            "serve",
            "--port",
            "0",
            "--otlp-traces-endpoint",
            "http://127.0.0.1:9",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert out.returncode == 1
    assert "opentelemetry-sdk" in out.stderr and "pip install" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
