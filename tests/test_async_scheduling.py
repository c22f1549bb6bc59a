"""Async scheduling: step N + 1 is scheduled and launched before step N's tokens are
back. Outputs must be exactly those of the synchronous engine.

Two levels. The scheduler against the fake runner of ``test_scheduler`` (which checks
every KV read and samples a known function of the request's own tokens), driven the
way the async engine drives it: ``update_from_output`` of step N after ``schedule()``
of step N + 1; outputs must equal the request generated alone (``reference``). Then the
whole engine on the CPU with the flag forced on, against the same engine with it off:
greedy and seeded sampling, stops, n > 1, preemption, aborts, reused request ids.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from test_scheduler import (
    EOS,
    FakeRunner,
    Trace,
    check_cached_blocks,
    next_token,
    reference,
    tokens_of,
    workloads,
)

from kvasir.config import CacheConfig, SchedulerConfig
from kvasir.core.outputs import ModelRunnerOutput, SchedulerOutput
from kvasir.core.request import Request, RequestStatus
from kvasir.core.scheduler import Scheduler
from kvasir.sampling_params import SamplingParams

# ---------------------------------------------------------------- scheduler level


def make_async_sched(
    num_blocks: int = 64,
    block_size: int = 4,
    max_model_len: int = 64,
    max_num_batched_tokens: int = 64,
    max_num_seqs: int = 8,
    policy: str = "fcfs",
    caching: bool = True,
    chunked: bool = True,
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(
            max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            policy=policy,
            enable_chunked_prefill=chunked,
        ),
        CacheConfig(block_size=block_size, enable_prefix_caching=caching),
        num_blocks,
        async_scheduling=True,
    )


def check_invariants_async(sched: Scheduler) -> None:
    kv = sched.kv_cache_manager
    assert {r.request_id for r in sched.running} == set(kv.req_to_blocks)
    refs: dict[int, int] = {}
    for blocks in kv.req_to_blocks.values():
        for b in blocks:
            refs[b.block_id] = refs.get(b.block_id, 0) + 1
    for block in kv.block_pool.blocks[1:]:
        assert block.ref_cnt == refs.get(block.block_id, 0)
    assert len(refs) + kv.num_free_blocks == kv.num_usable_blocks
    placeholders = sched._num_output_placeholders
    assert set(placeholders) <= set(sched.requests)
    for r in sched.running:
        # At most the in-flight step's token is missing here.
        assert placeholders.get(r.request_id, 0) <= 1
        assert r.num_computed_tokens <= r.num_tokens + placeholders.get(r.request_id, 0)
    for r in sched.waiting:
        assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        assert r.num_computed_tokens == 0
    assert len(sched.running) + len(sched.waiting) == len(sched.requests)


def drive_async(
    sched: Scheduler,
    arrivals: dict[int, list[Request]] | None = None,
    aborts: dict[int, list[str]] | None = None,
    mid_step_aborts: dict[int, list[str]] | None = None,
    max_steps: int = 3000,
    dedup_prompt_logprobs: bool = False,
) -> Trace:
    """Like ``test_scheduler.drive`` but one step late: the runner executes step N + 1
    (ahead of the scheduler: it knows the tokens it sampled) before the scheduler sees
    step N's output, as ``EngineCore`` does with async scheduling."""
    arrivals, aborts, mid_step_aborts = arrivals or {}, aborts or {}, mid_step_aborts or {}
    runner = FakeRunner(sched.block_size, dedup_prompt_logprobs)
    trace = Trace()
    salts = {r.request_id: r.cache_salt for reqs in arrivals.values() for r in reqs}
    last_event = max([*arrivals, *aborts, *mid_step_aborts, 0])
    in_flight: tuple[SchedulerOutput, ModelRunnerOutput] | None = None
    step = 0
    while step <= last_event or sched.has_unfinished_requests() or in_flight:
        for req in arrivals.get(step, []):
            sched.add_request(req)
        sched.abort_requests(aborts.get(step, []))
        so = sched.schedule()
        for nr in so.scheduled_new_reqs:
            trace.first_new_step.setdefault(nr.req_id, step)
        mro = runner.execute(so)
        check_cached_blocks(sched, runner, salts)
        sched.abort_requests(mid_step_aborts.get(step, []))
        if in_flight is not None:
            trace.record(sched.update_from_output(*in_flight))
        in_flight = (so, mro) if so.num_scheduled_tokens else None
        if in_flight is None:
            trace.record(sched.update_from_output(so, mro))
        trace.record(sched.take_aborted_outputs())
        for rid, req in sched.requests.items():  # the runner is ahead, never different
            if rid in runner.reqs:
                assert runner.reqs[rid].tokens[: req.num_tokens] == req.all_token_ids
        check_invariants_async(sched)
        step += 1
        assert step < max_steps, "no progress"
    trace.steps = step
    kv = sched.kv_cache_manager
    assert kv.num_free_blocks == kv.num_usable_blocks and not kv.req_to_blocks
    assert not sched._num_output_placeholders
    return trace


