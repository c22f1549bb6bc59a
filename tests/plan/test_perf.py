"""The performance model: its efficiency factors come from RESULTS.md (the quoted cells
exist, and a held-out measurement is predicted), communication and speculative-decoding
formulas against hand and Monte Carlo references, the scheduler model against a
hand-traced schedule, and the studies against brute force."""

from __future__ import annotations

import math
import os
import random

import pytest

from kvasir.plan.config import PlanConfig
from kvasir.plan.efficiency import MEASUREMENTS, efficiency_for, measurement
from kvasir.plan.hardware import CATALOGUE
from kvasir.plan.model_spec import load_model_spec
from kvasir.plan.perf import (
    allreduce_time,
    expected_accepted,
    predict_latency,
    prefill_time,
    step_time,
)
from kvasir.plan.roofline import StepShape
from kvasir.plan.studies import (
    batch_sweep,
    best_batch_under_slo,
    best_chunk_size,
    chunk_size_study,
    transformer_vs_ssm,
)
from kvasir.plan.workload import Request, simulate

RESULTS = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "RESULTS.md")


def test_measurements_are_quoted_from_results_md() -> None:
    """Every efficiency factor's source is a verbatim cell of benchmarks/RESULTS.md
    under the heading it names, holding the value used."""
    with open(RESULTS, encoding="utf-8") as f:
        text = f.read()
    flat = text.replace("\n", " ")  # a quoted cell may wrap across lines
    for m in MEASUREMENTS:
        assert m.quote in flat, m.key
        heading = text.rfind("\n## ", 0, flat.index(m.quote))
        assert text[heading + 4 :].startswith(m.section), m.key


def test_efficiency_factors_reproduce_their_measurements() -> None:
    """Solved through the model: batch-1 decode of the 8B shape takes the measured
    step time on each card, and the 8k prefill the measured 0.242 s on the H100."""
    spec = load_model_spec("llama-3-8b")
    cfg = PlanConfig(max_num_batched_tokens=8192)
    for hw, key in (("h100-sxm", "decode_h100"), ("h200", "decode_h200")):
        t = step_time(spec, cfg, CATALOGUE[hw], StepShape.decode(1, 256)).seconds
        assert t == pytest.approx(measurement(key).value, rel=1e-9)
    t = prefill_time(spec, cfg, CATALOGUE["h100-sxm"], 8191)
    assert t == pytest.approx(measurement("prefill_h100").value, rel=1e-9)
    for name in ("h100-sxm", "h200", "l40s"):
        e = efficiency_for(CATALOGUE[name])
        assert 0.3 < e.gemm_compute <= 1 and 0.5 < e.gemm_memory <= 1


@pytest.mark.parametrize("hw,key", [("h200", "throughput_h200"), ("h100-sxm", "throughput_h100")])
def test_held_out_throughput_measurement(hw: str, key: str) -> None:
    """Nothing was solved from the 256-request throughput runs: the model, with the
    bench's own request lengths, predicts them within 15 %."""
    from kvasir.plan.memory import capacity
    from kvasir.plan.verify import VerifySettings, workload_lengths

    spec = load_model_spec("llama-3-8b")
    cfg = PlanConfig(max_model_len=4096, max_num_batched_tokens=8192)
    settings = VerifySettings(num_prompts=256, input_len="100:1024", output_len="100:1024")
    reqs = [Request(0.0, p, o) for p, o in workload_lengths(settings, spec.vocab_size)]
    sim = simulate(spec, cfg, CATALOGUE[hw], reqs, capacity(spec, cfg, CATALOGUE[hw]).num_blocks)
    measured = measurement(key).value
    print(f"{hw}: predicted {sim.output_tok_s:.1f} vs measured {measured} output tok/s")
    assert abs(sim.output_tok_s / measured - 1) < 0.15


