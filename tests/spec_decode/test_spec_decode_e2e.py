"""Speculative decoding end to end: every proposer is lossless for greedy requests.

The same engine with and without ``speculative_config`` must give token-identical
greedy outputs (and equal logprobs) over a crowded batch with chunked prefill, prefix
hits, n > 1, preemption and every sampling feature that changes the target
distribution per position (penalties, min_tokens, stop tokens); and the speculating
engine must really verify and accept drafts, and leak no KV blocks.
"""

from __future__ import annotations

import random

import pytest

from kvasir import LLM, SamplingParams

PROPOSERS = [
    {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3},
    {"method": "ngram", "num_speculative_tokens": "auto", "max_speculative_tokens": 4},
]


def _tiny(spec: dict | None, **kw) -> LLM:
    args = dict(model="tiny-llama", load_format="dummy", max_model_len=256, log=False)
    args.update(kw)
    return LLM(speculative_config=spec, **args)


def _greedy_workload(seed: int, num: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """Prompts that repeat themselves (so lookup finds matches) and greedy requests with
    the features that change the target per position."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(num):
        chunk = [rng.randrange(3, 1000) for _ in range(rng.randint(2, 12))]
        prompts.append((chunk * rng.randint(1, 6))[: rng.randint(1, 70)] or [5])
    params = [
        SamplingParams(
            temperature=0.0,
            max_tokens=rng.randint(6, 40),
            min_tokens=rng.choice([0, 0, 5]),
            stop_token_ids=rng.choice([None, None, [7, 9, 11]]),
            presence_penalty=rng.choice([0.0, 0.0, 0.5]),
            frequency_penalty=rng.choice([0.0, 0.0, 0.3]),
            repetition_penalty=rng.choice([1.0, 1.0, 1.2]),
            logprobs=rng.choice([None, None, 2]),
            n=rng.choice([1, 1, 1, 2]),
        )
        for _ in range(num)
    ]
    return prompts, params


def _summary(outs: list) -> list[tuple]:
    return [(c.token_ids, c.finish_reason, c.stop_reason) for o in outs for c in o.outputs]


def _assert_logprobs_close(a: list, b: list) -> None:
    for oa, ob in zip(a, b, strict=True):
        for ca, cb in zip(oa.outputs, ob.outputs, strict=True):
            assert (ca.logprobs is None) == (cb.logprobs is None)
            for pa, pb in zip(ca.logprobs or [], cb.logprobs or [], strict=True):
                assert pa.keys() == pb.keys()
                for k in pa:
                    assert abs(pa[k].logprob - pb[k].logprob) < 1e-4
                    assert pa[k].rank == pb[k].rank


@pytest.fixture(scope="module")
def reference() -> dict[str, list]:
    outs = {}
    prompts, params = _greedy_workload(0, 24)
    outs["crowded"] = _tiny(None, max_num_batched_tokens=64).generate(
        prompts, params, use_tqdm=False
    )
    prompts, params = _greedy_workload(1, 10)
    outs["preempt"] = _tiny(None, num_gpu_blocks_override=14).generate(
        prompts, params, use_tqdm=False
    )
    return outs


@pytest.mark.parametrize(
    "spec", PROPOSERS, ids=lambda s: f"{s['method']}-{s['num_speculative_tokens']}"
)
def test_greedy_crowded_batch_is_lossless(spec: dict, reference: dict) -> None:
    prompts, params = _greedy_workload(0, 24)
    llm = _tiny(spec, max_num_batched_tokens=64)  # chunked prefill, budget-cut drafts
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert _summary(outs) == _summary(reference["crowded"])
    _assert_logprobs_close(outs, reference["crowded"])
    sched = llm.llm_engine.engine_core.scheduler
    assert sched.kv_cache_manager.usage == 0.0
    stats = sched.make_stats()
    assert stats.spec_num_draft_tokens > 0 and stats.spec_num_accepted_tokens > 0
    assert stats.spec_num_accepted_tokens == sum(stats.spec_accepted_per_pos)
    # Per-request acceptance reaches the outputs (the JSON request log reads it).
    assert sum(o.metrics.num_accepted_tokens for o in outs if o.metrics) > 0


@pytest.mark.parametrize("spec", PROPOSERS[:1], ids=lambda s: s["method"])
def test_greedy_under_preemption_is_lossless(spec: dict, reference: dict) -> None:
    prompts, params = _greedy_workload(1, 10)
    llm = _tiny(spec, num_gpu_blocks_override=14)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert _summary(outs) == _summary(reference["preempt"])
    sched = llm.llm_engine.engine_core.scheduler
    assert sched.num_preemptions > 0
    assert sched.kv_cache_manager.usage == 0.0


def test_seeded_sampling_with_speculation_is_reproducible() -> None:
    prompts, _ = _greedy_workload(2, 6)
    params = [
        SamplingParams(temperature=0.9, seed=s, max_tokens=20, ignore_eos=True) for s in range(6)
    ]
    spec = PROPOSERS[0]
    a = _tiny(spec).generate(prompts, params, use_tqdm=False)
    b = _tiny(spec).generate(prompts[:3], params[:3], use_tqdm=False)  # another batch
    assert _summary(a)[:3] == _summary(b)
    assert all(len(c.token_ids) == 20 for o in a for c in o.outputs)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"method": "bogus"}, "speculative_config.method"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "speculative_config.num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": 99}, "speculative_config.num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": "many"}, "speculative_config.num_speculative_tokens"),
        ({"method": "ngram", "prompt_lookup_min": 3, "prompt_lookup_max": 2}, "speculative_config.prompt_lookup_min"),
        ({"method": "draft_model"}, "speculative_config.model"),
        ({"method": "ngram", "num_speculativ_tokens": 2}, "num_speculativ_tokens"),
        ({"num_speculative_tokens": 2}, "speculative_config.method"),
        ("{not json", "speculative_config"),
    ],
)  # fmt: skip
def test_bad_speculative_config_is_refused_naming_the_field(spec, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        _tiny(spec)


MODEL_PROPOSERS = [
    {"method": "self_spec", "num_speculative_tokens": 3, "num_layers": 1},
    {"method": "draft_model", "num_speculative_tokens": 3, "model": "tiny-llama",
     "load_format": "dummy"},
]  # fmt: skip


@pytest.mark.parametrize("spec", MODEL_PROPOSERS, ids=lambda s: s["method"])
def test_model_proposers_greedy_crowded_batch_is_lossless(spec: dict, reference: dict) -> None:
    prompts, params = _greedy_workload(0, 24)
    llm = _tiny(spec, max_num_batched_tokens=64)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert _summary(outs) == _summary(reference["crowded"])
    _assert_logprobs_close(outs, reference["crowded"])
    sched = llm.llm_engine.engine_core.scheduler
    assert sched.kv_cache_manager.usage == 0.0
    assert sched.make_stats().spec_num_draft_tokens > 0


IDENTICAL_DRAFTS = [
    # The same dummy checkpoint and seed: the draft is the target.
    {"method": "draft_model", "num_speculative_tokens": 4, "model": "tiny-llama",
     "load_format": "dummy"},
    # Every layer of the target (tiny-llama has 2): self-speculation drafts the target.
    {"method": "self_spec", "num_speculative_tokens": 4, "num_layers": 2},
]  # fmt: skip


@pytest.mark.parametrize("spec", IDENTICAL_DRAFTS, ids=lambda s: s["method"])
def test_draft_identical_to_target_accepts_everything(spec: dict) -> None:
    # Greedy drafts of a draft equal to the target are always the target's argmax: a
    # draft KV cache that lagged or held a wrong token would show as a rejection.
    prompts, _ = _greedy_workload(3, 6)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    llm = _tiny(spec)
    outs = llm.generate(prompts, params, use_tqdm=False)
    ref = _tiny(None).generate(prompts, params, use_tqdm=False)
    assert _summary(outs) == _summary(ref)
    stats = llm.llm_engine.engine_core.scheduler.make_stats()
    assert stats.spec_num_draft_tokens > 0
    assert stats.spec_num_accepted_tokens == stats.spec_num_draft_tokens


def test_draft_model_with_another_vocabulary_is_refused(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
    )  # fmt: skip
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(tmp_path))
    spec = {"method": "draft_model", "model": str(tmp_path), "num_speculative_tokens": 2}
    with pytest.raises(ValueError, match=r"speculative_config\.model .*512.*1024"):
        _tiny(spec)
    with pytest.raises(ValueError, match=r"speculative_config\.model"):
        _tiny({**spec, "model": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match=r"speculative_config\.num_layers"):
        _tiny({"method": "self_spec", "num_layers": 9})  # tiny-llama has 2 layers