def test_decode_scheduled_before_previous_token_is_back() -> None:
    sched = make_async_sched()
    runner = FakeRunner(sched.block_size)
    prompt = [5, 6, 7, 8, 9]
    sched.add_request(Request("a", prompt, SamplingParams(max_tokens=3, ignore_eos=True)))
    so1 = sched.schedule()
    mro1 = runner.execute(so1)
    assert so1.num_scheduled_tokens == {"a": 5}
    so2 = sched.schedule()  # step 1's token is still "on the device"
    assert so2.num_scheduled_tokens == {"a": 1}
    assert so2.scheduled_cached_reqs[0].num_computed_tokens == 5
    mro2 = runner.execute(so2)
    outs1 = sched.update_from_output(so1, mro1)
    first = next_token(prompt)
    assert [o.new_token_ids for o in outs1] == [[first]]
    # max_tokens=3: step 3 is the last one worth running, step 4 is never scheduled.
    so3 = sched.schedule()
    assert so3.num_scheduled_tokens == {"a": 1}
    mro3 = runner.execute(so3)
    sched.update_from_output(so2, mro2)
    so4 = sched.schedule()
    assert so4.num_scheduled_tokens == {}
    outs3 = sched.update_from_output(so3, mro3)
    assert outs3[0].finish_reason == "length"
    assert not sched.has_unfinished_requests()
    assert sched.kv_cache_manager.usage == 0.0


def test_stop_found_one_step_late_drops_the_extra_token() -> None:
    prompt = [3, 1, 4, 1, 5]
    first = next_token(prompt)
    sp = SamplingParams(max_tokens=10, stop_token_ids=[first])
    sched = make_async_sched()
    trace = drive_async(sched, {0: [Request("a", prompt, sp, eos_token_ids=EOS)]})
    out = trace.outputs["a"]
    assert tokens_of(trace, "a") == [first]
    assert out[-1].finish_reason == "stop" and out[-1].stop_reason == first


def test_reused_request_id_gets_none_of_the_old_requests_tokens() -> None:
    """Request "a" finishes while its extra step is in flight; a new "a" (another prompt) is
    added at once and must not receive the old one's dropped token."""
    old_prompt, new_prompt = [1, 2, 3, 4], [9, 9, 9]
    first = next_token(old_prompt)
    sched = make_async_sched()
    runner = FakeRunner(sched.block_size)
    sched.add_request(
        Request("a", old_prompt, SamplingParams(max_tokens=5, stop_token_ids=[first]))
    )
    so1 = sched.schedule()
    mro1 = runner.execute(so1)
    so2 = sched.schedule()
    mro2 = runner.execute(so2)  # "a" decodes past its stop token
    outs = sched.update_from_output(so1, mro1)
    assert outs[0].finish_reason == "stop"
    new = Request("a", new_prompt, SamplingParams(max_tokens=2, ignore_eos=True))
    sched.add_request(new)
    so3 = sched.schedule()
    assert so3.finished_req_ids == {"a"} and [n.req_id for n in so3.scheduled_new_reqs] == ["a"]
    mro3 = runner.execute(so3)
    assert sched.update_from_output(so2, mro2) == []  # the old "a"'s extra token
    outs = sched.update_from_output(so3, mro3)
    assert [o.new_token_ids for o in outs] == [[next_token(new_prompt)]]
    assert new.output_token_ids == [next_token(new_prompt)]