def test_allreduce_formulas() -> None:
    m, bw, lat = 8e6, 100e9, 5e-6
    assert allreduce_time(m, 1, bw, lat, "ring") == 0
    assert allreduce_time(m, 4, bw, lat, "ring") == pytest.approx(2 * 3 / 4 * m / bw + 6 * lat)
    assert allreduce_time(m, 8, bw, lat, "tree") == pytest.approx(2 * m / bw + 6 * lat)
    small = allreduce_time(1e3, 8, bw, lat, "auto")
    assert small == allreduce_time(1e3, 8, bw, lat, "tree")  # latency-bound: tree wins
    big = allreduce_time(1e9, 8, bw, lat, "auto")
    assert big == allreduce_time(1e9, 8, bw, lat, "ring")  # bandwidth-bound: ring wins


def test_tensor_parallel_splits_decode_and_pays_all_reduces() -> None:
    spec = load_model_spec("llama-3.1-70b")
    h100 = CATALOGUE["h100-sxm"]
    t4 = step_time(spec, PlanConfig(tensor_parallel_size=4), h100, StepShape.decode(8, 2048))
    t8 = step_time(spec, PlanConfig(tensor_parallel_size=8), h100, StepShape.decode(8, 2048))
    comm8 = sum(o.seconds for o in t8.ops if o.bound == "comm")
    assert comm8 > 0 and t8.seconds < t4.seconds < 2 * t8.seconds
    # PCIe only (32 GB/s a direction against NVLink's 450): at a batch whose messages
    # are bandwidth-bound, the L40S's all-reduces cost many times the H100's.
    big = StepShape.decode(256, 2048)
    cfg8 = PlanConfig(tensor_parallel_size=8)
    comm_h100 = sum(o.seconds for o in step_time(spec, cfg8, h100, big).ops if o.bound == "comm")
    l40s = CATALOGUE["l40s"]
    comm_l40s = sum(o.seconds for o in step_time(spec, cfg8, l40s, big).ops if o.bound == "comm")
    assert comm_l40s > 5 * comm_h100


def test_pipeline_stages_add_latency_and_overlap() -> None:
    spec = load_model_spec("llama-3-8b")
    h100 = CATALOGUE["h100-sxm"]
    one = step_time(spec, PlanConfig(), h100, StepShape.decode(16, 1024))
    two = step_time(spec, PlanConfig(pipeline_parallel_size=2), h100, StepShape.decode(16, 1024))
    assert len(two.stage_seconds) == 2
    assert two.pipelined_period < one.seconds < two.seconds * 1.01 + 1e-4


def test_expected_accepted_tokens_against_simulation() -> None:
    rng = random.Random(0)
    for k, alpha in ((1, 0.5), (4, 0.7), (8, 0.9)):
        trials = 20000
        total = 0
        for _ in range(trials):
            n = 0
            while n < k and rng.random() < alpha:
                n += 1
            total += n + 1  # the accepted drafts and the bonus (or corrected) token
        assert total / trials == pytest.approx(expected_accepted(k, alpha), rel=0.02)


def test_speculative_decoding_speeds_up_memory_bound_decode() -> None:
    spec = load_model_spec("llama-3-8b")
    h100 = CATALOGUE["h100-sxm"]
    base = predict_latency(spec, PlanConfig(), h100, 128, 256)
    ngram = predict_latency(
        spec, PlanConfig(num_speculative_tokens=4, acceptance_rate=0.7), h100, 128, 256
    )
    assert ngram.spec_tokens_per_step == pytest.approx(expected_accepted(4, 0.7))
    assert ngram.decode_tok_s > 2 * base.decode_tok_s  # 2.77 tokens a step at ~the same cost
    draft = predict_latency(
        spec,
        PlanConfig(num_speculative_tokens=4, acceptance_rate=0.7, draft_model="qwen3-0.6b"),
        h100,
        128,
        256,
    )
    assert base.decode_tok_s < draft.decode_tok_s < ngram.decode_tok_s


