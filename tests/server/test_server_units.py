"""Server pieces that need no server: request statistics, DELTA merging, error
parameter names, IPC round trip, bench percentiles (hand-computed references)."""

from __future__ import annotations

import argparse
import asyncio

import msgspec
import numpy as np
import pytest

from kvasir.bench.serve import RequestResult, _stats, summarize
from kvasir.core.outputs import EngineCoreOutput, SchedulerStats
from kvasir.engine.async_llm import RequestOutputCollector, _merge_delta
from kvasir.engine.core_proc import EngineCoreOutputs, RejectedRequest
from kvasir.engine.messages import EngineCoreRequest
from kvasir.engine.step_stats import StepStats
from kvasir.entrypoints.openai.errors import _loc_to_param
from kvasir.metrics.prometheus import PrometheusMetrics
from kvasir.metrics.stats import RequestStatsTracker
from kvasir.outputs import CompletionOutput, Logprob, RequestOutput
from kvasir.sampling_params import RequestOutputKind, SamplingParams


def _out(rid: str, toks: list[int], finish: str | None = None, sched: float | None = None):
    return EngineCoreOutput(rid, toks, finish_reason=finish, first_scheduled_time=sched)


def test_stats_tracker_timings() -> None:
    t = RequestStatsTracker()
    t.add_request("a", "a", arrival_time=100.0, num_prompt_tokens=7)
    it = t.update([_out("a", [], sched=100.5)], now=100.6)  # prefill chunk, no token
    assert it.num_generation_tokens == 0 and not it.time_to_first_tokens
    it = t.update([_out("a", [1])], now=101.0)
    assert it.time_to_first_tokens == [1.0] and it.num_prompt_tokens == 7
    it = t.update([_out("a", [2])], now=101.25)
    assert it.inter_token_latencies == [0.25]
    it = t.update([_out("a", [3], finish="length")], now=101.75)
    assert it.inter_token_latencies == [0.5] and len(it.finished) == 1
    f = it.finished[0]
    assert (f.finish_reason, f.num_generation_tokens, f.num_prompt_tokens) == ("length", 3, 7)
    assert f.e2e_latency == pytest.approx(1.75)
    assert f.queued_time == pytest.approx(0.5)
    assert f.prefill_time == pytest.approx(0.5)
    assert f.decode_time == pytest.approx(0.75)
    assert f.to_log_dict()["tpot_ms"] == pytest.approx(375.0)
    assert len(t) == 0
    t.add_request("b", "b", 0.0, 3)
    (ab,) = t.finish(["b", "unknown"], "abort", now=2.0)
    assert ab.finish_reason == "abort" and ab.ttft is None and ab.e2e_latency == 2.0


def test_prometheus_counters_from_cumulative_stats() -> None:
    m = PrometheusMetrics("m")
    m.record_scheduler_stats(SchedulerStats(2, 1, 0.5, 100, 40, 1, 64))
    m.record_scheduler_stats(SchedulerStats(0, 0, 0.0, 130, 56, 1, 0))
    text = m.render().decode()
    assert 'kvasir:prefix_cache_queries_total{model_name="m"} 130.0' in text
    assert 'kvasir:prefix_cache_hits_total{model_name="m"} 56.0' in text
    # Preemptions come per step, with their reason (StepStats), not from the totals.
    assert 'kvasir:num_preemptions_total{model_name="m",reason="kv_cache_full"} 0.0' in text
    m.record_step(StepStats(0.0, 0.001, 0.01, 0.001, 2, 64, ["a", "b"], ["priority"] * 2))
    m.record_step(StepStats(0.0, 0.001, 0.01, 0.001, 1, 1, ["c"], ["kv_cache_full"]))
    text = m.render().decode()
    assert 'kvasir:num_preemptions_total{model_name="m",reason="kv_cache_full"} 1.0' in text
    assert 'kvasir:num_preemptions_total{model_name="m",reason="priority"} 2.0' in text
    assert 'kvasir:engine_step_duration_seconds_sum{model_name="m"} 0.024' in text
    assert 'kvasir:iteration_num_requests_sum{model_name="m"} 3.0' in text
    assert 'kvasir:num_requests_running{model_name="m"} 0.0' in text
    assert 'kvasir:iteration_tokens_total_count{model_name="m"} 1.0' in text
    assert 'kvasir:iteration_tokens_total_sum{model_name="m"} 64.0' in text


