"""Cost of observability on serving throughput: the same CPU load through three real
``kvasir serve`` processes - everything off, tracing on (OTLP/HTTP to a local sink that
accepts and drops), per-tenant metrics on - in alternating rounds (rotated order, so a
drift of the machine's speed hits every configuration alike). Prints a table and a
one-line JSON summary last: per configuration the median output tok/s over the rounds
and its ratio to "off".

    python benchmarks/bench_observability.py --rounds 5 --num-prompts 16 --concurrency 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
KEY = "bench-key"


class _Sink(BaseHTTPRequestHandler):
    spans_bytes = 0

    def do_POST(self) -> None:  # noqa: N802
        n = int(self.headers.get("content-length", 0))
        self.rfile.read(n)
        _Sink.spans_bytes += n
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:  # noqa: ANN002
        pass


def start(extra: list[str]) -> tuple[subprocess.Popen, str, Path]:
    fd, log = tempfile.mkstemp(prefix="kvasir-bench-obs-", suffix=".log")
    args = [
        sys.executable,
        "-m",
        "kvasir.entrypoints.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--max-model-len",
        "1024",
        "--kv-cache-gb",
        "0.2",
        "--disable-uvicorn-access-log",
        "--api-key",
        KEY,
        *extra,
    ]
    proc = subprocess.Popen(args, cwd=REPO, stdout=fd, stderr=subprocess.STDOUT)
    os.close(fd)
    deadline = time.monotonic() + 300
    url = None
    while time.monotonic() < deadline:
        text = Path(log).read_text(errors="replace")
        if proc.poll() is not None:
            raise RuntimeError(text)
        m = re.search(r"listening on (http://[\d.]+:\d+)", text)
        url = m.group(1) if m else None
        if url and "serving " in text:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    return proc, url, Path(log)
            except httpx.HTTPError:
                pass
        time.sleep(0.3)
    raise RuntimeError("server did not start")


def bench(url: str, args: argparse.Namespace) -> float:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [
            sys.executable,
            "-m",
            "kvasir.entrypoints.cli",
            "bench",
            "serve",
            "--base-url",
            url,
            "--api-key",
            KEY,
            "--num-prompts",
            str(args.num_prompts),
            "--max-concurrency",
            str(args.concurrency),
            "--input-len",
            str(args.input_len),
            "--output-len",
            str(args.output_len),
            "--ignore-eos",
            "--temperature",
            "0",
            "--seed",
            "0",
            "--result-file",
            f.name,
            "--disable-tqdm",
        ]
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
        return float(json.loads(Path(f.name).read_text())["output_throughput"])


def micro(n: int = 2000) -> dict[str, float]:
    """Microseconds per request of the server-side work each feature adds, in-process:
    the request span, its five child spans and events (exporter: a no-op, so this is
    the SDK's cost on the server's event loop), and the tenant counters."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    from kvasir.metrics.prometheus import PrometheusMetrics
    from kvasir.metrics.stats import FinishedRequestStats
    from kvasir.observability.tracing import Tracing, TracingConfig
    from kvasir.sampling_params import SamplingParams

    class Drop(SpanExporter):
        def export(self, spans):  # noqa: ANN001, ANN202
            return SpanExportResult.SUCCESS

    tracing = Tracing(TracingConfig("http://unused", "http/protobuf"), exporter=Drop())
    params = SamplingParams(max_tokens=32)
    f = FinishedRequestStats(
        "r",
        "r",
        "length",
        64,
        32,
        16,
        3.0,
        0.1,
        0.4,
        2.5,
        0.5,
        0,
        first_scheduled_time=1.1,
        first_token_engine_time=1.5,
        last_token_engine_time=4.0,
        finished_time=4.0,
    )
    t0 = time.perf_counter()
    for _ in range(n):
        span = tracing.start_request_span("text_completion m", {}, {})
        with tracing.child_span(span, "tokenize"):
            pass
        tracing.begin(span, "m", params, 64).seq_finished(f, 1.0)
        tracing.end_request_span(span, 200)
    trace_us = (time.perf_counter() - t0) / n * 1e6
    tracing.provider.shutdown()
    m = PrometheusMetrics("m", tenant_metrics=True, max_tenant_labels=100)
    t0 = time.perf_counter()
    for i in range(n):
        tenant = m.http.tenant_label(f"t{i % 50}")
        m.http.record_response("/v1/completions", 200, tenant)
        m.http.record_tokens(tenant, 64, 32)
    tenant_us = (time.perf_counter() - t0) / n * 1e6
    return {
        "tracing_us_per_request": round(trace_us, 1),
        "tenant_us_per_request": round(tenant_us, 2),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--micro-only", action="store_true", help="only the in-process costs")
    args = p.parse_args()
    costs = micro()
    print(json.dumps(costs), flush=True)
    if args.micro_only:
        return 0
    sink = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    sink_url = f"http://127.0.0.1:{sink.server_address[1]}/v1/traces"
    configs = {
        "off": [],
        "tracing": ["--otlp-traces-endpoint", sink_url, "--otlp-traces-protocol", "http/protobuf"],
        "tenant_metrics": ["--enable-tenant-metrics"],
    }
    servers = {name: start(extra) for name, extra in configs.items()}
    results: dict[str, list[float]] = {name: [] for name in configs}
    try:
        for _proc, url, _log in servers.values():  # warm-up: the first runs are far slower
            bench(url, args)
        names = list(configs)
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                results[name].append(bench(servers[name][1], args))
            print(
                f"round {r + 1}: " + ", ".join(f"{n} {results[n][-1]:.1f}" for n in names),
                flush=True,
            )
    finally:
        for proc, _, log in servers.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            log.unlink(missing_ok=True)
        sink.shutdown()
    med = {n: statistics.median(v) for n, v in results.items()}
    print(f"\n{'config':16} {'median tok/s':>12} {'vs off':>8}  rounds")
    for n, v in results.items():
        print(
            f"{n:16} {med[n]:12.2f} {med[n] / med['off'] - 1:+8.2%}  "
            + " ".join(f"{x:.1f}" for x in v)
        )
    summary = {
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "workload": vars(args),
        "median_output_tok_s": {n: round(x, 3) for n, x in med.items()},
        "ratio_vs_off": {n: round(med[n] / med["off"], 4) for n in med},
        "rounds": results,
        "trace_bytes_exported": _Sink.spans_bytes,
        **costs,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
