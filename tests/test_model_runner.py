"""The model runner's host side: the persistent ``InputBatch`` (rows, condensing,
read-back), per-row sampling tensors and their cache, and what the model is fed when
steps are launched before the previous one is read back (tokens put in place on the
device). Checked against hand-computed values and against each request's own final
token sequence.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvasir.sampling_params import SamplingParams
from kvasir.worker.input_batch import InputBatch
from kvasir.worker.request_state import CachedRequestState

VOCAB = 50


def _state(rid: str, num_prompt: int, **sp: object) -> CachedRequestState:
    params = SamplingParams(**sp)  # type: ignore[arg-type]
    gen = None
    if params.seed is not None:
        gen = torch.Generator().manual_seed(params.seed)
    return CachedRequestState(rid, params, num_prompt, generator=gen)


def _batch() -> InputBatch:
    return InputBatch(
        max_num_reqs=4, max_model_len=16, max_num_blocks_per_req=4, vocab_size=VOCAB,
        pin_memory=False,
    )  # fmt: skip


def test_rows_stay_dense_when_one_is_removed() -> None:
    ib = _batch()
    a = _state("a", 3, temperature=0.0)
    b = _state("b", 2, temperature=0.7, top_k=5, presence_penalty=0.5)
    c = _state("c", 4, temperature=1.0, top_p=0.9, seed=3, logprobs=2)
    ib.add(a, [1, 2, 3], [7], 0)
    ib.add(b, [4, 5, 9], [8, 9], 2)
    ib.add(c, [6, 7, 8, 9], [10], 1)
    assert (a.row, b.row, c.row, ib.num_reqs) == (0, 1, 2, 3)
    assert ib.num_penalized == 1 and ib.num_seeded == 1
    version = ib.version
    ib.remove(b)
    # The last row (c) moved into b's hole with everything it owns.
    assert (b.row, c.row, ib.num_reqs) == (-1, 1, 2) and ib.version != version
    assert ib.req_states[1] is c and ib.req_states[2] is None
    assert ib.token_ids[1, :4].tolist() == [6, 7, 8, 9]
    assert ib.num_tokens[1] == ib.num_known_tokens[1] == 4
    assert ib.num_prompt_tokens[1] == 4 and ib.num_computed_tokens[1] == 1
    assert ib.block_table[1, :1].tolist() == [10] and ib.num_blocks[1] == 1
    assert ib.temperature[1] == np.float32(1.0) and ib.top_p[1] == np.float32(0.9)
    assert ib.top_k[1] == VOCAB and ib.num_logprobs[1] == 2
    assert ib.num_penalized == 0 and ib.num_seeded == 1
    ib.append_block_ids(1, [11, 12])
    assert ib.block_table[1, :3].tolist() == [10, 11, 12] and ib.num_blocks[1] == 3


def test_read_back_appends_to_rows_still_in_the_batch() -> None:
    ib = _batch()
    a, b, c = _state("a", 2), _state("b", 2), _state("c", 2)
    for s, toks in ((a, [1, 2]), (b, [3, 4]), (c, [5, 6])):
        ib.add(s, toks, [1], 0)
    ib.num_tokens[:3] += 1  # each sampled one token, still on the device
    ib.remove(a)  # finished meanwhile: c moves to row 0
    ib.record_sampled([a, b, c], np.array([40, 41, 42]))
    assert ib.token_ids[c.row, :3].tolist() == [5, 6, 42]
    assert ib.token_ids[b.row, :3].tolist() == [3, 4, 41]
    assert (ib.num_known_tokens[:2] == ib.num_tokens[:2]).all()


def test_sampling_metadata_greedy_batch_builds_no_tensors() -> None:
    ib = _batch()
    for i in range(3):
        ib.add(_state(str(i), 2, temperature=0.0), [1, 2], [1], 0)
    empty = torch.empty(0)
    md = ib.make_sampling_metadata(np.arange(3), torch.device("cpu"), empty)
    assert md.all_greedy and not md.all_random and md.no_penalties
    assert md.temperature is empty and md.top_k is None and md.top_p is None
    assert md.min_p is None and md.generators == {} and md.max_num_logprobs is None


def test_sampling_metadata_mixed_rows_hand_checked() -> None:
    ib = _batch()
    ib.add(_state("g", 2, temperature=0.0, logprobs=0), [1, 2], [1], 0)
    ib.add(_state("s", 1, temperature=0.5, top_k=3, seed=1), [3, 9, 9], [2], 0)
    ib.add(_state("p", 2, temperature=1.0, min_p=0.1, repetition_penalty=1.2), [4, 5, 6], [3], 0)
    rows = np.array([1, 2])  # row 0 does not sample this step
    md = ib.make_sampling_metadata(rows, torch.device("cpu"), torch.empty(0))
    assert md.all_random and not md.all_greedy and not md.no_penalties
    assert md.temperature.tolist() == [0.5, 1.0]
    assert md.top_k is not None and md.top_k.tolist() == [3, VOCAB]
    assert md.top_p is None
    assert md.min_p is not None and md.min_p.tolist() == pytest.approx([0.0, 0.1])
    assert list(md.generators) == [0]  # the seeded row, by its index among sampled rows
    assert md.repetition_penalties.tolist() == pytest.approx([1.0, 1.2])
    assert md.prompt_token_ids is not None
    assert md.prompt_token_ids.tolist() == [[3, VOCAB], [4, 5]]  # padded with vocab_size
    assert md.output_token_ids == [[9, 9], [6]]
    assert md.max_num_logprobs is None  # only row 0 wants logprobs
    md0 = ib.make_sampling_metadata(np.arange(3), torch.device("cpu"), torch.empty(0))
    assert md0.max_num_logprobs == 0


def test_min_tokens_rows_count_pending_tokens() -> None:
    ib = _batch()
    st = _state("m", 2, min_tokens=3, stop_token_ids=[5])
    st.min_tokens_stop_ids = [5, 2]
    ib.add(st, [1, 2, 8], [1], 0)  # one output token so far
    assert ib.min_tokens_stop_ids(np.array([0])) == {0: [5, 2]}
    ib.num_tokens[0] += 1  # a second one, still on the device
    assert ib.min_tokens_stop_ids(np.array([0])) == {0: [5, 2]}
    ib.num_tokens[0] += 1  # three outputs: the mask is lifted
    assert ib.min_tokens_stop_ids(np.array([0])) == {}


# ---------------------------------------------------------------- the runner


@pytest.fixture()
def core():
    from kvasir.config import EngineConfig, ModelConfig, SchedulerConfig
    from kvasir.engine.core import EngineCore

    cfg = EngineConfig(
        model_config=ModelConfig(model="tiny-llama", load_format="dummy", max_model_len=128),
        scheduler_config=SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8),
        async_scheduling=True,
    )
    return EngineCore(cfg, log=False)


def _add(core, rid: str, prompt: list[int], **sp: object) -> None:
    from kvasir.engine.messages import EngineCoreRequest

    params = SamplingParams(**sp)  # type: ignore[arg-type]
    core.add_request(
        EngineCoreRequest(request_id=rid, prompt_token_ids=prompt, sampling_params=params,
                          eos_token_ids=[2], arrival_time=0.0)
    )  # fmt: skip


def test_launch_twice_then_read_back_in_order(core) -> None:
    runner, sched = core.runner, core.scheduler
    _add(core, "a", [5, 6, 7], temperature=0.0, max_tokens=4, ignore_eos=True)
    seen: list[list[int]] = []
    forward = runner.model.forward

    def hook(ids, pos, caches, meta):
        seen.append(ids.tolist())
        return forward(ids, pos, caches, meta)

    runner.model.forward = hook
    so1 = sched.schedule()
    out1 = runner.execute_model_async(so1)
    so2 = sched.schedule()  # step 1's token is still unread
    assert so2.num_scheduled_tokens == {"a": 1}
    out2 = runner.execute_model_async(so2)
    assert not out1.ready and not out2.ready
    mro2 = out2.get_output()  # reads step 1 back first
    assert out1.ready
    mro1 = out1.get_output()
    t1, t2 = mro1.sampled_token_ids[0][0], mro2.sampled_token_ids[0][0]
    assert seen == [[5, 6, 7], [t1]]  # step 2 decoded step 1's token from the device
    ib = runner.input_batch
    row = runner.requests["a"].row
    assert ib.token_ids[row, :5].tolist() == [5, 6, 7, t1, t2]
    assert ib.num_known_tokens[row] == ib.num_tokens[row] == 5


def test_steps_feed_each_request_its_own_tokens(core) -> None:
    """Requests finishing at different steps make rows move while tokens are still on
    the device; every token the model is fed must still be its request's own."""
    runner = core.runner
    prompts = {f"r{i}": [10 + i] * (3 + 2 * i) for i in range(5)}
    for i, (rid, p) in enumerate(prompts.items()):
        sp = dict(temperature=0.8, seed=i, max_tokens=3 + 3 * (i % 3), ignore_eos=True)
        _add(core, rid, p, **sp)
    fed: list[tuple[list[int], list[int], list[int]]] = []
    forward = runner.model.forward

    def hook(ids, pos, caches, meta):
        qsl = meta.query_start_loc_cpu.tolist()
        fed.append((ids.tolist(), pos.tolist(), qsl))
        return forward(ids, pos, caches, meta)

    runner.model.forward = hook
    launched = runner.execute_model_async
    batches: list = []

    def record(so):
        out = launched(so)
        if out is not None:
            batches.append(out.req_ids)
        return out

    runner.execute_model_async = record
    tokens = {rid: list(p) for rid, p in prompts.items()}
    while core.has_unfinished_requests():
        outputs, _ = core.step()
        for o in outputs:
            tokens[o.request_id] += o.new_token_ids
    assert len(fed) == len(batches) > 5
    for (ids, pos, qsl), req_ids in zip(fed, batches, strict=True):
        for i, rid in enumerate(req_ids):
            for j in range(qsl[i], qsl[i + 1]):
                if pos[j] < len(tokens[rid]):  # else: a dropped step past the end
                    assert ids[j] == tokens[rid][pos[j]], (rid, pos[j])
    assert core.scheduler.kv_cache_manager.usage == 0.0


def test_block_table_rows_follow_the_scheduler_and_metadata_is_cached(core) -> None:
    runner, sched = core.runner, core.scheduler
    for i in range(3):
        _add(core, f"q{i}", [3 + i] * 5, temperature=0.0, max_tokens=40, ignore_eos=True)
    core.step()
    core.step()
    ib = runner.input_batch
    cached = None
    for _ in range(30):  # past a block boundary (16 tokens) for every request
        core.step()
        for rid, st in runner.requests.items():
            blocks = sched.kv_cache_manager.get_block_ids(rid)
            assert ib.block_table[st.row, : ib.num_blocks[st.row]].tolist() == blocks
        md = runner._sampling_cache[1]
        assert md.all_greedy and md.temperature.numel() == 0
        if cached is not None:
            assert md is cached  # unchanged batch: not rebuilt
        cached = md
    _add(core, "late", [9] * 4, temperature=0.5, seed=0, max_tokens=3)
    core.step()
    core.step()
    assert runner._sampling_cache[1] is not cached  # the batch changed
