"""bitsandbytes 4-bit: a checkpoint of a tiny random Llama whose weights bitsandbytes
itself quantised (NF4 and FP4, double-quantised absmax), saved with the tensor names HF
transformers writes, loaded by kvasir against HF transformers on bitsandbytes'
dequantised weights; and ``--quantization bitsandbytes`` (NF4 at load)."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
bnb_f = pytest.importorskip("bitsandbytes.functional")
from safetensors.torch import save_file  # noqa: E402

PROMPT = [3, 17, 92, 5, 200, 41, 77, 8, 150, 23, 64, 99]
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _tiny_hf():
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
    return model


def _logprobs_hf(model) -> torch.Tensor:  # noqa: ANN001
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([PROMPT])).logits[0].double(), -1)
    return torch.tensor([lp[p - 1, PROMPT[p]].item() for p in range(1, len(PROMPT))])


def _logprobs_kvasir(path: str, **kw) -> torch.Tensor:
    from kvasir.entrypoints.llm import LLM
    from kvasir.sampling_params import SamplingParams

    llm = LLM(model=path, max_model_len=64, kv_cache_gb=0.01, log=False, **kw)
    try:
        out = llm.generate([PROMPT], SamplingParams(max_tokens=1, prompt_logprobs=0),
                           use_tqdm=False)  # fmt: skip
    finally:
        llm.llm_engine.engine_core.shutdown()
    lps = out[0].prompt_logprobs
    return torch.tensor([lps[p][PROMPT[p]].logprob for p in range(1, len(PROMPT))])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bnb_checkpoint_matches_dequantised_reference(tmp_path, quant_type) -> None:
    model = _tiny_hf()
    state, ref_state = {}, {}
    for name, t in model.state_dict().items():
        module = name.rpartition(".")[0]
        if name.endswith(".weight") and module.rpartition(".")[2] in _LINEARS:
            q, st = bnb_f.quantize_4bit(t, blocksize=64, compress_statistics=True,
                                        quant_type=quant_type)  # fmt: skip
            state[name] = q
            for key, value in st.as_dict(packed=True).items():
                state[f"{name}.{key}"] = value
            ref_state[name] = bnb_f.dequantize_4bit(q, st).float()
        else:
            state[name] = t.contiguous()
            ref_state[name] = t
    save_file(state, str(tmp_path / "model.safetensors"))
    cfg = model.config.to_dict()
    cfg["quantization_config"] = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "float32",
    }  # fmt: skip
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    ref = transformers.LlamaForCausalLM(model.config).eval()
    ref.load_state_dict(ref_state)
    got, want = _logprobs_kvasir(str(tmp_path)), _logprobs_hf(ref)
    assert torch.allclose(got, want.float(), atol=2e-4), (got - want).abs().max()
    assert (want - _logprobs_hf(model)).abs().max() > 1e-3  # the quantisation is real


def test_online_nf4_matches_its_dequantised_weights(tmp_path) -> None:
    from kvasir.kernels.nf4 import dequantize_nf4, quantize_nf4

    model = _tiny_hf()
    model.save_pretrained(tmp_path)
    ref = _tiny_hf()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith(".weight") and name.rpartition(".")[0].rpartition(".")[2] in _LINEARS:
                p.copy_(dequantize_nf4(quantize_nf4(p.data)))
    # q/k/v and gate/up are fused in kvasir but quantised part by part, as HF does.
    got = _logprobs_kvasir(str(tmp_path), quantization="bitsandbytes")
    assert torch.allclose(got, _logprobs_hf(ref).float(), atol=2e-4)


def test_bnb_refusals(tmp_path) -> None:
    from kvasir.quantization.bnb import BitsAndBytesConfig

    dev = torch.device("cpu")
    with pytest.raises(ValueError, match="load_in_4bit must be true"):
        BitsAndBytesConfig.from_checkpoint({"load_in_8bit": True}, dev)
    with pytest.raises(ValueError, match=r"bnb_4bit_quant_type must be one of \['nf4', 'fp4'\]"):
        BitsAndBytesConfig.from_checkpoint({"load_in_4bit": True, "bnb_4bit_quant_type": "x"}, dev)
    with pytest.raises(ValueError, match="use_double_quant must be true"):
        BitsAndBytesConfig.from_checkpoint(
            {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, dev
        )
