"""Scheduler tests against a fake model runner that checks the KV it reads.

The fake runner follows the documented contract: for each scheduled request with ``c``
computed and ``n`` scheduled tokens it writes a signature of ``all_token_ids[:p + 1]``
into the KV slot of every position ``p`` in ``[c, c + n)``, then checks that *every*
position ``< c + n`` of the request's block table holds the right signature (so a wrong
prefix-cache hit, fork or a write into a shared block fails), and samples
``next_token(tokens)`` iff ``c + n == len(tokens)``. The next token depends only on the
request's own tokens, so each request's output must equal ``reference()``: the same
request generated alone, with the stop rules re-implemented here.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvasir.config import CacheConfig, SchedulerConfig
from kvasir.core.hashing import hash_token_ids
from kvasir.core.kv_cache_spec import FullAttentionSpec, KVCacheConfig, MambaStateSpec
from kvasir.core.outputs import EngineCoreOutput, ModelRunnerOutput, SchedulerOutput
from kvasir.core.request import Request, RequestStatus
from kvasir.core.scheduler import Scheduler
from kvasir.core.step_time import StepTimeModel
from kvasir.sampling_params import SamplingParams

VOCAB = 40
EOS = (0,)


def next_token(tokens: list[int]) -> int:
    return (sum(t * (i % 7 + 1) for i, t in enumerate(tokens)) + 3 * len(tokens)) % VOCAB


def reference(
    prompt: list[int], sp: SamplingParams, max_model_len: int, kv_tokens: int
) -> tuple[list[int], str, int | None]:
    """(output tokens, finish reason, stop reason) of the request generated alone."""
    limit = min(max_model_len, kv_tokens) - len(prompt)
    max_tokens = limit if sp.max_tokens is None else min(sp.max_tokens, limit)
    tokens, out = list(prompt), []
    while True:
        tok = next_token(tokens)
        tokens.append(tok)
        out.append(tok)
        if len(out) >= sp.min_tokens:
            if not sp.ignore_eos and tok in EOS:
                return out, "stop", None
            if tok in (sp.stop_token_ids or []):
                return out, "stop", tok
        if len(out) >= max_tokens or len(tokens) >= max_model_len:
            return out, "length", None


def _sig(tokens: list[int], pos: int) -> int:
    return hash(tuple(tokens[: pos + 1]))


@dataclass
class _RunnerReq:
    tokens: list[int]
    num_prompt: int
    block_ids: list[int]
    num_computed: int
    sp: SamplingParams
    sigs: list[int] = field(default_factory=list)

    def sig(self, pos: int) -> int:
        while len(self.sigs) <= pos:
            self.sigs.append(hash((self.sigs[-1] if self.sigs else 0, self.tokens[len(self.sigs)])))
        return self.sigs[pos]


def _draft(tokens: list[int], k: int) -> list[int]:
    """A fake proposer's k drafts after ``tokens``: each right (the next token of the
    sequence so far, drafts included) unless a hash of the sequence says otherwise."""
    seq, out = list(tokens), []
    for _ in range(k):
        t = next_token(seq)
        if hash((len(seq), tuple(seq[-3:]))) % 3 == 0:
            t = (t + 1) % VOCAB  # a wrong guess
        out.append(t)
        seq.append(t)
    return out


class FakeRunner:
    """Keeps per-request state from scheduler diffs, like a real model runner.

    With ``spec_k`` it also speculates: a request's scheduled drafts are the last
    tokens of its step (their KV is written with the drafts' signatures), verified
    against ``next_token`` (the longest matching prefix plus one token, as greedy
    verification does), and each sampling request gets ``spec_k`` new drafts."""

    def __init__(
        self, block_size: int, dedup_prompt_logprobs: bool = False, spec_k: int = 0
    ) -> None:
        self.block_size = block_size
        self.spec_k = spec_k
        # Like kvasir's ModelRunner: remember across preemptions which prompt positions
        # already got logprobs and do not send them again.
        self.dedup_prompt_logprobs = dedup_prompt_logprobs
        self.prompt_logprobs_done: dict[str, int] = {}
        self.kv: dict[int, int] = {}  # slot -> signature of the prefix ending there
        self.reqs: dict[str, _RunnerReq] = {}
        # block id -> (request id, tokens up to the block's end) for blocks written full.
        self.block_content: dict[int, tuple[str, tuple[int, ...]]] = {}

    def _slot(self, r: _RunnerReq, pos: int) -> int:
        return r.block_ids[pos // self.block_size] * self.block_size + pos % self.block_size

    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        for rid in so.finished_req_ids | so.preempted_req_ids:
            self.reqs.pop(rid, None)
        for nr in so.scheduled_new_reqs:
            assert nr.req_id not in self.reqs
            self.reqs[nr.req_id] = _RunnerReq(
                tokens=nr.prompt_token_ids + nr.output_token_ids,
                num_prompt=len(nr.prompt_token_ids),
                block_ids=list(nr.block_ids),
                num_computed=nr.num_computed_tokens,
                sp=nr.sampling_params,
            )
        for cr in so.scheduled_cached_reqs:
            r = self.reqs[cr.req_id]
            assert r.num_computed == cr.num_computed_tokens  # the value BEFORE this step
            r.block_ids.extend(cr.new_block_ids)
        scheduled = {nr.req_id for nr in so.scheduled_new_reqs}
        scheduled |= {cr.req_id for cr in so.scheduled_cached_reqs}
        assert scheduled == set(so.num_scheduled_tokens)
        assert so.total_num_scheduled_tokens == sum(so.num_scheduled_tokens.values())
        assert not scheduled & so.preempted_req_ids
        # Write every scheduled token's KV first (the attention backend contract) ...
        written: set[int] = set()
        spec = so.scheduled_spec_decode_tokens
        assert not spec or self.spec_k, "drafts scheduled without speculation"
        sigs: dict[str, list[int]] = {}  # request -> signature of every position read
        for rid, n in so.num_scheduled_tokens.items():
            r = self.reqs[rid]
            drafts = spec.get(rid, [])
            seq = r.tokens + drafts
            if drafts:  # after every known token: the step's last len(drafts) tokens
                assert r.num_computed + n == len(seq)
            assert n >= 1 and r.num_computed + n <= len(seq)
            assert 0 not in r.block_ids and len(r.block_ids) * self.block_size >= r.num_computed + n
            sig = [r.sig(p) for p in range(min(r.num_computed + n, len(r.tokens)))]
            for p in range(len(r.tokens), r.num_computed + n):
                sig.append(hash((sig[-1] if sig else 0, seq[p])))
            sigs[rid] = sig
            for pos in range(r.num_computed, r.num_computed + n):
                slot = self._slot(r, pos)
                assert slot not in written, "two tokens of one step share a KV slot"
                written.add(slot)
                self.kv[slot] = sig[pos]
                block_id = slot // self.block_size
                if pos % self.block_size == self.block_size - 1:
                    self.block_content[block_id] = (rid, tuple(seq[: pos + 1]))
                elif pos % self.block_size == 0:
                    self.block_content.pop(block_id, None)
        # ... then read: the whole context must be exactly this request's prefix.
        req_ids, sampled = [], []
        logprobs: dict = {}
        prompt_logprobs: dict = {}
        spec_out: dict[str, list[int]] = {}
        for rid, n in so.num_scheduled_tokens.items():
            r = self.reqs[rid]
            c = r.num_computed
            for pos in range(c + n):
                assert self.kv.get(self._slot(r, pos)) == sigs[rid][pos], f"{rid}: bad KV at {pos}"
            if r.sp.prompt_logprobs is not None:
                start = c + 1
                if self.dedup_prompt_logprobs:
                    start = max(start, self.prompt_logprobs_done.get(rid, 0) + 1)
                positions = range(start, min(c + n + 1, r.num_prompt))
                if positions:
                    self.prompt_logprobs_done[rid] = positions[-1]
                    prompt_logprobs[rid] = [[(r.tokens[p], -p / 10, 1)] for p in positions]
            r.num_computed = c + n
            req_ids.append(rid)
            drafts = spec.get(rid, [])
            if c + n == len(r.tokens) + len(drafts):
                new: list[int] = []
                for d in drafts:  # accept while the draft is the model's own token
                    if d != next_token(r.tokens + new):
                        break
                    new.append(d)
                r.num_computed -= len(drafts) - len(new)  # the rejected drafts' KV is stale
                new.append(next_token(r.tokens + new))
                r.tokens.extend(new)
                sampled.append(new)
                if r.sp.logprobs is not None:
                    logprobs[rid] = [[(tok, -0.5, 1)] for tok in new]
                if self.spec_k:
                    spec_out[rid] = _draft(r.tokens, self.spec_k)
            else:
                sampled.append([])
        return ModelRunnerOutput(req_ids, sampled, logprobs, prompt_logprobs, spec_out)


def check_cached_blocks(sched: Scheduler, runner: FakeRunner, salts: dict) -> None:
    """After a step ran: every block findable in the prefix cache holds exactly the KV
    its hash names (a stale hash would serve wrong KV to a later request)."""
    for block in sched.kv_cache_manager.block_pool.blocks:
        if block.block_hash is None:
            continue
        assert block.block_id in runner.block_content, f"{block} cached but never filled"
        rid, tokens = runner.block_content[block.block_id]
        expected = hash_token_ids(list(tokens), sched.block_size, salts[rid])[-1]
        assert block.block_hash == expected, f"{block} hash does not match its KV"


def check_invariants(sched: Scheduler) -> None:
    kv = sched.kv_cache_manager
    pool = kv.block_pool
    assert len(sched.running) <= sched.max_num_seqs
    assert {r.request_id for r in sched.running} == set(kv.req_to_blocks)
    refs: dict[int, int] = {}
    for blocks in kv.req_to_blocks.values():
        for b in blocks:
            refs[b.block_id] = refs.get(b.block_id, 0) + 1
    for block in pool.blocks[1:]:
        assert block.ref_cnt == refs.get(block.block_id, 0)
        if block.block_hash is not None:
            assert pool.cached_block_hash_to_block[block.block_hash] is block
    assert len(refs) + kv.num_free_blocks == kv.num_usable_blocks
    for r in sched.running:
        assert r.status == RequestStatus.RUNNING and r.num_computed_tokens <= r.num_tokens
    for r in sched.waiting:
        assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        assert r.num_computed_tokens == 0
    assert len(sched.running) + len(sched.waiting) == len(sched.requests)
    slots = kv.state_slots
    if slots is not None:  # one state slot per running request, none leaked or shared
        assert set(slots.slot_of) == {r.request_id for r in sched.running}
        held = list(slots.slot_of.values())
        assert len(set(held)) == len(held) and not set(held) & set(slots._free)
        assert len(held) + slots.num_free == slots.num_slots
        assert all(1 <= s <= slots.num_slots for s in held)


@dataclass
class SimClock:
    """A simulated clock for the scheduler (``Scheduler(clock=...)``)."""

    t: float = 0.0

    def __call__(self) -> float:
        return self.t


@dataclass
class Trace:
    outputs: dict[str, list[EngineCoreOutput]] = field(default_factory=dict)
    first_new_step: dict[str, int] = field(default_factory=dict)
    steps: int = 0

    def record(self, outs: list[EngineCoreOutput]) -> None:
        for o in outs:
            self.outputs.setdefault(o.request_id, []).append(o)


def drive(
    sched: Scheduler,
    arrivals: dict[int, list[Request]] | None = None,
    aborts: dict[int, list[str]] | None = None,
    mid_step_aborts: dict[int, list[str]] | None = None,
    max_steps: int = 3000,
    dedup_prompt_logprobs: bool = False,
    spec_k: int = 0,
    clock: SimClock | None = None,
) -> Trace:
    """Run until idle. ``aborts`` happen before ``schedule()``, ``mid_step_aborts``
    between ``schedule()`` and ``update_from_output()``. ``spec_k``: the fake runner
    speculates that many drafts per request. ``clock``: the scheduler's, set to the
    step number before each ``schedule()``."""
    arrivals, aborts, mid_step_aborts = arrivals or {}, aborts or {}, mid_step_aborts or {}
    runner = FakeRunner(sched.block_size, dedup_prompt_logprobs, spec_k)
    trace = Trace()
    salts = {r.request_id: r.cache_salt for reqs in arrivals.values() for r in reqs}
    last_event = max([*arrivals, *aborts, *mid_step_aborts, 0])
    step = 0
    while step <= last_event or sched.has_unfinished_requests():
        for req in arrivals.get(step, []):
            sched.add_request(req)
        sched.abort_requests(aborts.get(step, []))
        if clock is not None:
            clock.t = float(step)
        so = sched.schedule()
        assert so.total_num_scheduled_tokens <= sched.max_num_batched_tokens
        assert so.total_num_scheduled_tokens <= sched.make_stats().token_budget
        counts = list(so.num_scheduled_tokens.values())
        assert counts == sorted(counts, key=lambda n: n != 1)  # decodes first
        for nr in so.scheduled_new_reqs:
            trace.first_new_step.setdefault(nr.req_id, step)
        mro = runner.execute(so)
        check_cached_blocks(sched, runner, salts)
        sched.abort_requests(mid_step_aborts.get(step, []))
        trace.record(sched.update_from_output(so, mro))
        trace.record(sched.take_aborted_outputs())
        for rid in sched.requests:  # the runner's view agrees with the scheduler's
            if rid in runner.reqs:
                assert runner.reqs[rid].tokens[: sched.requests[rid].num_tokens] == (
                    sched.requests[rid].all_token_ids
                )
        check_invariants(sched)
        step += 1
        assert step < max_steps, "no progress"
    trace.steps = step
    kv = sched.kv_cache_manager
    assert kv.num_free_blocks == kv.num_usable_blocks and not kv.req_to_blocks
    return trace


def make_sched(
    num_blocks: int = 64,
    block_size: int = 4,
    max_model_len: int = 64,
    max_num_batched_tokens: int = 64,
    max_num_seqs: int = 8,
    policy: str = "fcfs",
    caching: bool = True,
    chunked: bool = True,
    max_queued: int | None = None,
    state_slots: bool = False,
    clock: SimClock | None = None,
    **policy_options: object,
) -> Scheduler:
    """``state_slots``: a hybrid model's layers (attention + a state-space layer), so
    every request also holds a state slot. ``policy_options``: further
    ``SchedulerConfig`` fields (the policies' knobs)."""
    kv_cache_config = None
    if state_slots:
        attn = FullAttentionSpec(block_size=block_size, dtype="float32", element_size=4,
                                 num_kv_heads=1, head_dim=8)  # fmt: skip
        ssm = MambaStateSpec(block_size=block_size, dtype="float32", element_size=4,
                             conv_shape=(8, 3), ssm_shape=(8, 16))  # fmt: skip
        kv_cache_config = KVCacheConfig(num_blocks, (attn, ssm))
    return Scheduler(
        SchedulerConfig(
            max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            policy=policy,
            enable_chunked_prefill=chunked,
            max_queued_requests=max_queued,
            **policy_options,  # type: ignore[arg-type]
        ),
        CacheConfig(block_size=block_size, enable_prefix_caching=caching),
        num_blocks,
        kv_cache_config=kv_cache_config,
        clock=clock if clock is not None else SimClock(),
    )


def tokens_of(trace: Trace, rid: str) -> list[int]:
    return [t for o in trace.outputs[rid] for t in o.new_token_ids]


def check_against_reference(sched: Scheduler, trace: Trace, req: Request) -> None:
    kv_tokens = sched.kv_cache_manager.num_usable_blocks * sched.block_size
    out, reason, stop_reason = reference(
        req.prompt_token_ids, req.sampling_params, sched.max_model_len, kv_tokens
    )
    outs = trace.outputs[req.request_id]
    assert tokens_of(trace, req.request_id) == out
    assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
    assert outs[-1].finish_reason == reason and outs[-1].stop_reason == stop_reason


# ---------------------------------------------------------------- hand cases


def test_chunked_prefill_then_decode() -> None:
    sched = make_sched(max_num_batched_tokens=4, block_size=4)
    req = Request("a", list(range(1, 11)), SamplingParams(max_tokens=3, ignore_eos=True))
    sched.add_request(req)
    so = sched.schedule()
    assert so.num_scheduled_tokens == {"a": 4}
    assert [(n.block_ids, n.num_computed_tokens) for n in so.scheduled_new_reqs] == [([1], 0)]
    runner = FakeRunner(4)
    assert sched.update_from_output(so, runner.execute(so)) == []  # mid-prompt: no token
    so = sched.schedule()
    assert [(c.new_block_ids, c.num_computed_tokens) for c in so.scheduled_cached_reqs] == [
        ([2], 4)
    ]
    sched.update_from_output(so, runner.execute(so))
    so = sched.schedule()
    assert so.num_scheduled_tokens == {"a": 2}
    assert so.scheduled_cached_reqs[0].new_block_ids == [3]
    outs = sched.update_from_output(so, runner.execute(so))
    assert [o.new_token_ids for o in outs] == [[next_token(list(range(1, 11)))]]
    assert outs[0].first_scheduled_time == req.first_scheduled_time is not None
    so = sched.schedule()
    assert (
        so.num_scheduled_tokens == {"a": 1}
        and so.scheduled_cached_reqs[0].num_computed_tokens == 10
    )


def test_stop_conditions() -> None:
    prompt = [5, 6, 7]
    out, _, _ = reference(prompt, SamplingParams(max_tokens=30, ignore_eos=True), 64, 1000)
    stop_tok = out[3]
    cases = {
        "len": SamplingParams(max_tokens=3, ignore_eos=True),
        "stoptok": SamplingParams(max_tokens=30, ignore_eos=True, stop_token_ids=[stop_tok]),
        "mintok": SamplingParams(
            max_tokens=30, ignore_eos=True, stop_token_ids=[stop_tok], min_tokens=5
        ),
        "eos": SamplingParams(max_tokens=30),
        "none": SamplingParams(max_tokens=None, ignore_eos=True),
    }
    sched = make_sched(max_model_len=20)
    reqs = [Request(k, prompt, sp, eos_token_ids=EOS) for k, sp in cases.items()]
    trace = drive(sched, {0: reqs})
    for req in reqs:
        check_against_reference(sched, trace, req)
    assert len(tokens_of(trace, "len")) == 3
    assert trace.outputs["stoptok"][-1].stop_reason == stop_tok
    assert len(tokens_of(trace, "stoptok")) <= 4
    assert len(tokens_of(trace, "mintok")) >= 5
    assert len(tokens_of(trace, "none")) == 20 - 3  # capped at max_model_len


def test_eos_is_a_stop_and_respects_min_tokens() -> None:
    # Find a prompt whose first sampled token is EOS.
    prompt = next(
        p for p in ([a, b] for a in range(VOCAB) for b in range(VOCAB)) if next_token(p) in EOS
    )
    sched = make_sched()
    reqs = [
        Request("e", prompt, SamplingParams(max_tokens=5), eos_token_ids=EOS),
        Request("m", prompt, SamplingParams(max_tokens=5, min_tokens=2), eos_token_ids=EOS),
        Request("i", prompt, SamplingParams(max_tokens=5, ignore_eos=True), eos_token_ids=EOS),
    ]
    trace = drive(sched, {0: reqs})
    assert tokens_of(trace, "e") == [EOS[0]] and trace.outputs["e"][-1].finish_reason == "stop"
    assert len(tokens_of(trace, "m")) >= 2 and len(tokens_of(trace, "i")) == 5
    for req in reqs:
        check_against_reference(sched, trace, req)


def test_rejections() -> None:
    sched = make_sched(num_blocks=5, block_size=4, max_model_len=32, max_queued=2)
    with pytest.raises(ValueError, match="max_model_len"):
        sched.add_request(Request("long", [1] * 32, SamplingParams()))
    # 4 usable blocks = 16 tokens: a 16-token prompt + 1 needs 5 blocks.
    with pytest.raises(ValueError, match="KV cache"):
        sched.add_request(Request("kv", [1] * 16, SamplingParams()))
    sched.add_request(Request("ok", [1] * 15, SamplingParams(max_tokens=None)))
    assert sched.requests["ok"].max_tokens == 1  # capped by the KV cache (16 tokens)
    with pytest.raises(ValueError, match="already in use"):
        sched.add_request(Request("ok", [1], SamplingParams()))
    sched.add_request(Request("ok2", [1], SamplingParams()))
    with pytest.raises(ValueError, match="queue is full"):
        sched.add_request(Request("third", [1], SamplingParams()))
    assert sched.get_num_unfinished_requests() == 2


def test_preemption_by_recompute_fcfs() -> None:
    # 6 usable blocks of 2 tokens; two requests that grow to 10 tokens each.
    sched = make_sched(num_blocks=7, block_size=2, max_model_len=12)
    sp = SamplingParams(max_tokens=8, ignore_eos=True)
    a, b = Request("a", [1, 2], sp.clone()), Request("b", [3, 4], sp.clone())
    runner = FakeRunner(2)
    trace = Trace()
    sched.add_request(a)
    sched.add_request(b)
    preempted_seen, resumed_with_outputs = set(), False
    while sched.has_unfinished_requests():
        so = sched.schedule()
        preempted_seen |= so.preempted_req_ids
        for nr in so.scheduled_new_reqs:
            resumed_with_outputs |= bool(nr.output_token_ids)
        trace.record(sched.update_from_output(so, runner.execute(so)))
        check_invariants(sched)
    assert preempted_seen == {"b"}  # the latest arrival is the victim
    assert resumed_with_outputs and trace.outputs["b"][-1].num_preemptions >= 1
    assert trace.outputs["a"][-1].num_preemptions == 0
    check_against_reference(sched, trace, a)
    check_against_reference(sched, trace, b)
    assert sched.make_stats().num_preemptions >= 1


def test_priority_admission_and_victim() -> None:
    sched = make_sched(
        num_blocks=7, block_size=2, max_model_len=12, policy="priority", max_num_seqs=2
    )
    sp = SamplingParams(max_tokens=8, ignore_eos=True)
    reqs = [
        Request("low", [1, 2], sp.clone(), priority=5, arrival_time=1.0),
        Request("high", [3, 4], sp.clone(), priority=0, arrival_time=2.0),
        Request("mid", [5, 6], sp.clone(), priority=2, arrival_time=3.0),
    ]
    trace = drive(sched, {0: reqs})
    assert trace.first_new_step["high"] == trace.first_new_step["mid"] == 0
    assert trace.first_new_step["low"] > 0
    assert trace.outputs["high"][-1].num_preemptions == 0
    for req in reqs:
        check_against_reference(sched, trace, req)


def test_priority_victim_already_scheduled_this_step() -> None:
    # "low" runs first in running order but has the largest priority value: when
    # "high" needs a block, "low" is taken back out of this step and preempted.
    sched = make_sched(num_blocks=5, block_size=2, max_model_len=8, policy="priority")
    sp = SamplingParams(max_tokens=6, ignore_eos=True)
    low = Request("low", [1, 2], sp.clone(), priority=9, arrival_time=0.0)
    high = Request("high", [3, 4], sp.clone(), priority=0, arrival_time=1.0)
    trace = drive(sched, {0: [low], 1: [high]})
    assert trace.outputs["low"][-1].num_preemptions >= 1
    assert trace.outputs["high"][-1].num_preemptions == 0
    check_against_reference(sched, trace, low)
    check_against_reference(sched, trace, high)


def test_head_of_queue_is_not_starved() -> None:
    # A big request at the head that does not fit yet must not be overtaken.
    sched = make_sched(num_blocks=9, block_size=2, max_model_len=16, max_num_batched_tokens=32)
    sp = SamplingParams(max_tokens=6, ignore_eos=True)
    first = Request("first", [1] * 10, sp.clone())
    big = Request("big", [2] * 12, sp.clone())
    smalls = [Request(f"s{i}", [3, i], sp.clone()) for i in range(4)]
    trace = drive(sched, {0: [first], 1: [big, *smalls]})
    for s in smalls:
        assert trace.first_new_step[s.request_id] >= trace.first_new_step["big"]
    for req in [first, big, *smalls]:
        check_against_reference(sched, trace, req)


def test_no_chunked_prefill_schedules_whole_prompts() -> None:
    sched = make_sched(chunked=False, max_num_batched_tokens=16, max_model_len=16)
    reqs = [Request(f"r{i}", [i + 1] * 6, SamplingParams(max_tokens=3)) for i in range(4)]
    for r in reqs:
        sched.add_request(r)
    so = sched.schedule()
    assert so.num_scheduled_tokens == {"r0": 6, "r1": 6}  # r2 would need a chunk


def test_max_num_seqs() -> None:
    sched = make_sched(max_num_seqs=2)
    reqs = [Request(f"r{i}", [i + 1, 2], SamplingParams(max_tokens=3)) for i in range(5)]
    trace = drive(sched, {0: reqs})
    for r in reqs:
        check_against_reference(sched, trace, r)


def test_prefix_cache_hits_are_reported() -> None:
    sched = make_sched(block_size=4)
    prompt = list(range(1, 14))  # 13 tokens: 3 full blocks
    a = Request("a", prompt, SamplingParams(max_tokens=2, ignore_eos=True))
    b = Request("b", prompt, SamplingParams(max_tokens=2, ignore_eos=True))
    salted = Request("c", prompt, SamplingParams(max_tokens=2, ignore_eos=True), cache_salt="x")
    trace = drive(sched, {0: [a], 3: [b, salted]})
    assert trace.outputs["a"][0].num_cached_tokens == 0
    assert trace.outputs["b"][0].num_cached_tokens == 12
    assert trace.outputs["c"][0].num_cached_tokens == 0
    stats = sched.make_stats()
    assert stats.prefix_cache_queries == 3 * 13 and stats.prefix_cache_hits == 12
    for r in (a, b, salted):
        check_against_reference(sched, trace, r)


@pytest.mark.parametrize("caching", [False, True])
def test_fork_children_share_parent_prompt_blocks(caching: bool) -> None:
    # Budget 6: the parent's 10-token prompt takes two steps; the children are held
    # until the step that finishes it, then fork (10 - 1) // 4 = 2 blocks each.
    sched = make_sched(block_size=4, caching=caching, max_num_batched_tokens=6)
    prompt = list(range(1, 11))
    sp = SamplingParams(max_tokens=4, ignore_eos=True)
    parent = Request("p", prompt, sp.clone())
    kids = [Request(f"p.{i}", prompt, sp.clone(), fork_of="p") for i in (1, 2)]
    for r in [parent, *kids]:
        sched.add_request(r)
    runner = FakeRunner(4)
    trace = Trace()
    so = sched.schedule()
    assert so.num_scheduled_tokens == {"p": 6}  # children wait for the parent's prompt
    parent_blocks = list(so.scheduled_new_reqs[0].block_ids)
    trace.record(sched.update_from_output(so, runner.execute(so)))
    so = sched.schedule()
    assert so.num_scheduled_tokens == {"p": 4, "p.1": 2}  # budget: 4 + 2
    parent_blocks += so.scheduled_cached_reqs[0].new_block_ids
    nr = so.scheduled_new_reqs[0]
    assert nr.num_computed_tokens == 8 and nr.block_ids[:2] == parent_blocks[:2]
    pool = sched.kv_cache_manager.block_pool
    assert [pool.blocks[i].ref_cnt for i in parent_blocks] == [2, 2, 1]
    trace.record(sched.update_from_output(so, runner.execute(so)))
    so = sched.schedule()
    nr = so.scheduled_new_reqs[0]
    assert nr.req_id == "p.2" and nr.num_computed_tokens == 8
    assert nr.block_ids[:2] == parent_blocks[:2]
    trace.record(sched.update_from_output(so, runner.execute(so)))
    while sched.has_unfinished_requests():
        so = sched.schedule()
        trace.record(sched.update_from_output(so, runner.execute(so)))
    for r in [parent, *kids]:
        check_against_reference(sched, trace, r)
    assert [trace.outputs[k.request_id][0].num_cached_tokens for k in kids] == [8, 8]
    assert sched.make_stats().prefix_cache_hits == 0  # forks are not prefix-cache hits
    assert sched.kv_cache_manager.num_free_blocks == sched.kv_cache_manager.num_usable_blocks


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_child_ahead_of_its_parent_is_held_not_blocking(policy: str) -> None:
    # The child is queued ahead of its parent: it is held (skipped, keeping its place)
    # while the parent and a younger request are admitted, then forks the next step.
    sched = make_sched(block_size=4, caching=False, policy=policy)
    prompt = list(range(1, 11))
    sp = SamplingParams(max_tokens=3, ignore_eos=True)
    kid = Request("p.1", prompt, sp.clone(), fork_of="p", priority=0)
    parent = Request("p", prompt, sp.clone(), priority=1)
    other = Request("o", [5, 5, 5], sp.clone(), priority=2)
    trace = drive(sched, {0: [kid, parent, other]})
    assert trace.first_new_step == {"p": 0, "o": 0, "p.1": 1}
    assert trace.outputs["p.1"][0].num_cached_tokens == 8
    for r in (kid, parent, other):
        check_against_reference(sched, trace, r)


def test_same_step_prefix_hit() -> None:
    # Two requests with the same prompt arriving together: the second hits the blocks
    # the first computes in the same step (the backend writes all KV before reading).
    sched = make_sched(block_size=4)
    prompt = list(range(1, 14))
    a = Request("a", prompt, SamplingParams(max_tokens=2, ignore_eos=True))
    b = Request("b", prompt, SamplingParams(max_tokens=2, ignore_eos=True))
    trace = drive(sched, {0: [a, b]})
    assert trace.first_new_step == {"a": 0, "b": 0}
    assert trace.outputs["b"][0].num_cached_tokens == 12
    check_against_reference(sched, trace, a)
    check_against_reference(sched, trace, b)


def test_child_of_finished_or_unknown_parent_runs_normally() -> None:
    sched = make_sched(block_size=4, caching=False)
    orphan = Request("o", [1, 2, 3, 4, 5], SamplingParams(max_tokens=2), fork_of="nobody")
    trace = drive(sched, {0: [orphan]})
    check_against_reference(sched, trace, orphan)


def test_abort_in_every_state() -> None:
    sched = make_sched(num_blocks=7, block_size=2, max_model_len=12, max_num_seqs=2)
    sp = SamplingParams(max_tokens=8, ignore_eos=True)
    run = Request("run", [1, 2], sp.clone())
    pre = Request("pre", [3, 4], sp.clone())
    wait = Request("wait", [5, 6], sp.clone())
    kid = Request("kid", [7, 8, 9], sp.clone(), fork_of="parent")
    parent = Request("parent", [7, 8, 9], sp.clone())
    runner = FakeRunner(2)
    for r in (run, pre, wait, parent, kid):
        sched.add_request(r)
    states: dict[str, RequestStatus] = {}
    while "pre" not in states:  # run until "pre" is preempted
        so = sched.schedule()
        sched.update_from_output(so, runner.execute(so))
        if pre.status == RequestStatus.PREEMPTED:
            states = {r.request_id: r.status for r in (run, pre, wait, kid)}
    assert states["run"] == RequestStatus.RUNNING and states["wait"] == RequestStatus.WAITING
    assert states["kid"] == RequestStatus.WAITING
    sched.abort_requests(["run", "pre", "wait", "kid", "unknown"])
    outs = sched.take_aborted_outputs()
    assert [o.request_id for o in outs] == ["run", "pre", "wait", "kid"]
    assert all(o.finish_reason == "abort" and o.new_token_ids == [] for o in outs)
    assert sched.take_aborted_outputs() == []
    assert all(r.status == RequestStatus.FINISHED_ABORTED for r in (run, pre, wait, kid))
    so = sched.schedule()
    assert {"run", "pre", "wait", "kid"} <= so.finished_req_ids
    sched.update_from_output(so, runner.execute(so))
    sched.abort_requests("parent")
    assert sched.take_aborted_outputs()[0].request_id == "parent"
    assert not sched.has_unfinished_requests()
    kv = sched.kv_cache_manager
    assert kv.num_free_blocks == kv.num_usable_blocks


def test_prompt_logprobs_gathered_over_chunks_and_sent_once() -> None:
    sched = make_sched(max_num_batched_tokens=3, block_size=2)
    prompt = list(range(1, 9))
    req = Request("a", prompt, SamplingParams(max_tokens=3, prompt_logprobs=1, logprobs=0))
    trace = drive(sched, {0: [req]})
    outs = trace.outputs["a"]
    assert outs[0].new_prompt_logprobs == [[(prompt[p], -p / 10, 1)] for p in range(1, 8)]
    assert all(o.new_prompt_logprobs is None for o in outs[1:])
    assert [o.new_logprobs for o in outs] == [[[(t, -0.5, 1)]] for t in tokens_of(trace, "a")]
    check_against_reference(sched, trace, req)


@pytest.mark.parametrize("dedup", [False, True])
def test_prompt_logprobs_restart_after_preemption_mid_prompt(dedup: bool) -> None:
    # "b" is preempted while its prompt is half done; whether or not the runner sends
    # the recomputed positions again, each position is delivered exactly once.
    sched = make_sched(num_blocks=7, block_size=2, max_model_len=12, max_num_batched_tokens=2)
    a = Request("a", [1, 2], SamplingParams(max_tokens=9, ignore_eos=True))
    prompt = list(range(3, 11))
    b = Request("b", prompt, SamplingParams(max_tokens=2, ignore_eos=True, prompt_logprobs=0))
    trace = drive(sched, {0: [a, b]}, dedup_prompt_logprobs=dedup)
    assert trace.outputs["b"][0].num_preemptions >= 1  # preempted before its first token
    assert trace.outputs["b"][0].new_prompt_logprobs == [
        [(prompt[p], -p / 10, 1)] for p in range(1, 8)
    ]
    check_against_reference(sched, trace, a)
    check_against_reference(sched, trace, b)


def test_mid_step_abort_is_not_reported_twice() -> None:
    sched = make_sched()
    req = Request("a", [1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True))
    trace = drive(sched, {0: [req]}, mid_step_aborts={1: ["a"]})
    assert [o.finish_reason for o in trace.outputs["a"]] == [None, "abort"]


def test_reset_prefix_cache() -> None:
    sched = make_sched()
    trace = drive(sched, {0: [Request("a", list(range(1, 10)), SamplingParams(max_tokens=2))]})
    assert trace.outputs["a"][-1].finished
    assert sched.kv_cache_manager.block_pool.cached_block_hash_to_block
    assert sched.reset_prefix_cache()
    assert not sched.kv_cache_manager.block_pool.cached_block_hash_to_block


def test_core_does_not_import_torch() -> None:
    code = (
        "import sys, kvasir.core.scheduler, kvasir.core.kv_cache_manager;"
        "assert 'torch' not in sys.modules, 'kvasir.core imported torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- random workloads


@st.composite
def workloads(draw: st.DrawFn) -> dict:
    block_size = draw(st.sampled_from([1, 2, 4, 8]))
    max_model_len = draw(st.integers(4, 40))
    chunked = draw(st.booleans())
    if chunked:
        budget = draw(st.integers(1, 40))
    else:
        budget = draw(st.integers(max_model_len, max_model_len + 10))
    cfg = dict(
        num_blocks=draw(st.integers(2, 24)),
        block_size=block_size,
        max_model_len=max_model_len,
        max_num_batched_tokens=budget,
        max_num_seqs=draw(st.integers(1, 6)),
        policy=draw(st.sampled_from(["fcfs", "priority"])),
        caching=draw(st.booleans()),
        chunked=chunked,
    )
    tok = st.integers(0, VOCAB - 1)
    prefixes = draw(st.lists(st.lists(tok, max_size=16), min_size=1, max_size=3))
    specs = []
    for i in range(draw(st.integers(1, 9))):
        prompt = draw(st.sampled_from(prefixes)) + draw(st.lists(tok, max_size=10))
        if draw(st.booleans()):  # land exactly on a block boundary
            prompt = prompt[: max(len(prompt) // block_size, 1) * block_size]
            prompt += (
                [1] * (block_size - len(prompt) % block_size) if len(prompt) % block_size else []
            )
        prompt = prompt or [7]
        max_tokens = draw(st.one_of(st.none(), st.integers(1, 16)))
        min_tokens = draw(st.integers(0, 3))
        if max_tokens is not None:
            min_tokens = min(min_tokens, max_tokens)
        sp = SamplingParams(
            max_tokens=max_tokens,
            min_tokens=min_tokens,
            ignore_eos=draw(st.booleans()),
            stop_token_ids=draw(st.lists(tok, max_size=2)),
            prompt_logprobs=draw(st.sampled_from([None, None, 0])),
            logprobs=draw(st.sampled_from([None, 0])),
        )
        specs.append(
            dict(
                rid=f"r{i}",
                arrival=draw(st.integers(0, 12)),
                prompt=prompt,
                sp=sp,
                priority=draw(st.integers(0, 3)),
                salt=draw(st.sampled_from([None, None, "t"])),
                n=draw(st.integers(1, 3)),
                abort=draw(st.one_of(st.none(), st.integers(0, 40))),
                abort_mid=draw(st.booleans()),
            )
        )
    return dict(
        cfg=cfg,
        specs=specs,
        dedup=draw(st.booleans()),
        spec_k=draw(st.integers(1, 4)),
        lookahead=draw(st.integers(0, 4)),
    )


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_random_workloads(w: dict) -> None:
    _run_random_workload(w, speculate=False)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_random_workloads_with_speculation(w: dict) -> None:
    """Drafts (some wrong) verified and rolled back, lookahead slots: outputs are the
    stand-alone reference, no block leaks or is freed twice (check_invariants, drive),
    and no block holding unverified drafts is ever in the prefix cache
    (check_cached_blocks)."""
    stats = _run_random_workload(w, speculate=True)
    assert stats.spec_num_accepted_tokens <= stats.spec_num_draft_tokens


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_random_workloads_with_state_slots(w: dict) -> None:
    """A hybrid model's state slots: taken at admission, returned at preemption, finish
    and abort, never leaked or shared (check_invariants after every step); no prefix
    caching or forks, and every request still gets its stand-alone output."""
    _run_random_workload(w, speculate=False, state_slots=True)


def _run_random_workload(  # type: ignore[no-untyped-def]
    w: dict,
    speculate: bool,
    state_slots: bool = False,
    policy: str | None = None,
    step_time_model: StepTimeModel | None = None,
    **policy_options: object,
):
    """``policy`` overrides the drawn one; requests then carry tenants and classes.
    Returns the scheduler's stats, and the trace and requests for further checks."""
    cfg = dict(w["cfg"])
    if policy is not None:
        cfg["policy"] = policy
    clock = SimClock()
    sched = make_sched(**cfg, state_slots=state_slots, clock=clock, **policy_options)
    sched.set_step_time_model(step_time_model)
    if speculate:
        sched.num_lookahead_tokens = w["lookahead"]
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
                tenant="big" if int(spec["rid"][1:]) % 3 else "small",
                service_tier="batch" if int(spec["rid"][1:]) % 2 else None,
            )
            for k in range(spec["n"])
        ]
        if not fits:
            for req in family:
                with pytest.raises(ValueError, match="max_model_len|KV cache"):
                    sched.add_request(req)
            continue
        arrivals.setdefault(spec["arrival"], []).extend(family)
        admitted.extend(family)
        if spec["abort"] is not None:
            step = spec["arrival"] + spec["abort"]
            (mid_aborts if spec["abort_mid"] else aborts).setdefault(step, []).append(spec["rid"])
            aborted.add(spec["rid"])

    trace = drive(
        sched, arrivals, aborts, mid_aborts, dedup_prompt_logprobs=w["dedup"],
        spec_k=w["spec_k"] if speculate else 0, clock=clock,
    )  # fmt: skip

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
        if got:
            assert outs[0].num_cached_tokens % cfg["block_size"] == 0
            assert outs[0].num_cached_tokens <= len(req.prompt_token_ids) - 1
        if req.sampling_params.prompt_logprobs is not None and got:
            p = req.prompt_token_ids
            assert (outs[0].new_prompt_logprobs or []) == [
                [(p[i], -i / 10, 1)] for i in range(1, len(p))
            ]
            assert all(o.new_prompt_logprobs is None for o in outs[1:])
    if cfg["policy"] == "fcfs":
        # First admissions of non-child requests happen in arrival order: no one is
        # overtaken (children may wait for their parent, so they are left out).
        firsts = [r.request_id for r in admitted if r.fork_of is None]
        firsts = [rid for rid in firsts if rid in trace.first_new_step]
        steps = [trace.first_new_step[rid] for rid in firsts]
        assert steps == sorted(steps)
    if policy is not None:
        return sched.make_stats(), trace, admitted
    return sched.make_stats()


# ---------------------------------------------------------------- pipeline parallelism


@pytest.mark.parametrize("num_stages", [2, 3])
def test_pipelined_steps_in_flight(num_stages: int) -> None:
    """Up to ``num_stages`` steps in flight (schedule N + 1 before N's output is back):
    no request is in two in-flight steps, a cached request's ``new_token_ids`` are
    exactly its tokens from ``max(computed, prompt)`` to the end of this step's chunk
    (what a stage that does not sample lacks), and every request still finishes with
    its stand-alone output, through chunked prefill and preemption."""
    sched = Scheduler(
        SchedulerConfig(max_num_batched_tokens=7, max_num_seqs=6, max_model_len=48),
        CacheConfig(block_size=4),
        num_blocks=17,
        pipeline_parallel_size=num_stages,
    )
    reqs = [
        Request(f"r{i}", [(7 * i + j) % VOCAB + 1 for j in range(n)],
                SamplingParams(max_tokens=m, ignore_eos=True))
        for i, (n, m) in enumerate([(9, 12), (5, 20), (14, 8), (3, 25), (11, 10)])
    ]  # fmt: skip
    for r in reqs:
        sched.add_request(r)
    runner = FakeRunner(4)
    trace = Trace()
    in_flight: list[tuple[SchedulerOutput, ModelRunnerOutput]] = []
    most_in_flight = checked = 0
    for _ in range(2000):
        if not (sched.has_unfinished_requests() or in_flight):
            break
        so = sched.schedule()
        busy = {rid for s, _ in in_flight for rid in s.num_scheduled_tokens}
        assert not busy & set(so.num_scheduled_tokens), "a request in two in-flight steps"
        assert not busy & so.preempted_req_ids, "an in-flight request was preempted"
        for cr in so.scheduled_cached_reqs:
            r = runner.reqs[cr.req_id]
            c, n = cr.num_computed_tokens, so.num_scheduled_tokens[cr.req_id]
            assert cr.new_token_ids == r.tokens[max(c, r.num_prompt) : c + n]
            checked += len(cr.new_token_ids)
        mro = runner.execute(so)
        if so.num_scheduled_tokens:
            in_flight.append((so, mro))
            most_in_flight = max(most_in_flight, len(in_flight))
        if len(in_flight) == num_stages or (in_flight and not so.num_scheduled_tokens):
            trace.record(sched.update_from_output(*in_flight.pop(0)))
        if not so.num_scheduled_tokens:
            trace.record(sched.update_from_output(so, ModelRunnerOutput([], [])))
        check_invariants(sched)
    assert most_in_flight == num_stages and checked > 0
    assert sched.num_preemptions > 0
    for r in reqs:
        check_against_reference(sched, trace, r)
    kv = sched.kv_cache_manager
    assert kv.num_free_blocks == kv.num_usable_blocks


def test_pipeline_parallelism_refuses_async_scheduling() -> None:
    with pytest.raises(ValueError, match="async_scheduling must be off with pipeline"):
        Scheduler(
            SchedulerConfig(max_model_len=32), CacheConfig(), 16, True, pipeline_parallel_size=2
        )
