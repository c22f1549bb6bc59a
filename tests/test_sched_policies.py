"""Scheduling policies (lpm, fair, sjf, slo) and the TPOT-bounded token budget, at the
scheduler level: the fake runner of ``test_scheduler`` (which checks every KV read and
every output against a request run alone) and a simulated clock.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_scheduler import (
    EOS,
    FakeRunner,
    SimClock,
    _run_random_workload,
    check_against_reference,
    check_invariants,
    make_sched,
    workloads,
)

from kvasir.core.policies import RequestRejected
from kvasir.core.policies.length_predictor import OutputLengthPredictor
from kvasir.core.request import Request
from kvasir.core.sched_stats import SchedulingStats, jain_index, normalize_service_tier
from kvasir.core.scheduler import Scheduler
from kvasir.core.step_time import StepTimeModel
from kvasir.sampling_params import SamplingParams

NEW_POLICIES = ["lpm", "fair", "sjf", "slo"]


# ---------------------------------------------------------------- properties


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    workloads(),
    st.sampled_from(NEW_POLICIES),
    st.integers(1, 6),
    st.one_of(st.none(), st.floats(1.0, 8.0)),
)
def test_policy_random_workloads(
    w: dict, policy: str, age_bound: int, target_tpot_ms: float | None
) -> None:
    """Every admitted request finishes with its stand-alone output (or its abort), no
    block leaks, the step's token budget is never exceeded (``drive`` checks each step
    against ``token_budget``), and no request that has waited past the age bound is
    overtaken by a later arrival."""
    model = StepTimeModel(base_s=0.0005, per_token_s=0.0002)  # a 5 ms target fits ~22
    stats, trace, admitted = _run_random_workload(
        w,
        speculate=False,
        policy=policy,
        step_time_model=model,
        policy_age_bound_s=float(age_bound),
        target_tpot_ms=target_tpot_ms,
        interactive_tpot_slo_ms=4.0,
    )
    firsts = {
        r.request_id: (trace.first_new_step[r.request_id], r.arrival_time, r.arrival_seq)
        for r in admitted
        if r.fork_of is None and r.request_id in trace.first_new_step
    }
    for a, (step_a, arrival_a, seq_a) in firsts.items():
        for b, (step_b, arrival_b, seq_b) in firsts.items():
            if step_b < step_a and step_b - arrival_a >= age_bound:
                # a had waited past the bound when b was admitted: b must be older.
                assert (arrival_b, seq_b) < (arrival_a, seq_a), (a, b, firsts)
    assert 0 < stats.jain_fairness <= 1.0


# ---------------------------------------------------------------- a simulated engine


@dataclass
class Sim:
    """Drives a scheduler on a simulated clock: each step takes ``step_time(tokens)``
    seconds; arrivals are (time, Request), added at the first step boundary after."""

    sched: Scheduler
    clock: SimClock
    step_time: StepTimeModel | None = None
    token_times: dict[str, list[float]] = field(default_factory=dict)
    admitted_at: dict[str, float] = field(default_factory=dict)
    service: dict[str, float] = field(default_factory=dict)  # tenant -> weighted tokens
    gaps: list[float] = field(default_factory=list)  # |service gap| while both backlogged
    outputs: dict = field(default_factory=dict)

    def run(self, arrivals: list[tuple[float, Request]], max_steps: int = 20000) -> None:
        runner = FakeRunner(self.sched.block_size)
        pending = sorted(arrivals, key=lambda a: a[0])
        steps = 0
        while pending or self.sched.has_unfinished_requests():
            while pending and pending[0][0] <= self.clock.t:
                t, req = pending.pop(0)
                req.arrival_time = t
                self.sched.add_request(req)
            if not self.sched.has_unfinished_requests():
                self.clock.t = pending[0][0]
                continue
            so = self.sched.schedule()
            for nr in so.scheduled_new_reqs:
                self.admitted_at.setdefault(nr.req_id, self.clock.t)
            self._account(so)
            mro = runner.execute(so)
            dt = self.step_time.predict(so.total_num_scheduled_tokens) if self.step_time else 1.0
            self.clock.t += dt
            for out in self.sched.update_from_output(so, mro):
                self.outputs.setdefault(out.request_id, []).append(out)
                times = self.token_times.setdefault(out.request_id, [])
                times.extend([self.clock.t] * len(out.new_token_ids))
            check_invariants(self.sched)
            steps += 1
            assert steps < max_steps, "no progress"

    def _account(self, so) -> None:  # type: ignore[no-untyped-def]
        sched = self.sched
        cfg = sched.scheduler_config
        for rid, n in so.num_scheduled_tokens.items():
            r = sched.requests[rid]
            before = r.num_computed_tokens - n
            num_prompt = max(min(before + n, r.num_prompt_tokens) - before, 0)
            cost = cfg.fair_prompt_weight * num_prompt + cfg.fair_output_weight * (n - num_prompt)
            self.service[r.tenant or ""] = self.service.get(r.tenant or "", 0.0) + cost
        backlogged = {r.tenant for r in sched.requests.values()}
        if {"a", "b"} <= backlogged:
            self.gaps.append(abs(self.service.get("a", 0.0) - self.service.get("b", 0.0)))


def _req(rid: str, prompt_len: int, max_tokens: int, **kw: object) -> Request:
    seed = zlib.crc32(rid.encode())  # distinct prompts: no prefix-cache hits among them
    prompt = [(i * 7 + seed) % 37 + 1 for i in range(prompt_len)]
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return Request(rid, prompt, sp, eos_token_ids=EOS, **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------- fair


def _flood(policy: str, num_flood: int) -> Sim:
    clock = SimClock()
    sched = make_sched(
        num_blocks=200, block_size=4, max_model_len=64, max_num_batched_tokens=32,
        max_num_seqs=4, policy=policy, clock=clock, policy_age_bound_s=1e6,
    )  # fmt: skip
    arrivals = [(0.0, _req(f"a{i}", 12, 8, tenant="a")) for i in range(num_flood)]
    arrivals += [(0.0, _req(f"b{i}", 12, 8, tenant="b")) for i in range(12)]
    sim = Sim(sched, clock)
    sim.run(arrivals)
    for _, req in arrivals:
        check_against_reference(sched, _Trace(sim.outputs), req)
    return sim


@dataclass
class _Trace:
    outputs: dict


def test_fair_bounds_the_service_gap_while_one_tenant_floods() -> None:
    """Two backlogged tenants, one flooding: under fair the gap in weighted service
    stays under one constant (max_num_seqs requests' cost plus a step's budget) for
    any flood size; under fcfs it grows with the flood."""
    request_cost = 12 * 1.0 + 8 * 2.0
    bound = 4 * request_cost + 32 * 2.0
    for num_flood in (40, 120):
        sim = _flood("fair", num_flood)
        assert sim.gaps and max(sim.gaps) <= bound, (num_flood, max(sim.gaps))
    assert max(_flood("fcfs", 120).gaps) > 3 * bound


def test_fair_idle_tenant_cannot_bank_credit() -> None:
    """A tenant idle while another was served is lifted to the backlogged tenant's
    counter when it comes back: its burst shares the engine instead of owning it."""
    clock = SimClock()
    sched = make_sched(
        num_blocks=200, block_size=4, max_model_len=64, max_num_batched_tokens=32,
        max_num_seqs=2, policy="fair", clock=clock, policy_age_bound_s=1e6,
    )  # fmt: skip
    arrivals = [(0.0, _req(f"a{i}", 12, 8, tenant="a")) for i in range(30)]
    arrivals += [(40.0, _req(f"b{i}", 12, 8, tenant="b")) for i in range(10)]
    sim = Sim(sched, clock)
    sim.run(arrivals)
    policy = sched.policy
    # After b arrived, a kept being admitted: it got at least a third of the admissions
    # in the next 10 (with banked credit b would have had all of them).
    later = sorted((t, rid) for rid, t in sim.admitted_at.items() if t >= 40.0)[:10]
    assert sum(rid.startswith("a") for _, rid in later) >= 3, later
    assert policy.counters["b"] > 0  # type: ignore[attr-defined]


def test_jain_index_over_a_window() -> None:
    assert jain_index([5.0, 5.0, 5.0]) == pytest.approx(1.0)
    assert jain_index([9.0, 0.0, 0.0]) == pytest.approx(1 / 3)
    assert jain_index([3.0, 1.0]) == pytest.approx(16 / 20)
    st_ = SchedulingStats(fairness_window_s=10.0)
    st_.record_service(0.0, {"a": 20})
    st_.record_service(5.0, {"a": 10, "b": 10})
    assert st_.jain_fairness(6.0) == pytest.approx(40**2 / (2 * (30**2 + 10**2)))
    assert st_.jain_fairness(12.0) == pytest.approx(1.0)  # the t=0 step left the window


# ---------------------------------------------------------------- slo


def _mixed(policy: str, num_blocks: int = 400) -> tuple[Sim, list[Request], list[Request]]:
    """Interactive chat (16-token prompts, 12 outputs, every 0.15 s) beside a batch
    job of long prompts. Step time is exactly 10 ms + 1 ms per token, known to the
    scheduler; a full 256-token step takes 266 ms, over the 80 ms TPOT bound."""
    model = StepTimeModel(base_s=0.010, per_token_s=0.001)
    clock = SimClock()
    sched = make_sched(
        num_blocks=num_blocks, block_size=16, max_model_len=512, max_num_batched_tokens=256,
        max_num_seqs=16, policy=policy, clock=clock, policy_age_bound_s=60.0,
        interactive_ttft_slo_ms=1000.0, interactive_tpot_slo_ms=80.0,
    )  # fmt: skip
    sched.set_step_time_model(model)
    inter = [_req(f"i{k}", 16, 12, service_tier="interactive") for k in range(20)]
    batch = [_req(f"b{k}", 400, 24, service_tier="batch") for k in range(6)]
    arrivals = [(0.15 * k + 0.05, r) for k, r in enumerate(inter)]
    arrivals += [(0.4 * k, r) for k, r in enumerate(batch)]
    sim = Sim(sched, clock, step_time=model)
    sim.run(arrivals)
    for _, req in arrivals:
        check_against_reference(sched, _Trace(sim.outputs), req)
    return sim, inter, batch


def _misses(sim: Sim, inter: list[Request]) -> list[str]:
    missed = []
    for r in inter:
        times = sim.token_times[r.request_id]
        ttft = times[0] - r.arrival_time
        worst_gap = max(b - a for a, b in zip(times, times[1:]))
        if ttft > 1.0 + 1e-9 or worst_gap > 0.080 + 1e-9:
            missed.append(r.request_id)
    return missed


def test_slo_batch_never_makes_interactive_miss_with_an_exact_step_model() -> None:
    sim, inter, batch = _mixed("slo")
    assert _misses(sim, inter) == []
    assert all(sim.outputs[r.request_id][-1].finished for r in batch)
    stats = sim.sched.make_stats()
    assert stats.slo_total.get("interactive/", 0) == len(inter)
    assert stats.slo_met.get("interactive/", 0) == len(inter)
    # The same workload under fcfs: full-budget prefill steps break the TPOT bound.
    fcfs, inter_fcfs, _ = _mixed("fcfs")
    assert len(_misses(fcfs, inter_fcfs)) >= len(inter) // 2
    assert fcfs.sched.make_stats().slo_met.get("interactive/", 0) < len(inter)


def test_slo_defers_batch_when_kv_is_needed_by_interactive() -> None:
    """Little KV: batch requests are deferred while running interactive requests need
    the blocks (counted as a decision), and no interactive request is preempted."""
    sim, inter, _ = _mixed("slo", num_blocks=60)
    stats = sim.sched.make_stats()
    assert stats.sched_decisions.get("deferred/kv_reserved_for_interactive", 0) > 0
    assert all(sim.outputs[r.request_id][-1].num_preemptions == 0 for r in inter)
    assert stats.sched_decisions.get("admitted/edf", 0) == len(inter) + 6


def test_slo_rejects_batch_beyond_max_wait() -> None:
    clock = SimClock()
    sched = make_sched(
        num_blocks=400, block_size=16, max_model_len=512, max_num_batched_tokens=256,
        policy="slo", clock=clock, slo_max_batch_wait_s=1.0,
    )  # fmt: skip
    sched.set_step_time_model(StepTimeModel(base_s=0.010, per_token_s=0.001))
    for k in range(2):  # with the third, 1200 tokens ahead: ~1.25 s of full steps
        sched.add_request(_req(f"b{k}", 400, 8, service_tier="batch"))
    with pytest.raises(RequestRejected, match="slo_max_batch_wait_s") as e:
        sched.add_request(_req("late", 400, 8, service_tier="batch"))
    assert e.value.retry_after_s >= 1.0
    sched.add_request(_req("chat", 16, 8))  # interactive requests are not refused
    assert sched.make_stats().sched_decisions == {"rejected/estimated_wait": 1}
    assert "late" not in sched.requests


def test_service_tier_names() -> None:
    assert normalize_service_tier(None) == "interactive"
    assert normalize_service_tier("flex") == "batch"
    with pytest.raises(ValueError, match="service_tier"):
        normalize_service_tier("gold")
    sched = make_sched()
    with pytest.raises(ValueError, match="service_tier"):
        sched.add_request(_req("x", 4, 2, service_tier="gold"))
    with pytest.raises(ValueError, match="ttft_slo_ms"):
        sched.add_request(_req("y", 4, 2, ttft_slo_ms=-1.0))
    assert not sched.requests


def test_tenant_default_service_tiers() -> None:
    from kvasir.config import SchedulerConfig
    from kvasir.engine.arg_utils import _parse_tenant_tiers

    tiers = _parse_tenant_tiers("jobs=batch, web=interactive")
    assert tiers == (("jobs", "batch"), ("web", "interactive"))
    sched = make_sched(tenant_service_tiers=tiers)
    jobs, web, own = (
        _req("j", 4, 2, tenant="jobs"),
        _req("w", 4, 2, tenant="web"),
        _req("o", 4, 2, tenant="jobs", service_tier="interactive"),
    )
    for r in (jobs, web, own):
        sched.add_request(r)
    assert (jobs.service_tier, jobs.ttft_slo_ms, jobs.tpot_slo_ms) == ("batch", None, None)
    assert (web.service_tier, web.ttft_slo_ms, web.tpot_slo_ms) == ("interactive", 1500, 80)
    assert own.service_tier == "interactive"  # the request's own field wins
    with pytest.raises(ValueError, match="tenant_service_tiers"):
        SchedulerConfig(tenant_service_tiers=(("jobs", "gold"),))
    with pytest.raises(ValueError, match="tenant_service_tiers"):
        _parse_tenant_tiers("jobs")


# ---------------------------------------------------------------- target TPOT


def _chat_beside_long_prompt(target_tpot_ms: float | None) -> tuple[Sim, list[tuple]]:
    model = StepTimeModel(base_s=0.010, per_token_s=0.001)
    clock = SimClock()
    sched = make_sched(
        num_blocks=400, block_size=16, max_model_len=512, max_num_batched_tokens=256,
        policy="fcfs", clock=clock, target_tpot_ms=target_tpot_ms,
    )  # fmt: skip
    sched.set_step_time_model(model)
    sim = Sim(sched, clock, step_time=model)
    steps: list[tuple] = []  # (budget, tokens, any decode, long prefilling, long's tokens)
    orig = sched.schedule

    def schedule():  # type: ignore[no-untyped-def]
        decoding = any(r.num_computed_tokens >= r.num_prompt_tokens for r in sched.running)
        long = sched.requests.get("long")
        prefilling = long is not None and long.num_computed_tokens < long.num_prompt_tokens
        so = orig()
        n_long = so.num_scheduled_tokens.get("long", 0)
        steps.append(
            (sched.make_stats().token_budget, so.total_num_scheduled_tokens, decoding,
             prefilling, n_long)
        )  # fmt: skip
        return so

    sched.schedule = schedule  # type: ignore[method-assign]
    sim.run([(0.0, _req("chat", 16, 40)), (0.02, _req("long", 480, 4))])
    return sim, steps


def _worst_gap(sim: Sim, rid: str) -> float:
    times = sim.token_times[rid]
    return max(b - a for a, b in zip(times, times[1:]))


def test_target_tpot_budget_keeps_decode_steps_under_target() -> None:
    """--target-tpot-ms: steps with decodes carry what fits in the target (the budget
    metric says how much), steps without decodes the whole budget, and a long prompt
    still progresses in every step of its prefill."""
    sim, steps = _chat_beside_long_prompt(50.0)
    fit = StepTimeModel(base_s=0.010, per_token_s=0.001).max_tokens_within(0.050)
    assert fit == 40
    assert any(d for _, _, d, _, _ in steps)
    for budget, total, decoding, prefilling, n_long in steps:
        assert budget == (fit if decoding else 256) and total <= budget
        assert n_long > 0 or not prefilling
    assert _worst_gap(sim, "chat") <= 0.050 + 1e-9
    # Without the target the long prompt's 256-token chunks stall the chat's decodes.
    sim, steps = _chat_beside_long_prompt(None)
    assert all(budget == 256 for budget, *_ in steps)
    assert _worst_gap(sim, "chat") > 0.2


# ---------------------------------------------------------------- sjf, lpm


def test_length_predictor_learns_per_group_and_never_exceeds_max_tokens() -> None:
    p = OutputLengthPredictor()
    r = _req("x", 10, 64, tenant="t")
    assert p.predict(r) == 64  # no history: max_tokens
    for _ in range(30):
        p.observe(r, 5)
    assert p.predict(r) == 5
    assert p.predict(_req("y", 10, 64, tenant="other")) == 5  # the (prompt, max) group
    assert p.predict(_req("z", 10, 3, tenant="t")) == 3  # capped by its max_tokens


def test_sjf_admits_shortest_predicted_first_and_reports_error() -> None:
    clock = SimClock()
    sched = make_sched(max_num_seqs=1, policy="sjf", clock=clock, policy_age_bound_s=1000.0)
    sim = Sim(sched, clock)
    arrivals = [(0.0, _req(f"long{k}", 8, 20)) for k in range(3)]
    arrivals += [(0.0, _req(f"short{k}", 8, 2)) for k in range(3)]
    sim.run(arrivals)
    order = sorted(sim.admitted_at, key=lambda rid: (sim.admitted_at[rid], rid))
    # All arrived together: the short ones go first, although they arrived last.
    assert order[:3] == ["short0", "short1", "short2"], order
    stats = sched.make_stats()
    assert stats.num_length_predictions == 6
    assert stats.actual_output_tokens == 3 * 20 + 3 * 2
    assert stats.prediction_abs_error == abs(stats.predicted_output_tokens - 66)


def test_sjf_aging_bound() -> None:
    """A long job overtaken by short ones goes first once it has waited the bound."""
    clock = SimClock()
    sched = make_sched(max_num_seqs=1, policy="sjf", clock=clock, policy_age_bound_s=5.0,
                       sjf_aging_tokens_per_s=0.0)  # fmt: skip
    sim = Sim(sched, clock)
    arrivals = [(0.0, _req("first", 8, 4)), (0.0, _req("long", 8, 20))]
    arrivals += [(float(k), _req(f"s{k}", 8, 2)) for k in range(1, 30)]
    sim.run(arrivals)
    assert sim.admitted_at["long"] <= 5.0 + 3.0  # the bound plus the request ahead


def test_lpm_admits_the_cached_prefix_first() -> None:
    clock = SimClock()
    sched = make_sched(max_num_seqs=1, policy="lpm", clock=clock, num_blocks=64,
                       max_model_len=64, policy_age_bound_s=1000.0)  # fmt: skip
    shared = [5] * 24
    sim = Sim(sched, clock)
    warm = Request("warm", shared + [1], SamplingParams(max_tokens=2, ignore_eos=True))
    cold = Request("cold", [9] * 24 + [1], SamplingParams(max_tokens=2, ignore_eos=True))
    hit = Request("hit", shared + [2], SamplingParams(max_tokens=2, ignore_eos=True))
    sim.run([(0.0, warm), (0.5, cold), (0.5, hit)])
    assert sim.admitted_at["hit"] < sim.admitted_at["cold"]
    fcfs_clock = SimClock()
    fcfs = make_sched(max_num_seqs=1, clock=fcfs_clock, num_blocks=64, max_model_len=64)
    sim2 = Sim(fcfs, fcfs_clock)
    sim2.run([(0.0, _copy(warm)), (0.5, _copy(cold)), (0.5, _copy(hit))])
    assert sim2.admitted_at["cold"] < sim2.admitted_at["hit"]


def _copy(r: Request) -> Request:
    return Request(r.request_id, r.prompt_token_ids, r.sampling_params.clone())


# ---------------------------------------------------------------- the offline LLM


def test_llm_tenants_and_tiers_reach_the_scheduler() -> None:
    """``LLM.generate(tenant=, service_tier=)``: greedy outputs under slo equal fcfs's
    (a policy changes order, never tokens); slo measured its step-time model at
    start-up and counted SLO attainment per class and tenant."""
    from kvasir import LLM

    prompts = [[(7 * i + k) % 200 + 1 for i in range(5 + 3 * k)] for k in range(6)]
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    tenants = ["a", "b"] * 3
    tiers = ["interactive", "batch", "batch"] * 2
    texts = {}
    for policy in ("fcfs", "slo"):
        llm = LLM(model="tiny-llama", load_format="dummy", max_model_len=64, log=False,
                  scheduling_policy=policy, max_num_seqs=2)  # fmt: skip
        outs = llm.generate(prompts, sp, use_tqdm=False, tenant=tenants, service_tier=tiers)
        texts[policy] = [o.outputs[0].token_ids for o in outs]
        sched = llm.llm_engine.engine_core.scheduler
        if policy == "slo":
            assert sched.step_time_model is not None
            assert sched.step_time_model.per_token_s > 0
            stats = sched.make_stats()
            assert stats.slo_total == {"interactive/a": 1, "interactive/b": 1}  # batch: no SLO
            assert (
                stats.sched_decisions.get("admitted/edf", 0)
                + stats.sched_decisions.get("admitted/aged", 0)
                == 6
            )
    assert texts["fcfs"] == texts["slo"]
    with pytest.raises(ValueError, match="service_tier"):
        llm.generate(prompts[0], sp, use_tqdm=False, service_tier="gold")
    with pytest.raises(ValueError, match="tenant"):
        llm.generate(prompts, sp, use_tqdm=False, tenant=["a"])


def _hit_rate(policy: str) -> float:
    """Four 16-token system prompts, requests round-robin over them, a KV cache with
    room for the two running requests and little more: fcfs evicts each prefix before
    its next request comes; lpm admits the requests of the prefixes still cached."""
    clock = SimClock()
    sched = make_sched(num_blocks=15, block_size=4, max_model_len=32, max_num_seqs=2,
                       policy=policy, clock=clock, policy_age_bound_s=1e6)  # fmt: skip
    systems = [[10 + 4 * g + (i % 3) for i in range(16)] for g in range(4)]
    arrivals = [
        (0.0, Request(f"r{k}", systems[k % 4] + [1 + k % 30, 2, 3, 4],
                      SamplingParams(max_tokens=4, ignore_eos=True), eos_token_ids=EOS))
        for k in range(32)
    ]  # fmt: skip
    sim = Sim(sched, clock)
    sim.run(arrivals)
    for _, req in arrivals:
        check_against_reference(sched, _Trace(sim.outputs), req)
    stats = sched.make_stats()
    return stats.prefix_cache_hits / stats.prefix_cache_queries


def test_lpm_raises_the_prefix_hit_rate_under_cache_pressure() -> None:
    fcfs, lpm = _hit_rate("fcfs"), _hit_rate("lpm")
    assert fcfs == 0.0 and lpm == pytest.approx(0.7), (fcfs, lpm)  # 28 of 32 hit 16 of 20


def _small_tenant_ttft_p99(policy: str, burst: int) -> float:
    """The small tenant sends a 12-token request every 4 steps; the big one a burst of
    ``burst`` at the start and then one per step (10x the small one's volume or more)."""
    clock = SimClock()
    sched = make_sched(num_blocks=200, block_size=4, max_model_len=64, max_num_batched_tokens=64,
                       max_num_seqs=16, policy=policy, clock=clock, policy_age_bound_s=1e6)  # fmt: skip
    small = [(4.0 * k, _req(f"s{k}", 12, 6, tenant="small")) for k in range(10)]
    big = [(0.0, _req(f"b{k}", 12, 6, tenant="big")) for k in range(burst)]
    big += [(float(k), _req(f"c{k}", 12, 6, tenant="big")) for k in range(40 if burst else 0)]
    sim = Sim(sched, clock)
    sim.run(small + big)
    return max(sim.token_times[r.request_id][0] - t for t, r in small)


def test_fair_keeps_the_small_tenant_latency_bounded_whatever_the_flood() -> None:
    """Under fair the small tenant's worst TTFT beside a flood is a few steps (the wait
    for a seat: fair does not preempt), the same for a 60- and a 240-request burst;
    under fcfs it grows with the burst."""
    alone = _small_tenant_ttft_p99("fcfs", burst=0)
    assert alone == 1.0  # admitted and prefilled in the step after it arrives
    fair = [_small_tenant_ttft_p99("fair", burst) for burst in (60, 240)]
    fcfs = [_small_tenant_ttft_p99("fcfs", burst) for burst in (60, 240)]
    assert fair[0] == fair[1] <= 3 * alone, fair
    assert fcfs[1] > 2 * fcfs[0] > 10 * alone, fcfs
