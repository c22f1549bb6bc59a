"""End-to-end checks of the engine with the real default model against HF transformers.

Greedy outputs must be token-identical to HF's greedy ``generate`` on the same GGUF,
alone, batched with 30 other requests, under preemption and with shared prefixes.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
from model_utils import DEFAULT_MODEL_PROMPTS

from kvasir import LLM, SamplingParams
from kvasir.models.default import default_model_path

MAX_NEW = 20
PROMPTS = DEFAULT_MODEL_PROMPTS


@pytest.fixture(scope="module")
def hf_greedy() -> dict[tuple[int, ...], list[int]]:
    """HF greedy continuations of the test prompts (and their token ids)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path()
    d, f = os.path.dirname(path), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    out = {}
    with torch.inference_mode():
        for p in PROMPTS + [SHARED_PREFIX + s for s in SHARED_SUFFIXES]:
            ids = tok(p).input_ids
            gen = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=MAX_NEW,
                do_sample=False,
                pad_token_id=2,
            )
            out[tuple(ids)] = gen[0, len(ids) :].tolist()
    return out


SHARED_PREFIX = (
    "You are a helpful assistant. Answer briefly and precisely, and never make things up. "
    "Here is the question you must answer for the user today: "
)
SHARED_SUFFIXES = [
    "What colour is the sky?",
    "How many legs does a spider have?",
    "What is the largest ocean?",
]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(kv_cache_gb=0.25, max_model_len=1024, log=False)


def _ids(llm: LLM, prompts: list[str]) -> list[list[int]]:
    tok = llm.get_tokenizer()
    return [tok(p).input_ids for p in prompts]


def _greedy(n: int = MAX_NEW) -> SamplingParams:
    # HF generate stops only at max_new_tokens unless it produces EOS; ignore_eos keeps
    # both engines generating exactly MAX_NEW tokens unless HF stopped early.
    return SamplingParams(temperature=0.0, max_tokens=n)


def _check(out_ids: list[int], ref: list[int]) -> None:
    # HF stops after EOS (2) and includes it; so do we (EOS is returned as a token id).
    assert out_ids == ref[: len(out_ids)] and len(out_ids) == len(ref), (out_ids, ref)


def test_greedy_alone_matches_hf(llm: LLM, hf_greedy) -> None:
    for ids in _ids(llm, PROMPTS):
        out = llm.generate([ids], _greedy(), use_tqdm=False)[0]
        _check(out.outputs[0].token_ids, hf_greedy[tuple(ids)])


def _random_others(n: int, seed: int) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(100, 49000) for _ in range(rng.randint(1, 120))] for _ in range(n)]
    params = [
        SamplingParams(
            temperature=rng.choice([0.0, 0.7, 1.0]),
            max_tokens=rng.randint(1, 40),
            ignore_eos=True,
            seed=rng.randint(0, 99),
        )
        for _ in range(n)
    ]
    return prompts, params


def test_greedy_batched_with_30_others_matches_hf(llm: LLM, hf_greedy) -> None:
    ids = _ids(llm, PROMPTS)
    others, other_params = _random_others(30, seed=1)
    prompts = others[:15] + ids + others[15:]
    params = other_params[:15] + [_greedy()] * len(ids) + other_params[15:]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for i, p in enumerate(ids):
        _check(outs[15 + i].outputs[0].token_ids, hf_greedy[tuple(p)])
    for o, sp in zip(outs[:15] + outs[15 + len(ids) :], other_params):
        assert len(o.outputs[0].token_ids) == sp.max_tokens
        assert o.outputs[0].finish_reason == "length"


def test_greedy_under_preemption_matches_hf(hf_greedy) -> None:
    # 48 blocks of 16 tokens = 768 token slots for 38 requests: preemption is forced.
    small = LLM(num_gpu_blocks_override=48, max_model_len=512, log=False)
    ids = _ids(small, PROMPTS)
    others, other_params = _random_others(30, seed=2)
    prompts = ids + others
    params = [_greedy()] * len(ids) + other_params
    outs = small.generate(prompts, params, use_tqdm=False)
    stats = small.llm_engine.engine_core.scheduler.make_stats()
    assert stats.num_preemptions > 0
    for i, p in enumerate(ids):
        _check(outs[i].outputs[0].token_ids, hf_greedy[tuple(p)])
    # Every block is back in the pool once everything finished.
    kv = small.llm_engine.engine_core.scheduler.kv_cache_manager
    assert kv.usage == 0.0


def test_shared_prefix_hits_cache_and_matches_hf(llm: LLM, hf_greedy) -> None:
    prompts = [SHARED_PREFIX + s for s in SHARED_SUFFIXES]
    ids = _ids(llm, prompts)
    first = llm.generate([ids[0]], _greedy(), use_tqdm=False)[0]
    rest = llm.generate(ids[1:], _greedy(), use_tqdm=False)
    assert all(o.num_cached_tokens >= 16 for o in rest)
    for p, o in zip(ids, [first] + rest):
        _check(o.outputs[0].token_ids, hf_greedy[tuple(p)])


def test_seeded_sampling_reproducible_across_batches(llm: LLM) -> None:
    sp = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, max_tokens=16, seed=1234)
    prompt = "Tell me a story about a dragon."
    alone = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
    others, other_params = _random_others(10, seed=3)
    batch = llm.generate(
        others[:5] + [prompt] + others[5:],
        other_params[:5] + [sp] + other_params[5:],
        use_tqdm=False,
    )
    assert batch[5].outputs[0].token_ids == alone
    other_seed = llm.generate(
        [prompt],
        SamplingParams(temperature=0.9, top_p=0.9, top_k=50, max_tokens=16, seed=4321),
        use_tqdm=False,
    )
    assert other_seed[0].outputs[0].token_ids != alone


