"""Speculative decoding with the rest of the engine: the real default model, the
priority policy, async scheduling, and tensor and pipeline parallelism.

Each case compares greedy outputs with the same engine without speculation.
"""

from __future__ import annotations

import random

import pytest
import torch
from model_utils import DEFAULT_MODEL_PROMPTS, randomize_

from kvasir import LLM, SamplingParams

transformers = pytest.importorskip("transformers")


def _tokens(outs: list) -> list[list[int]]:
    return [c.token_ids for o in outs for c in o.outputs]


@pytest.fixture(scope="module")
def default_reference() -> list[list[int]]:
    llm = LLM(log=False, max_model_len=512)
    outs = llm.generate(
        _default_prompts(), SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False
    )
    return _tokens(outs)


def _default_prompts() -> list[str]:
    text = "one two three four five six seven eight nine ten. "
    return DEFAULT_MODEL_PROMPTS[:4] + [f"Repeat after me: {text * 3}Repeat after me: one"]


@pytest.mark.parametrize(
    "spec",
    [
        {"method": "ngram", "num_speculative_tokens": 4},
        {"method": "self_spec", "num_speculative_tokens": 2, "num_layers": 20},
    ],
    ids=lambda s: s["method"],
)
def test_default_model_greedy_is_lossless(spec: dict, default_reference: list) -> None:
    llm = LLM(log=False, max_model_len=512, speculative_config=spec)
    outs = llm.generate(
        _default_prompts(), SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False
    )
    assert _tokens(outs) == default_reference
    stats = llm.llm_engine.engine_core.scheduler.make_stats()
    assert stats.spec_num_accepted_tokens > 0


def _tiny_workload(seed: int, num: int) -> tuple[list[list[int]], list[SamplingParams], list[int]]:
    rng = random.Random(seed)
    prompts, params, prio = [], [], []
    for _ in range(num):
        chunk = [rng.randrange(3, 250) for _ in range(rng.randint(2, 8))]
        prompts.append((chunk * 5)[: rng.randint(3, 40)])
        params.append(SamplingParams(temperature=0.0, max_tokens=rng.randint(4, 30)))
        prio.append(rng.randint(0, 3))
    return prompts, params, prio


def test_priority_policy_with_preemption_is_lossless() -> None:
    prompts, params, prio = _tiny_workload(0, 16)
    kw = dict(model="tiny-llama", load_format="dummy", max_model_len=128, log=False,
              scheduling_policy="priority", num_gpu_blocks_override=16)  # fmt: skip
    ref = LLM(**kw).generate(prompts, params, use_tqdm=False, priority=prio)
    llm = LLM(speculative_config={"method": "ngram", "num_speculative_tokens": 3}, **kw)
    outs = llm.generate(prompts, params, use_tqdm=False, priority=prio)
    assert _tokens(outs) == _tokens(ref)
    sched = llm.llm_engine.engine_core.scheduler
    assert sched.num_preemptions > 0 and sched.kv_cache_manager.usage == 0.0


def test_async_scheduling_flag_gives_the_same_outputs() -> None:
    # Speculation decides the next step's positions from this step's accepted count, so
    # the engine runs its steps one at a time; the flag is accepted and changes nothing.
    prompts, params, _ = _tiny_workload(1, 10)
    kw = dict(model="tiny-llama", load_format="dummy", max_model_len=128, log=False)
    ref = LLM(**kw).generate(prompts, params, use_tqdm=False)
    spec = {"method": "ngram", "num_speculative_tokens": 3}
    llm = LLM(async_scheduling=True, speculative_config=spec, **kw)
    assert llm.llm_engine.engine_core.async_scheduling is False
    assert _tokens(llm.generate(prompts, params, use_tqdm=False)) == _tokens(ref)


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory) -> str:
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    randomize_(hf, seed=3)
    path = tmp_path_factory.mktemp("spec_tp")
    hf.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2)])
def test_ngram_under_tensor_and_pipeline_parallelism(hf_checkpoint: str, tp: int, pp: int) -> None:
    prompts, params, _ = _tiny_workload(2, 8)
    kw = dict(model=hf_checkpoint, max_model_len=128, log=False, max_num_batched_tokens=32,
              block_size=8)  # fmt: skip
    ref = LLM(**kw).generate(prompts, params, use_tqdm=False)
    spec = {"method": "ngram", "num_speculative_tokens": 3}
    llm = LLM(tensor_parallel_size=tp, pipeline_parallel_size=pp, distributed_timeout=30.0,
              speculative_config=spec, **kw)  # fmt: skip
    try:
        assert _tokens(llm.generate(prompts, params, use_tqdm=False)) == _tokens(ref)
        assert llm.llm_engine.engine_core.scheduler.make_stats().spec_num_draft_tokens > 0
    finally:
        llm.llm_engine.engine_core.shutdown()


def test_model_proposer_with_pipeline_parallelism_is_refused(hf_checkpoint: str) -> None:
    spec = {"method": "self_spec", "num_layers": 1}
    with pytest.raises(ValueError, match="speculative_config.method"):
        LLM(model=hf_checkpoint, pipeline_parallel_size=2, speculative_config=spec, log=False)
