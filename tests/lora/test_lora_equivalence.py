"""Multi-LoRA against HF transformers + peft: random LoRA (plain, rsLoRA, per-module
ranks) and (IA)^3 adapters built with ``peft`` on tiny random Llama and Qwen2 models;
one engine runs a batch mixing four adapters and the base model in the same steps,
with chunked prefill, preemption and prefix caching (the same prompt under every
adapter: KV must never be shared across adapters). Greedy tokens must be identical
and every step's logprobs within 1e-4 relative of HF's float32 log-softmax."""

from __future__ import annotations

import pytest
import torch

from kvasir import LLM, LoRARequest, SamplingParams
from tests.lora.lora_utils import hf_greedy, save_random_adapter, save_tiny_qwen2
from tests.model_utils import save_tiny_llama

MAX_TOKENS = 6


def _adapter_configs():
    import peft

    return {
        "attn": peft.LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
        ),
        "mlp_rs": peft.LoraConfig(
            r=4, lora_alpha=8, use_rslora=True, target_modules=["gate_proj", "up_proj", "down_proj"]
        ),
        "all_mixed": peft.LoraConfig(
            r=16,
            lora_alpha=24,
            rank_pattern={"v_proj": 2, "down_proj": 6},
            alpha_pattern={"down_proj": 3},
            target_modules="all-linear",
        ),  # fmt: skip
        "ia3": peft.IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
        ),
    }


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"lora_{request.param}")
    model_dir = str(root / "base")
    if request.param == "llama":
        save_tiny_llama(model_dir, seed=3)
    else:
        save_tiny_qwen2(model_dir, seed=4)
    adapters = {}
    for i, (name, cfg) in enumerate(_adapter_configs().items()):
        path = str(root / name)
        save_random_adapter(model_dir, path, cfg, seed=10 + i)
        adapters[name] = LoRARequest(name, i + 1, path)
    return model_dir, adapters


def _check_logprobs(out, hf_logits: torch.Tensor) -> None:
    ref = torch.log_softmax(hf_logits.double(), dim=-1)
    for step, pos in enumerate(out.outputs[0].logprobs):
        for token_id, lp in pos.items():
            want = float(ref[step, token_id])
            assert abs(lp.logprob - want) <= 1e-4 * max(1.0, abs(want)), (step, token_id)


def test_mixed_adapters_match_hf_peft(setup):
    model_dir, adapters = setup
    shared = [5, 17, 33, 9, 100, 41, 7, 64, 12, 250, 3, 77]  # every adapter: same prefix
    other = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]
    cases = [(None, shared), (None, other)]
    cases += [(lr, shared) for lr in adapters.values()]
    cases += [(adapters["attn"], other), (adapters["ia3"], other)]
    refs = []
    for lr, prompt in cases:
        refs.append(hf_greedy(model_dir, lr.lora_path if lr else None, prompt, MAX_TOKENS))
    base_tokens = refs[0][0]
    # The adapters are strong enough to change the greedy output (the test can fail).
    assert sum(r[0] != base_tokens for r in refs[2:6]) >= 3

    llm = LLM(
        model=model_dir, enable_lora=True, max_loras=4, max_cpu_loras=4, max_lora_rank=16,
        block_size=4, num_gpu_blocks_override=24, max_num_batched_tokens=16,
        max_model_len=64, enable_prefix_caching=True, log=False,
    )  # fmt: skip
    core = llm.llm_engine.engine_core
    manager = core.lora_manager
    mixes: list[tuple[int, bool]] = []
    prepare = manager.prepare_step

    def spy(step):
        ids = {s.lora_id for s in step.states}
        mixes.append((len(ids - {0}), 0 in ids))
        prepare(step)

    manager.prepare_step = spy
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=3)
    outs = llm.generate(
        [p for _, p in cases], sp, use_tqdm=False, lora_request=[lr for lr, _ in cases]
    )
    for (lr, _), out, (tokens, logits) in zip(cases, outs, refs, strict=True):
        assert out.outputs[0].token_ids == tokens, lr
        _check_logprobs(out, logits)
    assert core.scheduler.num_preemptions > 0
    assert (4, True) in mixes  # four adapters and the base in one step
    # Later requests: the shared prompt's blocks are cached per adapter and reused by
    # the same adapter only.
    attn = adapters["attn"]
    llm.generate([shared], sp, use_tqdm=False, lora_request=attn)
    hit = llm.generate([shared], sp, use_tqdm=False, lora_request=attn)[0]
    assert hit.num_cached_tokens > 0 and hit.outputs[0].token_ids == refs[2][0]
    miss = llm.generate([shared], sp, use_tqdm=False, lora_request=adapters["mlp_rs"])[0]
    assert miss.outputs[0].token_ids == refs[3][0]
    base = llm.generate([shared], sp, use_tqdm=False)[0]
    assert base.outputs[0].token_ids == base_tokens
