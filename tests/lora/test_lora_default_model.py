"""Multi-LoRA on the real default model (SmolLM2-135M-Instruct, GGUF dequantised at
load) against HF transformers (the same GGUF) + peft: two random adapters and the base
in one batch, greedy tokens identical and logprobs within 1e-4 relative.
Slow-marked (an HF and a kvasir copy of the model on a loaded 2-core VM): make test-slow."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from kvasir import LLM, LoRARequest, SamplingParams
from kvasir.models.default import default_model_path
from tests.lora.lora_utils import greedy, save_random_adapter

N = 6


@pytest.mark.slow
def test_default_model_adapters_match_hf_peft(tmp_path):
    import peft
    import transformers

    path = default_model_path()
    d, f = os.path.dirname(path), os.path.basename(path)

    def load_gguf():
        return transformers.AutoModelForCausalLM.from_pretrained(
            d, gguf_file=f, dtype=torch.float32
        ).eval()

    cfgs = {
        "attn": peft.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]),
        "mlp": peft.LoraConfig(r=8, lora_alpha=8, target_modules=["gate_proj", "down_proj"]),
    }
    ids = [504, 3575, 282, 4649, 314, 1345, 30, 216]
    base = load_gguf()
    refs = [greedy(base, ids, N)]
    loras = []
    for i, (name, cfg) in enumerate(cfgs.items()):
        out = str(tmp_path / name)
        save_random_adapter(d, out, cfg, seed=50 + i, base_model=copy.deepcopy(base))
        loras.append(LoRARequest(name, i + 1, out))
        model = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
        refs.append(greedy(model, ids, N))
        del model
    del base
    assert refs[1][0] != refs[0][0] or refs[2][0] != refs[0][0]
    llm = LLM(enable_lora=True, max_loras=2, max_model_len=256, kv_cache_gb=0.05, log=False)
    sp = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True, logprobs=2)
    outs = llm.generate([ids] * 3, sp, use_tqdm=False, lora_request=[None, *loras])
    for out, (tokens, logits) in zip(outs, refs, strict=True):
        assert out.outputs[0].token_ids == tokens
        ref = torch.log_softmax(logits.double(), -1)
        for step, pos in enumerate(out.outputs[0].logprobs):
            for t, lp in pos.items():
                want = float(ref[step, t])
                assert abs(lp.logprob - want) <= 1e-4 * max(1.0, abs(want)), (step, t)