def test_preempted_while_in_flight_gets_its_token_and_resumes() -> None:
    # 4 usable blocks of 2 tokens: two requests of 3 + 4 tokens collide quickly.
    sched = make_async_sched(num_blocks=5, block_size=2, max_model_len=8)
    reqs = [
        Request("a", [1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True)),
        Request("b", [4, 5, 6], SamplingParams(max_tokens=5, ignore_eos=True)),
    ]
    trace = drive_async(sched, {0: reqs})
    assert sched.num_preemptions > 0
    for r in reqs:
        out, reason, _ = reference(r.prompt_token_ids, r.sampling_params, 8, 8)
        assert tokens_of(trace, r.request_id) == out
        assert trace.outputs[r.request_id][-1].finish_reason == reason


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_random_workloads_async(w: dict) -> None:
    cfg = w["cfg"]
    sched = make_async_sched(**cfg)
    usable = cfg["num_blocks"] - 1
    arrivals: dict[int, list[Request]] = {}
    aborts: dict[int, list[str]] = {}
    mid_aborts: dict[int, list[str]] = {}
    admitted: list[Request] = []
    aborted: set[str] = set()
    for spec in sorted(w["specs"], key=lambda s: s["arrival"]):
        prompt = spec["prompt"]
        fits = (
            len(prompt) + 1 <= cfg["max_model_len"]
            and -(-(len(prompt) + 1) // cfg["block_size"]) <= usable
        )
        if not fits:
            continue
        family = [
            Request(
                spec["rid"] if k == 0 else f"{spec['rid']}.{k}",
                prompt,
                spec["sp"].clone(),
                eos_token_ids=EOS,
                arrival_time=float(spec["arrival"]),
                priority=spec["priority"],
                cache_salt=spec["salt"],
                fork_of=None if k == 0 else spec["rid"],
            )
            for k in range(spec["n"])
        ]
        arrivals.setdefault(spec["arrival"], []).extend(family)
        admitted.extend(family)
        if spec["abort"] is not None:
            step = spec["arrival"] + spec["abort"]
            (mid_aborts if spec["abort_mid"] else aborts).setdefault(step, []).append(spec["rid"])
            aborted.add(spec["rid"])

    trace = drive_async(sched, arrivals, aborts, mid_aborts, dedup_prompt_logprobs=w["dedup"])

    kv_tokens = usable * cfg["block_size"]
    for req in admitted:
        rid = req.request_id
        outs = trace.outputs[rid]
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        out, reason, stop_reason = reference(
            req.prompt_token_ids, req.sampling_params, cfg["max_model_len"], kv_tokens
        )
        got = tokens_of(trace, rid)
        if outs[-1].finish_reason == "abort":
            assert rid in aborted and got == out[: len(got)]
        else:
            assert (got, outs[-1].finish_reason, outs[-1].stop_reason) == (out, reason, stop_reason)
        if req.sampling_params.prompt_logprobs is not None and got:
            p = req.prompt_token_ids
            assert (outs[0].new_prompt_logprobs or []) == [
                [(p[i], -i / 10, 1)] for i in range(1, len(p))
            ]


# ---------------------------------------------------------------- engine level (CPU)


def _mixed_workload(
    seed: int, num: int, vocab: int
) -> tuple[list[list[int]], list[SamplingParams]]:
    """Greedy and seeded random rows, top-k/top-p/min-p, min_tokens, stop tokens,
    penalties and logprobs, with prompt and output lengths all over the place."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(1, 90))] for _ in range(num)]
    params = []
    for _ in range(num):
        t = rng.choice([0.0, 0.0, 0.8, 1.0])
        params.append(
            SamplingParams(
                temperature=t,
                seed=rng.randrange(100) if t else None,
                max_tokens=rng.randint(3, 30),
                top_k=rng.choice([-1, 5]),
                top_p=rng.choice([1.0, 0.9]),
                min_p=rng.choice([0.0, 0.0, 0.05]),
                min_tokens=rng.choice([0, 3]),
                stop_token_ids=rng.choice([None, [7, 9, 11, 13, 15, 17]]),
                presence_penalty=rng.choice([0.0, 0.0, 0.0, 0.5]),
                logprobs=rng.choice([None, None, 2]),
            )
        )
    return prompts, params


def _summary(outs: list) -> list[tuple]:
    return [(c.token_ids, c.finish_reason, c.stop_reason, c.text) for o in outs for c in o.outputs]


def _assert_logprobs_close(a: list, b: list) -> None:
    # Row order in the flat batch differs between the two modes' steps, which may move
    # float32 matmul results by an ulp; token choices do not change.
    for oa, ob in zip(a, b, strict=True):
        for ca, cb in zip(oa.outputs, ob.outputs, strict=True):
            for pa, pb in zip(ca.logprobs or [], cb.logprobs or [], strict=True):
                assert pa.keys() == pb.keys()
                for k in pa:
                    assert abs(pa[k].logprob - pb[k].logprob) < 1e-4
                    assert pa[k].rank == pb[k].rank


def _tiny(model: str, async_scheduling: bool, **kw):
    from kvasir import LLM

    return LLM(
        model=model,
        load_format="dummy",
        max_model_len=256,
        async_scheduling=async_scheduling,
        log=False,
        **kw,
    )


def test_async_scheduling_is_off_by_default_on_the_cpu() -> None:
    from kvasir import LLM

    llm = LLM(model="tiny-llama", load_format="dummy", max_model_len=64, log=False)
    assert llm.llm_engine.engine_core.async_scheduling is False
    assert _tiny("tiny-llama", True).llm_engine.engine_core.async_scheduling is True


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen3"])
def test_tiny_models_async_matches_sync(model: str) -> None:
    prompts, params = _mixed_workload(0, 24, 1024)
    outs = {}
    for flag in (False, True):
        llm = _tiny(model, flag)
        outs[flag] = llm.generate(prompts, params, use_tqdm=False)
        assert llm.llm_engine.engine_core.scheduler.kv_cache_manager.usage == 0.0
    assert _summary(outs[True]) == _summary(outs[False])
    _assert_logprobs_close(outs[True], outs[False])
    # The workload does exercise early stops (a stop token before max_tokens).
    assert any(c.finish_reason == "stop" for o in outs[True] for c in o.outputs)


def test_preemption_with_a_tiny_kv_cache_async_matches_sync() -> None:
    prompts, params = _mixed_workload(1, 12, 1024)
    outs, preemptions = {}, {}
    for flag in (False, True):
        llm = _tiny("tiny-llama", flag, num_gpu_blocks_override=12)
        outs[flag] = llm.generate(prompts, params, use_tqdm=False)
        core = llm.llm_engine.engine_core
        preemptions[flag] = core.scheduler.num_preemptions
        assert core.scheduler.kv_cache_manager.usage == 0.0  # no leaked blocks
    assert preemptions[True] > 0 and preemptions[False] > 0
    assert _summary(outs[True]) == _summary(outs[False])


def test_n_greater_than_one_async_matches_sync() -> None:
    prompt = list(range(100, 140))
    params = [
        SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=9, ignore_eos=True),
        SamplingParams(n=2, temperature=0.0, max_tokens=6),
    ]
    outs = {}
    for flag in (False, True):
        llm = _tiny("tiny-llama", flag)
        outs[flag] = llm.generate([prompt, prompt], params, use_tqdm=False)
    assert _summary(outs[True]) == _summary(outs[False])
    assert [len(o.outputs) for o in outs[True]] == [3, 2]


def _drive_with_aborts(flag: bool) -> tuple[dict, float]:
    """Steps an engine by hand: aborts two running requests mid-way and, once "r3"
    finished, adds a new request under the same id while its extra step may still be in
    flight."""
    llm = _tiny("tiny-llama", flag)
    engine = llm.llm_engine
    prompts, params = _mixed_workload(2, 8, 1024)
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        sp = sp.clone()
        sp.max_tokens = 12 if i != 3 else 2
        sp.min_tokens = 0
        engine.add_request(f"r{i}", p, sp)
    final: dict = {}
    step = 0
    reused = False
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
                if out.request_id == "r3" and not reused:
                    reused = True
                    sp2 = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
                    engine.add_request("r3", [11, 12, 13, 14], sp2)
                    final.pop("r3")
        step += 1
        if step == 4:
            engine.abort_request(["r0", "r5"])
    assert reused
    usage = engine.engine_core.scheduler.kv_cache_manager.usage
    return final, usage


def test_aborts_and_reused_ids_async() -> None:
    ref, _ = _drive_with_aborts(False)
    got, usage = _drive_with_aborts(True)
    assert usage == 0.0
    assert set(got) == set(ref)
    for rid in ref:
        a, b = got[rid].outputs[0], ref[rid].outputs[0]
        if rid in ("r0", "r5"):
            # Aborted at the same step, but async outputs lag one step: a prefix.
            assert a.finish_reason == b.finish_reason == "abort"
        else:
            assert (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason), rid
    assert got["r3"].prompt_token_ids == [11, 12, 13, 14]
    assert len(got["r3"].outputs[0].token_ids) == 5


def _core_outputs(async_scheduling: bool) -> dict[str, tuple[list[int], str | None]]:
    """Drive an EngineCore directly with EOS ids that are likely to come up."""
    from kvasir.config import EngineConfig, ModelConfig
    from kvasir.engine.core import EngineCore
    from kvasir.engine.messages import EngineCoreRequest

    cfg = EngineConfig(
        model_config=ModelConfig(model="tiny-llama", load_format="dummy", max_model_len=128),
        async_scheduling=async_scheduling,
    )
    core = EngineCore(cfg, log=False)
    rng = random.Random(5)
    eos = list(range(3, 1024, 4))  # a quarter of the vocabulary
    for i in range(12):
        sp = SamplingParams(
            temperature=rng.choice([0.0, 1.0]), seed=i, max_tokens=20, min_tokens=i % 3
        )
        prompt = [rng.randrange(3, 1024) for _ in range(rng.randint(1, 40))]
        core.add_request(EngineCoreRequest(f"e{i}", prompt, sp, eos_token_ids=eos))
    got: dict[str, tuple[list[int], str | None]] = {}
    while core.has_unfinished_requests():
        for o in core.step()[0]:
            toks, _ = got.get(o.request_id, ([], None))
            got[o.request_id] = (toks + o.new_token_ids, o.finish_reason)
    assert core.scheduler.kv_cache_manager.usage == 0.0
    return got


def test_eos_found_a_step_late_matches_sync() -> None:
    ref, got = _core_outputs(False), _core_outputs(True)
    assert got == ref
    stopped = [toks for toks, reason in ref.values() if reason == "stop"]
    assert len(stopped) >= 3 and all(len(t) < 20 for t in stopped)


def test_default_model_greedy_and_stop_strings_async_matches_sync() -> None:
    from kvasir import LLM

    prompts = ["The capital of France is", "def fibonacci(n):", "The quick brown fox"]
    params = [
        SamplingParams(temperature=0.0, max_tokens=12),
        SamplingParams(temperature=0.0, max_tokens=12, stop=["\n"]),
        SamplingParams(temperature=0.0, max_tokens=1),
    ]
    outs = {}
    for flag in (False, True):
        llm = LLM(kv_cache_gb=0.05, max_model_len=256, async_scheduling=flag, log=False)
        outs[flag] = llm.generate(prompts, params, use_tqdm=False)
        # A stop string found by the output processor aborts the request in the core.
        assert llm.llm_engine.engine_core.scheduler.kv_cache_manager.usage == 0.0
    assert _summary(outs[True]) == _summary(outs[False])
    assert outs[True][1].outputs[0].finish_reason == "stop"  # the stop string
    assert len(outs[True][2].outputs[0].token_ids) == 1