def test_stop_string_excluded_and_matched_across_tokens(llm: LLM) -> None:
    prompt = "The three primary colours are"
    full = llm.generate([prompt], _greedy(30), use_tqdm=False)[0].outputs[0]
    text = full.text
    # A stop string that spans the boundary between two tokens.
    tok = llm.get_tokenizer()
    pieces = [tok.decode(full.token_ids[: i + 1]) for i in range(len(full.token_ids))]
    cut = next(i for i in range(3, len(pieces)) if len(pieces[i]) - len(pieces[i - 1]) >= 2)
    boundary = len(pieces[cut - 1])
    stop = text[boundary - 1 : boundary + 1]
    out = llm.generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=30, stop=[stop]), use_tqdm=False
    )[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]
    keep = llm.generate(
        [prompt],
        SamplingParams(
            temperature=0.0, max_tokens=30, stop=[stop], include_stop_str_in_output=True
        ),
        use_tqdm=False,
    )[0].outputs[0]
    assert keep.text == text[: text.index(stop) + len(stop)]


def test_min_tokens_and_ignore_eos(llm: LLM) -> None:
    msgs = [{"role": "user", "content": "Reply with just the word yes."}]
    short = llm.chat(msgs, SamplingParams(temperature=0.0, max_tokens=60), use_tqdm=False)[0]
    n_short = len(short.outputs[0].token_ids)
    assert short.outputs[0].finish_reason == "stop" and n_short < 30
    assert short.outputs[0].token_ids[-1] == 2  # EOS ends it
    longer = llm.chat(
        msgs, SamplingParams(temperature=0.0, max_tokens=60, min_tokens=n_short + 5), use_tqdm=False
    )[0].outputs[0]
    assert len(longer.token_ids) >= n_short + 5
    assert 2 not in longer.token_ids[: n_short + 4]
    ign = llm.chat(
        msgs, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True), use_tqdm=False
    )[0].outputs[0]
    assert len(ign.token_ids) == 40 and ign.finish_reason == "length"


def test_n_greater_than_one_shares_prompt_blocks() -> None:
    llm2 = LLM(enable_prefix_caching=False, max_model_len=512, kv_cache_gb=0.1, log=False)
    runner = llm2.llm_engine.engine_core.runner
    executed = []
    orig = runner.execute_model

    def counting(so):
        executed.append(so.total_num_scheduled_tokens)
        return orig(so)

    runner.execute_model = counting
    prompt = list(range(1000, 1040))  # 40 tokens: 2 full blocks + 8
    outs = llm2.generate(
        [prompt],
        SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=5, ignore_eos=True),
        use_tqdm=False,
    )
    assert len(outs) == 1 and [c.index for c in outs[0].outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 5 for c in outs[0].outputs)
    assert len({tuple(c.token_ids) for c in outs[0].outputs}) > 1
    # 40 prompt tokens once, 8 recomputed per child (2 shared blocks), 4 decodes x 3.
    assert sum(executed) == 40 + 2 * 8 + 3 * 4
    greedy = llm2.generate(
        [prompt], SamplingParams(n=2, temperature=0.0, max_tokens=6), use_tqdm=False
    )[0]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids


def test_logprobs_match_hf(llm: LLM) -> None:
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    ids = _ids(llm, ["The capital of France is"])[0]
    out = llm.generate(
        [ids],
        SamplingParams(temperature=0.0, max_tokens=4, logprobs=3, prompt_logprobs=2),
        use_tqdm=False,
    )[0]
    seq = ids + out.outputs[0].token_ids
    with torch.inference_mode():
        ref = torch.log_softmax(hf(torch.tensor([seq])).logits[0].float(), -1)
    for j, pos in enumerate(out.outputs[0].logprobs):
        p = len(ids) - 1 + j
        tok = seq[p + 1]
        assert abs(pos[tok].logprob - ref[p, tok].item()) < 1e-3
        assert pos[tok].rank == 1  # greedy: the sampled token is the most likely
        top = torch.topk(ref[p], 3).indices.tolist()
        assert set(top) <= set(pos)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for p in range(1, len(ids)):
        lp = out.prompt_logprobs[p][ids[p]].logprob
        assert abs(lp - ref[p - 1, ids[p]].item()) < 1e-3


def test_outputs_carry_timings_and_finish_reasons(llm: LLM) -> None:
    out = llm.generate(["Hello"], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)[0]
    m = out.metrics
    assert m is not None and m.arrival_time <= m.first_token_time <= m.finished_time
    assert out.finished and out.outputs[0].finish_reason == "length"


@pytest.mark.parametrize(
    "kwargs,param",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": -2}, "top_k"),
        ({"n": 0}, "n"),
    ],
)
def test_bad_sampling_params_rejected(kwargs: dict, param: str) -> None:
    with pytest.raises(ValueError, match=param):
        SamplingParams(**kwargs)


def test_bad_prompts_rejected_and_engine_keeps_serving(llm: LLM) -> None:
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([""], use_tqdm=False)
    with pytest.raises(ValueError, match=r"out of vocabulary.*\[0, 49152\)"):
        llm.generate([[1, 2, 10**6]], use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([[5] * 2000], use_tqdm=False)
    # A bad request in a batch rejects the call; nothing of it is left running.
    with pytest.raises(ValueError):
        llm.generate(["fine prompt", ""], use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    out = llm.generate(["Hello"], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2


def test_missing_model_path_rejected() -> None:
    with pytest.raises(ValueError, match="does not exist"):
        LLM(model="/nonexistent/model/dir", log=False)
