"""Scheduling policies end to end: a real ``kvasir serve --scheduling-policy slo``
(step-time model measured at start-up), requests with ``user`` / ``service_tier`` /
SLO fields, ``kvasir bench serve`` with per-request classes and tenants in its JSONL
dataset, admission control's 429 with ``Retry-After``, and the policy metrics."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest
from server_utils import API_KEY, MODEL, REPO_ROOT, ServerProc, start_server


@pytest.fixture(scope="module")
def slo_server() -> Iterator[ServerProc]:
    # A batch request is refused when the work queued ahead of it (itself included)
    # would take longer than --slo-max-batch-wait-s by the step-time model measured at
    # start-up: at 1 ms, every batch request is (timings on a shared CPU are too noisy
    # for a threshold between two sizes; the scheduler tests cover deferral).
    srv = start_server(
        "--scheduling-policy", "slo", "--max-num-batched-tokens", "256",
        "--slo-max-batch-wait-s", "0.001",
    )  # fmt: skip
    try:
        yield srv
    finally:
        rc = srv.stop()
        assert rc == 0, srv.log()


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_slo_server_rejects_and_validates(slo_server: ServerProc) -> None:
    assert re.search(r"step time [\d.]+ ms \+ [\d.]+ ms per token", slo_server.log())
    with slo_server.client() as http:
        body = {"model": MODEL, "prompt": "hello " * 40, "max_tokens": 4}
        r = http.post("/v1/completions", json=body)  # interactive (the default class)
        assert r.status_code == 200, r.text
        r = http.post("/v1/completions", json={**body, "service_tier": "batch"})
        assert r.status_code == 429, r.text
        assert int(r.headers["Retry-After"]) >= 1
        assert "slo_max_batch_wait_s" in r.json()["error"]["message"]
        r = http.post("/v1/completions", json={**body, "service_tier": "gold"})
        assert r.status_code == 400 and "service_tier" in r.text
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "tpot_slo_ms": -5})
        assert r.status_code == 400 and "tpot_slo_ms" in r.text
        metrics = http.get("/metrics").text
    assert _metric(metrics, "kvasir:scheduler_decisions_total", policy="slo",
                   decision="rejected", reason="estimated_wait") == 1  # fmt: skip


def test_bench_serve_goodput_per_class_and_tenant(slo_server: ServerProc, tmp_path) -> None:
    rows = [
        {"prompt": "Tell me a story about a cat", "max_tokens": 4, "ignore_eos": True,
         "tenant": "small", "service_tier": "interactive", "ttft_slo_ms": 120000,
         "tpot_slo_ms": 60000, "arrival_s": 0.2 * k}
        for k in range(4)
    ] + [
        {"prompt": "Summarise: " + "the city of the north " * 5, "max_tokens": 6,
         "ignore_eos": True, "tenant": "big", "service_tier": "batch", "arrival_s": 0.6 * k}
        for k in range(3)
    ]  # fmt: skip
    with slo_server.client() as http:
        before = http.get("/metrics").text
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = [
        sys.executable, "-m", "kvasir.entrypoints.cli", "bench", "serve",
        "--base-url", slo_server.url, "--api-key", API_KEY, "--dataset-path", str(data),
        "--num-prompts", str(len(rows)), "--disable-tqdm",
    ]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["completed"] == 4, summary.get("first_errors")
    inter, batch = summary["per_class"]["interactive"], summary["per_class"]["batch"]
    assert (inter["num_requests"], inter["completed"], inter["slo_met"]) == (4, 4, 4)
    assert inter["slo_attainment"] == 1.0 and inter["goodput"] > 0
    assert inter["output_throughput"] == pytest.approx(16 / summary["duration_s"])
    # Every batch request was refused with 429: rejected, and no goodput.
    assert (batch["num_requests"], batch["completed"], batch["rejected"]) == (3, 0, 3)
    assert batch["slo_met"] == 0 and batch["goodput"] == 0
    assert set(summary["per_tenant"]) == {"small", "big"}
    assert summary["per_tenant"]["big"]["rejected"] == 3
    assert summary["per_tenant"]["small"]["ttft_ms"]["p99"] <= 120000
    assert "class interactive" in r.stdout
    with slo_server.client() as http:
        metrics = http.get("/metrics").text
    # The engine measured SLO attainment on its own clock, per class and tenant.
    assert _metric(metrics, "kvasir:slo_requests_total", service_tier="interactive",
                   tenant="small") == 4  # fmt: skip
    assert _metric(metrics, "kvasir:slo_requests_met_total", service_tier="interactive",
                   tenant="small") == 4  # fmt: skip
    for decision, n in (("admitted", 4), ("rejected", 3)):
        name, labels = "kvasir:scheduler_decisions_total", dict(policy="slo", decision=decision)
        assert _metric(metrics, name, **labels) - _metric(before, name, **labels) == n
    assert _metric(metrics, "kvasir:scheduler_token_budget") > 0
    assert 0 < _metric(metrics, "kvasir:tenant_fairness_jain") <= 1