def test_scheduler_model_against_hand_trace() -> None:
    """Budget 24, prompts 17, 40, 9, two tokens each (the schedule of the FLOP-count
    test): four steps, with these shapes, and every request's tokens accounted."""
    spec = load_model_spec("tiny-llama")
    hw = CATALOGUE["h100-sxm"]
    cfg = PlanConfig(max_num_batched_tokens=24, max_model_len=512)
    seen: list[StepShape] = []
    import kvasir.plan.workload as wl

    real = wl.step_time

    def spy(spec_, cfg_, hw_, shape, eff=None):  # noqa: ANN001, ANN202
        seen.append(shape)
        return real(spec_, cfg_, hw_, shape, eff)

    wl.step_time = spy  # type: ignore[assignment]
    try:
        res = simulate(
            spec, cfg, hw, [Request(0.0, 17, 2), Request(0.0, 40, 2), Request(0.0, 9, 2)], 100
        )
    finally:
        wl.step_time = real  # type: ignore[assignment]
    assert [(s.decode_context_lens, s.prefill_chunks, s.num_partial_chunks) for s in seen] == [
        ((), ((17, 0), (7, 0)), 1),
        ((18,), ((23, 7),), 1),
        ((), ((10, 30), (9, 0)), 0),
        ((41, 10), (), 0),
    ]
    assert res.output_tokens == 6 and res.num_steps == 4
    assert res.elapsed_s == pytest.approx(sum(step_time(spec, cfg, hw, s).seconds for s in seen))


def test_preemption_when_blocks_run_out() -> None:
    spec = load_model_spec("tiny-llama")
    cfg = PlanConfig(block_size=4, max_model_len=512)
    reqs = [Request(0.0, 10, 30) for _ in range(4)]
    # 4 requests of up to 40 tokens need 40 blocks; 20 usable force recomputation
    res = simulate(spec, cfg, CATALOGUE["h100-sxm"], reqs, 21)
    assert res.output_tokens == 120 and res.num_preemptions > 0


def test_best_batch_under_slo_is_the_brute_force_one() -> None:
    spec = load_model_spec("llama-3-8b")
    hw = CATALOGUE["l40s"]
    cfg = PlanConfig(max_model_len=4096)
    slo = 0.030
    best = best_batch_under_slo(spec, cfg, hw, 1024, slo, max_batch=200)
    rows = batch_sweep(spec, cfg, hw, 1024, list(range(1, 201)))
    ok = [r for r in rows if r["tpot_ms"] <= slo * 1e3]
    assert best["batch"] == max(r["batch"] for r in ok)
    assert best["tok_s"] == pytest.approx(max(r["tok_s"] for r in ok))


def test_chunk_size_trades_ttft_for_tpot() -> None:
    spec = load_model_spec("llama-3-8b")
    hw = CATALOGUE["h100-sxm"]
    rows = chunk_size_study(spec, PlanConfig(), hw, 4096, 32, 1024, [256, 512, 1024, 2048, 4096])
    ttft = [r["ttft_ms"] for r in rows]
    tpot = [r["tpot_during_prefill_ms"] for r in rows]
    assert ttft == sorted(ttft, reverse=True)  # bigger chunks: sooner first token
    assert tpot == sorted(tpot)  # ... and slower decode steps meanwhile
    best = best_chunk_size(rows, tpot[2] / 1e3)
    assert best == 1024  # the largest chunk whose TPOT meets the SLO has the best TTFT


def test_transformer_vs_ssm() -> None:
    """At a long context the SSM decodes faster and holds far more sequences."""
    t = load_model_spec("llama-2.7b-shape")
    m = load_model_spec("mamba-2.8b")
    rows = transformer_vs_ssm([t, m], PlanConfig(), CATALOGUE["h100-sxm"], [1024, 16384], 16)
    by = {(r["model"], r["context_len"]): r for r in rows}
    assert by["mamba-2.8b", 1024]["tpot_ms"] == pytest.approx(by["mamba-2.8b", 16384]["tpot_ms"])
    assert by["llama-2.7b-shape", 16384]["tpot_ms"] > 1.5 * by["mamba-2.8b", 16384]["tpot_ms"]
    assert (
        by["mamba-2.8b", 16384]["max_batch_by_memory"]
        > 50 * by["llama-2.7b-shape", 16384]["max_batch_by_memory"]
    )
    assert math.isclose(by["llama-2.7b-shape", 1024]["params_b"], 2.8, abs_tol=0.15)
