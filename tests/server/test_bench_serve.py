"""``kvasir bench serve`` against our server: every request completes and the JSON
summary has the latency percentiles, throughput and goodput."""

from __future__ import annotations

import json
import subprocess
import sys

from server_utils import API_KEY, REPO_ROOT, ServerProc


def test_bench_serve_reports_latencies(server: ServerProc, tmp_path) -> None:
    data = tmp_path / "prompts.jsonl"
    data.write_text(
        "\n".join(
            json.dumps({"prompt": p, "max_tokens": 3})
            for p in ("Hello there", "The capital of France is")
        )
        + "\n"
    )
    out = tmp_path / "result.json"
    cmd = [
        sys.executable,
        "-m",
        "kvasir.entrypoints.cli",
        "bench",
        "serve",
        "--base-url",
        server.url,
        "--api-key",
        API_KEY,
        "--num-prompts",
        "6",
        "--input-len",
        "12",
        "--output-len",
        "4",
        "--ignore-eos",
        "--request-rate",
        "20",
        "--goodput",
        "ttft:60000",
        "tpot:60000",
        "--result-file",
        str(out),
        "--disable-tqdm",
    ]
    r = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary == json.loads(out.read_text())
    assert summary["completed"] == 6 and summary["failed"] == 0
    assert summary["total_output_tokens"] == 6 * 4
    assert summary["total_input_tokens"] >= 6 * 12
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        s = summary[key]
        assert 0 < s["mean"] and s["p50"] <= s["p90"] <= s["p99"], (key, s)
    assert summary["ttft_ms"]["p99"] <= summary["e2el_ms"]["p99"]
    assert summary["request_throughput"] > 0 and summary["output_throughput"] > 0
    assert summary["goodput"] == summary["request_throughput"]  # SLOs of 60 s: all good

    # A JSONL dataset on the chat endpoint, at a fixed concurrency.
    cmd2 = [
        sys.executable,
        "-m",
        "kvasir.entrypoints.cli",
        "bench",
        "serve",
        "--base-url",
        server.url,
        "--api-key",
        API_KEY,
        "--endpoint",
        "/v1/chat/completions",
        "--dataset-path",
        str(data),
        "--num-prompts",
        "4",
        "--max-concurrency",
        "2",
        "--disable-tqdm",
    ]
    r = subprocess.run(cmd2, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    s2 = json.loads(r.stdout.strip().splitlines()[-1])
    assert s2["completed"] == 4 and 0 < s2["total_output_tokens"] <= 4 * 3


def test_bench_serve_random_token_ids(server: ServerProc) -> None:
    # Exact prompt lengths (token ids), as used with --load-format dummy models.
    cmd = [
        sys.executable,
        "-m",
        "kvasir.entrypoints.cli",
        "bench",
        "serve",
        "--base-url",
        server.url,
        "--api-key",
        API_KEY,
        "--random-token-ids",
        "--num-prompts",
        "2",
        "--input-len",
        "8",
        "--output-len",
        "2",
        "--ignore-eos",
        "--max-concurrency",
        "1",
        "--disable-tqdm",
    ]
    r = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["completed"] == 2 and s["total_input_tokens"] == 16
    assert s["total_output_tokens"] == 4
