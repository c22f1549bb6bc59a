"""Test helpers: tiny random base models and random PEFT adapters built with ``peft``."""

from __future__ import annotations

import math

import torch


def save_tiny_qwen2(path: str, vocab_size: int = 256, seed: int = 0) -> object:
    """A tiny random ``Qwen2ForCausalLM`` (q/k/v bias) saved under ``path``."""
    import transformers

    from tests.model_utils import randomize_

    cfg = transformers.Qwen2Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(seed)
    hf = transformers.Qwen2ForCausalLM(cfg).eval()
    randomize_(hf, seed=seed)
    hf.save_pretrained(path)
    return hf


def load_hf(model_dir: str):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, torch_dtype=torch.float32, attn_implementation="eager"
    ).eval()


def save_random_adapter(
    model_dir: str, out_dir: str, peft_config, seed: int, base_model=None
) -> None:
    """``peft_config`` applied to the base in ``model_dir`` with random adapter weights
    of the base's scale (so an adapter visibly changes the output), saved as PEFT
    safetensors under ``out_dir`` (``base_model``: an HF model to use instead of loading
    ``model_dir``; it is modified)."""
    import peft

    model = peft.get_peft_model(base_model or load_hf(model_dir), peft_config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]) * 0.5)
            elif "ia3_l" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    model.save_pretrained(out_dir)


def greedy(model, prompt: list[int], max_tokens: int):
    """Greedy tokens and each step's float32 logits of an HF model (no KV cache)."""
    ids = list(prompt)
    tokens, logits = [], []
    with torch.no_grad():
        for _ in range(max_tokens):
            out = model(torch.tensor([ids])).logits[0, -1].float()
            t = int(out.argmax())
            tokens.append(t)
            logits.append(out)
            ids.append(t)
    return tokens, torch.stack(logits)


def hf_greedy(model_dir: str, adapter_dir: str | None, prompt: list[int], max_tokens: int):
    """Greedy tokens and each step's float32 logits from HF transformers (+ peft)."""
    model = load_hf(model_dir)
    if adapter_dir is not None:
        import peft

        model = peft.PeftModel.from_pretrained(model, adapter_dir).eval()
    return greedy(model, prompt, max_tokens)
