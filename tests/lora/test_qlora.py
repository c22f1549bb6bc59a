"""QLoRA: a LoRA adapter unmerged over a 4-bit NF4 base (``--quantization bitsandbytes``,
quantised at load by ``kvasir.quantization.bnb``). The reference is HF transformers +
peft running the base's dequantised NF4 weights (what a QLoRA adapter is trained
against); no dequantised copy of the base stays in the engine, and merging is refused."""

from __future__ import annotations

import torch

from kvasir import LLM, LoRARequest, SamplingParams
from tests.lora.lora_utils import greedy, load_hf, save_random_adapter
from tests.model_utils import save_tiny_llama

PROMPT = [5, 17, 33, 9, 100, 41, 7, 64]
N = 6


def test_lora_over_nf4_base_matches_hf_peft_on_dequantised_weights(tmp_path):
    import peft

    base = str(tmp_path / "base")
    save_tiny_llama(base, seed=11)
    adapter = str(tmp_path / "qlora")
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    save_random_adapter(base, adapter, cfg, seed=12)
    llm = LLM(model=base, quantization="bitsandbytes", enable_lora=True, max_loras=2,
              lora_strategy="merged", max_model_len=64, kv_cache_gb=0.01, block_size=4,
              log=False)  # fmt: skip
    manager = llm.llm_engine.engine_core.lora_manager
    assert not manager.can_merge  # a 4-bit base runs unmerged even when merged is asked
    # The reference: HF's Llama with the engine's dequantised NF4 weights, plus peft.
    hf = load_hf(base)
    state = {}
    for layer in manager.layers:
        base_layer = layer.base_layer
        assert not any(p.is_floating_point() and p.dim() == 2 for p in base_layer.parameters())
        w = base_layer.method.dequantized_weight(base_layer)  # [out, in] in shard order
        for name, part in zip(layer.sub_names, w.split(layer.out_sizes), strict=True):
            state[name + ".weight"] = part
    missing = set(state) - set(hf.state_dict())
    assert not missing, missing
    hf.load_state_dict(state, strict=False)
    ref_base = greedy(hf, PROMPT, N)
    hf_lora = peft.PeftModel.from_pretrained(hf, adapter).eval()
    ref_lora = greedy(hf_lora, PROMPT, N)
    assert ref_lora[0] != ref_base[0]
    sp = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True, logprobs=2)
    outs = llm.generate([PROMPT, PROMPT], sp, use_tqdm=False,
                        lora_request=[LoRARequest("q", 1, adapter), None])  # fmt: skip
    for out, (tokens, logits) in zip(outs, (ref_lora, ref_base), strict=True):
        assert out.outputs[0].token_ids == tokens
        ref = torch.log_softmax(logits.double(), -1)
        for step, pos in enumerate(out.outputs[0].logprobs):
            for t, lp in pos.items():
                want = float(ref[step, t])
                assert abs(lp.logprob - want) <= 1e-4 * max(1.0, abs(want))
    assert manager.stats()["merged_steps"] == 0