def test_delta_outputs_merge_for_a_slow_reader() -> None:
    lp = {5: Logprob(-0.1, 1)}

    def ro(idx_text: list[tuple[int, str, list[int]]], finished: bool = False) -> RequestOutput:
        outs = [CompletionOutput(i, txt, ids, logprobs=[lp] * len(ids)) for i, txt, ids in idx_text]
        return RequestOutput("r", None, [1], outs, finished)

    c = RequestOutputCollector(RequestOutputKind.DELTA)
    c.put_nowait(ro([(0, "Hel", [5])]))
    c.put_nowait(ro([(1, "A", [6])]))
    last = ro([(0, "lo", [7, 8])], finished=True)
    last.outputs[0].finish_reason = "length"
    c.put_nowait(last)
    got = asyncio.run(c.get())
    assert got.finished
    assert [(o.index, o.text, o.token_ids) for o in got.outputs] == [
        (0, "Hello", [5, 7, 8]),
        (1, "A", [6]),
    ]
    assert got.outputs[0].finish_reason == "length" and len(got.outputs[0].logprobs) == 3
    merged = _merge_delta(ro([(0, "a", [1])]), ro([(0, "b", [2])]))
    assert merged.outputs[0].text == "ab"
    # An error wins over pending output and is raised to the reader.
    c.put_nowait(ro([(0, "x", [1])]))
    c.put_nowait(RuntimeError("dead"))
    with pytest.raises(RuntimeError):
        asyncio.run(c.get())


def test_validation_locations_become_param_names() -> None:
    assert _loc_to_param(("body", "stream_options", "include_usage")) == (
        "stream_options.include_usage"
    )
    assert _loc_to_param(("body", "messages", 2, "role")) == "messages[2].role"
    assert _loc_to_param(("body", "prompt", "list[int]", 0)) == "prompt[0]"
    assert _loc_to_param(("body", "temperature", "float")) == "temperature"
    assert _loc_to_param(("body",)) is None


def test_ipc_messages_round_trip_without_pickle() -> None:
    req = EngineCoreRequest(
        "r1",
        [1, 2, 3],
        SamplingParams(temperature=0.5, stop=["x"], output_kind=RequestOutputKind.DELTA),
    )
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(req), type=EngineCoreRequest)
    assert back.sampling_params.stop == ["x"]
    assert back.sampling_params.output_kind == RequestOutputKind.DELTA
    batch = EngineCoreOutputs(
        [_out("r1", [4], "stop")],
        SchedulerStats(1, 0, 0.1),
        [RejectedRequest("r2", "queue is full", True)],
        1.5,
    )
    got = msgspec.msgpack.decode(msgspec.msgpack.encode(batch), type=EngineCoreOutputs)
    assert got == batch


def test_bench_percentiles_match_numpy() -> None:
    xs = [0.3, 0.1, 0.7, 0.2, 0.9, 0.5, 0.4]
    s = _stats(xs, [50, 90, 99], scale=1.0)
    for p in (50, 90, 99):
        assert s[f"p{p}"] == pytest.approx(np.percentile(xs, p))
    assert s["mean"] == pytest.approx(np.mean(xs)) and s["std"] == pytest.approx(np.std(xs))
    ok = RequestResult(True, "", 10, 5, ttft=0.2, latency=0.6, itl=[0.1] * 4)
    slow = RequestResult(True, "", 10, 5, ttft=2.0, latency=2.4, itl=[0.1] * 4)
    bad = RequestResult(False, "HTTP 429")
    args = argparse.Namespace(
        base_url="u",
        endpoint="/v1/completions",
        request_rate=1.0,
        max_concurrency=None,
        percentiles="50",
        goodput=["ttft:1000"],
    )
    summary = summarize([ok, slow, bad], 2.0, args, "m")
    assert summary["completed"] == 2 and summary["failed"] == 1
    assert summary["tpot_ms"]["mean"] == pytest.approx(100.0)
    assert summary["goodput"] == pytest.approx(0.5)  # one of them met TTFT < 1 s, in 2 s
    assert summary["output_throughput"] == pytest.approx(5.0)


def test_serve_flags_use_vllm_names() -> None:
    from kvasir.entrypoints.openai.api_server import add_cli_args

    parser = add_cli_args(argparse.ArgumentParser())
    text = parser.format_help()
    for flag in (
        "--host",
        "--port",
        "--api-key",
        "--served-model-name",
        "--max-model-len",
        "--max-num-seqs",
        "--max-num-batched-tokens",
        "--gpu-memory-utilization",
        "--enable-prefix-caching",
        "--no-enable-prefix-caching",
        "--max-queued-requests",
        "--shutdown-timeout",
        "--max-request-body-bytes",
        "--log-requests-json",
        "--kv-cache-gb",
        "--load-format",
    ):
        assert flag in text, flag
    args = parser.parse_args(["my.gguf", "--port", "0", "--no-enable-prefix-caching"])
    assert args.model_tag == "my.gguf" and args.port == 0 and not args.enable_prefix_caching
