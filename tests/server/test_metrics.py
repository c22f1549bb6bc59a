"""/metrics after known traffic: counters and histograms move by the expected amounts;
the JSON request log has one line per finished request."""

from __future__ import annotations

import json
import re
import time

import httpx
from server_utils import MODEL, ServerProc


def _scrape(server: ServerProc) -> dict[str, float]:
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for line in r.text.splitlines():
        if line.startswith("#") or not line.startswith("kvasir:"):
            continue
        name, value = line.rsplit(" ", 1)
        # Drop the model_name label; keep the others (finished_reason, le).
        name = re.sub(r'model_name="[^"]*",?', "", name).replace(",}", "}").replace("{}", "")
        out[name] = float(value)
    return out


def test_metrics_move_with_traffic(server: ServerProc, http) -> None:
    before = _scrape(server)
    for name in (
        "kvasir:num_requests_running",
        "kvasir:num_requests_waiting",
        "kvasir:kv_cache_usage_perc",
        "kvasir:prefix_cache_queries_total",
        "kvasir:prefix_cache_hits_total",
        'kvasir:num_preemptions_total{reason="kv_cache_full"}',
        'kvasir:num_preemptions_total{reason="priority"}',
        "kvasir:engine_step_duration_seconds_count",
        "kvasir:engine_schedule_duration_seconds_count",
        "kvasir:iteration_num_requests_count",
        "kvasir:request_time_per_output_token_seconds_count",
        "kvasir:request_goodput_total",
        "kvasir:prompt_tokens_total",
        "kvasir:generation_tokens_total",
        'kvasir:request_success_total{finished_reason="stop"}',
        "kvasir:time_to_first_token_seconds_count",
        "kvasir:inter_token_latency_seconds_count",
        "kvasir:e2e_request_latency_seconds_count",
        "kvasir:request_queue_time_seconds_count",
        "kvasir:request_prefill_time_seconds_count",
        "kvasir:request_decode_time_seconds_count",
        "kvasir:iteration_tokens_total_count",
    ):
        assert name in before, name

    prompt = (
        "Count with me: one two three four five six seven eight nine ten eleven twelve "
        "thirteen fourteen fifteen sixteen"
    )
    ids = http.post("/tokenize", json={"prompt": prompt}).json()["tokens"]
    assert len(ids) > 17  # at least one full KV block to hit the prefix cache
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 5, "ignore_eos": True, "temperature": 0}
    first = http.post("/v1/completions", json=body).json()
    second = http.post("/v1/completions", json={**body, "stream": True})
    assert second.status_code == 200
    after = _scrape(server)

    def delta(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    n = len(ids)
    assert delta("kvasir:prompt_tokens_total") == 2 * n
    assert delta("kvasir:generation_tokens_total") == 10
    assert delta('kvasir:request_success_total{finished_reason="length"}') == 2
    for h in (
        "time_to_first_token_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
        "request_prefill_time_seconds",
        "request_decode_time_seconds",
    ):
        assert delta(f"kvasir:{h}_count") == 2, h
        assert delta(f"kvasir:{h}_sum") >= 0, h
    # One inter-token gap per token after the first (one decode step each).
    assert delta("kvasir:inter_token_latency_seconds_count") == 8
    # At least one step per token; each step's token count is observed.
    assert delta("kvasir:iteration_tokens_total_count") >= 5
    # Every prompt token not served from the prefix cache, plus 4 decode steps each.
    hits = delta("kvasir:prefix_cache_hits_total")
    assert hits >= 16  # the second request reuses the first's full blocks
    assert delta("kvasir:iteration_tokens_total_sum") == 2 * n - hits + 8
    assert delta("kvasir:prefix_cache_queries_total") >= 2 * n - 2
    assert after["kvasir:num_requests_running"] == 0
    assert after["kvasir:num_requests_waiting"] == 0
    e2e_bucket_inf = 'kvasir:e2e_request_latency_seconds_bucket{le="+Inf"}'
    assert delta(e2e_bucket_inf) == 2
    # Engine steps: each one timed, its batch size observed (one request per step here).
    steps = delta("kvasir:engine_step_duration_seconds_count")
    assert steps >= delta("kvasir:iteration_tokens_total_count") >= 5
    assert delta("kvasir:iteration_num_requests_sum") == delta(
        "kvasir:iteration_num_requests_count"
    )
    assert (
        0
        < delta("kvasir:engine_schedule_duration_seconds_sum")
        < delta("kvasir:engine_step_duration_seconds_sum")
    )
    assert delta("kvasir:request_time_per_output_token_seconds_count") == 2
    # Every HTTP answer by endpoint and status.
    assert delta('kvasir:http_requests_total{endpoint="/v1/completions",status="200"}') == 2
    assert delta('kvasir:http_requests_total{endpoint="/tokenize",status="200"}') == 1

    # One JSON log line per finished request, with its timings.
    deadline = time.monotonic() + 5
    while True:
        lines = [
            json.loads(x)
            for x in server.log().splitlines()
            if x.startswith("{") and first["id"] in x
        ]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(lines) == 1
    rec = lines[0]
    assert rec["event"] == "request_finished" and rec["finish_reason"] == "length"
    assert rec["prompt_tokens"] == n and rec["completion_tokens"] == 5
    assert 0 <= rec["ttft_ms"] <= rec["e2e_ms"]
    assert rec["queue_ms"] is not None and rec["decode_ms"] is not None
