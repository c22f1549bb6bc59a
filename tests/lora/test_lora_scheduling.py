"""Adapter-aware scheduling and the adapter cache's tiers, as properties (hypothesis)
over the real ``Scheduler`` with a fake runner (``tests/test_scheduler.FakeRunner``,
which checks every KV position a request reads) and over ``HostAdapterCache``.

Properties: device slots never exceed ``max_loras`` and a step never runs more distinct
adapters than that; an adapter in use is never evicted from its slot; every request
finishes with the output it would have alone; a request only ever gets prefix-cache
blocks computed under its own adapter; adapters still loading do not block others;
the age bound lets a cold adapter in; the host tier never exceeds its size.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvasir.core.hashing import hash_token_ids
from kvasir.core.lora_slots import LoRASlots
from kvasir.core.request import Request
from kvasir.lora.cache import HostAdapterCache
from kvasir.sampling_params import SamplingParams
from tests.test_scheduler import FakeRunner, check_invariants, make_sched, reference


class SlowLoads:
    """``is_ready`` for the slot table: adapter i becomes ready ``delay[i]`` checks
    after the first one (a background load in progress)."""

    def __init__(self, delays: dict[int, int]) -> None:
        self.delays = dict(delays)

    def __call__(self, lora_id: int) -> bool:
        left = self.delays.get(lora_id, 0)
        if left > 0:
            self.delays[lora_id] = left - 1
            return False
        return True


def run(sched, requests: list[Request], max_loras: int, arrivals_per_step: int = 3):
    runner = FakeRunner(sched.block_size)
    loras = {r.request_id: r.lora_id for r in requests}
    prompts = {r.request_id: (list(r.prompt_token_ids), r.sampling_params) for r in requests}
    outputs: dict[str, list[int]] = {}
    finished: set[str] = set()
    slot_during_run: dict[str, int] = {}
    pending = list(requests)
    steps = 0
    slots = sched.lora_slots
    while pending or sched.has_unfinished_requests():
        for r in pending[:arrivals_per_step]:
            sched.add_request(r)
        pending = pending[arrivals_per_step:]
        so = sched.schedule()
        # A step's adapters all hold device slots; never more than max_loras of them.
        step_loras = {loras[rid] for rid in so.num_scheduled_tokens} - {0}
        assert len(step_loras) <= max_loras
        assert len(slots.slot_of) <= max_loras
        assert step_loras <= set(slots.slot_of)
        # An adapter in use keeps its slot for as long as a request of it runs.
        for r in sched.running:
            if r.lora_id:
                slot = slots.slot_of[r.lora_id]
                assert slot_during_run.setdefault(r.request_id, slot) == slot
        mro = runner.execute(so)
        for nr in so.scheduled_new_reqs:
            assert nr.lora_id == loras[nr.req_id]
            # Prefix-cache hits (possibly computed earlier in this same step): blocks
            # written by requests of the same adapter only.
            for b in nr.block_ids[: nr.num_computed_tokens // sched.block_size]:
                writer, _ = runner.block_content[b]
                assert loras[writer] == nr.lora_id, "KV shared across adapters"
        for o in sched.update_from_output(so, mro):
            outputs.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                finished.add(o.request_id)
                slot_during_run.pop(o.request_id, None)
        for rid in so.preempted_req_ids:
            slot_during_run.pop(rid, None)
        for block in sched.kv_cache_manager.block_pool.blocks:  # hashes name their KV
            if block.block_hash is not None:
                writer, tokens = runner.block_content[block.block_id]
                want = hash_token_ids(list(tokens), sched.block_size, None, loras[writer])
                assert block.block_hash == want[-1]
        check_invariants(sched)
        steps += 1
        assert steps < 3000, "no progress"
    assert finished == set(loras)
    assert not slots.num_running  # every slot released
    for rid, (prompt, sp) in prompts.items():
        assert outputs[rid] == reference(prompt, sp, sched.max_model_len, 10**9)[0]
    return steps


@st.composite
def workloads(draw):
    num = draw(st.integers(1, 14))
    num_loras = draw(st.integers(1, 5))
    shared = draw(st.lists(st.integers(1, 39), min_size=4, max_size=9))
    reqs = []
    for i in range(num):
        lora_id = draw(st.integers(0, num_loras))
        tail = draw(st.lists(st.integers(1, 39), min_size=1, max_size=6))
        prompt = (shared if draw(st.booleans()) else []) + tail
        sp = SamplingParams(temperature=0.0, max_tokens=draw(st.integers(1, 8)), ignore_eos=True)
        reqs.append(Request(f"r{i}", prompt, sp, eos_token_ids=(0,), lora_id=lora_id))
    max_loras = draw(st.integers(1, 3))
    delays = {i: draw(st.integers(0, 4)) for i in range(1, num_loras + 1)}
    num_blocks = draw(st.sampled_from([24, 64]))
    return reqs, max_loras, delays, num_blocks


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_adapter_scheduling_properties(w):
    reqs, max_loras, delays, num_blocks = w
    sched = make_sched(num_blocks=num_blocks, max_num_seqs=4, max_num_batched_tokens=16)
    sched.lora_slots = LoRASlots(max_loras, max_wait_steps=6, max_num_seqs=4,
                                 is_ready=SlowLoads(delays))  # fmt: skip
    run(sched, reqs, max_loras)


def _req(i: int, lora_id: int, max_tokens: int = 4) -> Request:
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return Request(f"r{i}", [1 + i % 30, 2, 3], sp, eos_token_ids=(0,), lora_id=lora_id)


def test_loading_adapter_does_not_block_others():
    # Adapter 1 takes 5 checks to load; the requests queued behind it run meanwhile.
    sched = make_sched(max_num_seqs=8)
    sched.lora_slots = LoRASlots(2, is_ready=SlowLoads({1: 5}))
    for r in [_req(0, 1), _req(1, 2), _req(2, 0)]:
        sched.add_request(r)
    so = sched.schedule()
    assert set(so.num_scheduled_tokens) == {"r1", "r2"}
    assert so.lora_loads == {0: 2}
    assert [r.request_id for r in sched.waiting] == ["r0"]


def test_age_bound_admits_a_cold_adapter():
    # One slot, held by adapter 1 whose requests keep arriving: without the age bound
    # adapter 2's request would wait for as long as they do.
    sched = make_sched(max_num_seqs=8, num_blocks=256)
    sched.lora_slots = LoRASlots(1, max_wait_steps=3, max_num_seqs=8)
    runner = FakeRunner(sched.block_size)
    sched.add_request(_req(0, 1, max_tokens=6))
    sched.add_request(_req(1, 2, max_tokens=2))
    admitted_at = None
    for step in range(60):
        sched.add_request(_req(100 + step, 1, max_tokens=6))
        so = sched.schedule()
        if "r1" in so.num_scheduled_tokens and admitted_at is None:
            admitted_at = step
        sched.update_from_output(so, runner.execute(so))
        if admitted_at is not None:
            break
    assert admitted_at is not None and admitted_at < 20, admitted_at
    assert sched.lora_slots.slot_of == {2: 0}


def test_resident_adapter_preferred_over_eviction():
    # Two slots, both resident and in use: a third adapter waits (no eviction of an
    # adapter in use) while requests of the resident adapters are admitted.
    sched = make_sched(max_num_seqs=8)
    slots = LoRASlots(2, max_num_seqs=8)
    sched.lora_slots = slots
    for r in [_req(0, 1, 8), _req(1, 2, 8), _req(2, 3), _req(3, 1)]:
        sched.add_request(r)
    so = sched.schedule()
    assert set(so.num_scheduled_tokens) == {"r0", "r1", "r3"}
    assert slots.slot_of == {1: 0, 2: 1} and slots.num_hits >= 1


@settings(max_examples=80, deadline=None)
@given(
    st.integers(1, 4),
    st.lists(st.tuples(st.sampled_from(["request", "get", "take"]), st.integers(1, 7)),
             max_size=40),
)  # fmt: skip
def test_host_tier_never_exceeds_its_size(capacity, ops):
    from kvasir.lora.adapter import AdapterInfo, LoRAAdapter

    loads: list[int] = []

    def loader(lora_id: int) -> LoRAAdapter:
        loads.append(lora_id)
        return LoRAAdapter(AdapterInfo(f"/a/{lora_id}", "LORA", 1), {}, {})

    cache = HostAdapterCache(capacity, loader, background=False)
    for op, lora_id in ops:
        if op == "request":
            cache.request(lora_id)
            assert lora_id in cache  # just loaded: never its own victim
        elif op == "get":
            got = cache.get(lora_id)
            assert (got is not None) == (lora_id in cache)
        else:
            adapter = cache.take(lora_id)
            assert adapter.info.path == f"/a/{lora_id}"
        assert len(cache) <= capacity
    assert cache.num_disk_loads == len(loads)
