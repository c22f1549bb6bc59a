"""``kvasir top --once`` renders a frame against the live server (captured); the
percentile arithmetic against a hand-computed case."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from server_utils import MODEL, REPO_ROOT, ServerProc

from kvasir.observability.top import quantile


def test_quantile_like_prometheus() -> None:
    b = [(0.1, 10.0), (0.5, 30.0), (1.0, 40.0), (float("inf"), 40.0)]
    assert quantile(0.5, b) == 0.1 + 0.4 * (20 - 10) / 20  # 0.3
    assert quantile(0.25, b) == 0.1 * 10 / 10  # inside the first bucket: 0.1
    assert quantile(0.99, b) == 0.5 + 0.5 * (39.6 - 30) / 10
    assert quantile(0.5, []) is None


def test_top_renders_a_frame(obs_server: ServerProc) -> None:
    with obs_server.client() as c:
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 3})
        assert r.status_code == 200
    env = dict(os.environ, COLUMNS="140", PYTHONPATH=str(REPO_ROOT))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvasir.entrypoints.cli",
            "top",
            "--once",
            "--interval",
            "0.5",
            "--url",
            obs_server.url,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"kvasir top - {MODEL} @ {obs_server.url}" in text
    for word in (
        "running",
        "waiting",
        "KV cache",
        "prefix hit rate",
        "generation tok/s",
        "TTFT",
        "TPOT",
        "ITL",
        "e2e",
        "p50",
        "p99",
    ):
        assert word in text, word
    # Finished requests so far, as the server counts them.
    import httpx

    metrics = httpx.get(obs_server.url + "/metrics").text
    done = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("kvasir:request_success_total{")
    )
    assert re.search(rf"finished\s+{int(done)}\b", text), text
    # The fake NVML's GPUs (the server's PYTHONPATH holds fake_nvml/).
    assert "NVIDIA H100 80GB HBM3" in text and "RTX 4090" in text
    h100 = next(line for line in text.splitlines() if "H100" in line)
    assert "87" in h100 and "64" in h100 and "60.0/80.0" in h100 and "512/700" in h100
    # A TTFT was measured: its p50 is a number, not "-".
    ttft = next(line for line in text.splitlines() if "TTFT" in line)
    assert re.search(r"\d+\.\d", ttft), ttft


def test_top_unreachable_server_is_a_clear_error() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvasir.entrypoints.cli",
            "top",
            "--once",
            "--url",
            "http://127.0.0.1:9",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )
    assert out.returncode == 2 and "cannot read http://127.0.0.1:9/metrics" in out.stderr
