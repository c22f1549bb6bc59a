"""GGUF checkpoints (llama.cpp): metadata -> ModelArchConfig, tensors dequantized to
float and renamed to HF names, llama.cpp's q/k row permutation undone."""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from kvasir.config import ModelArchConfig
from kvasir.layers.rotary_embedding import compute_inv_freq

# GGUF `general.architecture` -> (HF architecture, HF model_type)
_ARCHS = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Llama 3.1+ GGUFs store the llama3 rope scaling only as per-frequency divisors.
_ROPE_FREQS = "rope_freqs.weight"
_LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}


def open_gguf(path: str) -> Any:
    """A ``gguf.GGUFReader`` over ``path`` (memory-mapped); ValueError naming the file if
    it is not a readable GGUF file."""
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises whatever numpy/struct raise on bad bytes
        raise ValueError(f"corrupt or unreadable GGUF file '{path}': {e}") from e


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _dequantize(tensor: Any, path: str) -> np.ndarray:
    from gguf.quants import dequantize

    try:
        return dequantize(tensor.data, tensor.tensor_type)
    except Exception as e:
        raise ValueError(
            f"cannot dequantize tensor {tensor.name!r} ({tensor.tensor_type.name}) "
            f"of GGUF file '{path}': {e}"
        ) from e


def _rope_scaling(
    reader: Any, arch: str, path: str, head_dim: int, theta: float
) -> dict[str, Any] | None:
    kind = _field(reader, f"{arch}.rope.scaling.type")
    factor = _field(reader, f"{arch}.rope.scaling.factor")
    if kind == "linear" and factor:
        return {"rope_type": "linear", "factor": float(factor)}
    if kind not in (None, "none") and factor not in (None, 1.0):
        raise ValueError(f"GGUF file '{path}': rope scaling {kind!r} is not supported")
    rope_freqs = next((t for t in reader.tensors if t.name == _ROPE_FREQS), None)
    if rope_freqs is None:
        return None
    # llama.cpp divides each frequency by rope_freqs[i]; recover HF's llama3 parameters
    # (the long-wavelength divisor is `factor`) and check they reproduce the divisors.
    divisors = torch.from_numpy(np.array(_dequantize(rope_freqs, path), dtype=np.float32))
    original_ctx = _field(reader, f"{arch}.rope.scaling.original_context_length", 8192)
    scaling = {
        "rope_type": "llama3",
        "factor": float(divisors.max()),
        **_LLAMA3_DEFAULTS,
        "original_max_position_embeddings": int(original_ctx),
    }
    base = compute_inv_freq(head_dim, theta)
    if not torch.allclose(base / divisors, compute_inv_freq(head_dim, theta, scaling), rtol=1e-4):
        raise ValueError(f"GGUF file '{path}': rope_freqs match no supported rope scaling")
    return scaling


def gguf_arch_config(reader: Any, path: str) -> ModelArchConfig:
    """ModelArchConfig from GGUF metadata (llama, qwen2, qwen3 architectures)."""
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHS:
        raise ValueError(
            f"GGUF architecture {arch!r} of '{path}' not supported; supported: {list(_ARCHS)}"
        )
    hf_arch, model_type = _ARCHS[arch]
    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise ValueError(f"GGUF file '{path}' has no token_embd.weight tensor")

    def key(name: str, default: Any = None) -> Any:
        value = _field(reader, f"{arch}.{name}", default)
        if value is None:
            raise ValueError(f"GGUF file '{path}' lacks metadata '{arch}.{name}'")
        return value

    hidden_size = int(key("embedding_length"))
    num_heads = int(key("attention.head_count"))
    head_dim = _field(reader, f"{arch}.attention.key_length")
    if head_dim is None and arch == "llama":
        head_dim = _field(reader, "llama.rope.dimension_count")
    head_dim = int(head_dim or hidden_size // num_heads)
    theta = float(key("rope.freq_base", 10000.0))
    eos = [_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    return ModelArchConfig(
        architectures=(hf_arch,),
        # The embedding's row count is the truth; `vocab_size` metadata is optional.
        vocab_size=int(names["token_embd.weight"].shape[1]),
        hidden_size=hidden_size,
        intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=int(key("block_count")),
        num_attention_heads=num_heads,
        num_key_value_heads=int(key("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=theta,
        rope_scaling=_rope_scaling(reader, arch, path, head_dim, theta),
        max_position_embeddings=int(key("context_length")),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
        model_type=model_type,
    )


def _unpermute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation (HF's interleaved->half-split RoPE layout)."""
    # rows [num_heads, head_dim // 2, 2] -> [num_heads, 2, head_dim // 2]
    shape = weight.shape
    half = shape[0] // num_heads // 2
    return weight.reshape(num_heads, half, 2, *shape[1:]).transpose(1, 2).reshape(shape)


def gguf_hf_name(name: str) -> str | None:
    """HF tensor name for GGUF tensor ``name``, or None for tensors with no HF weight."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _LAYER_RE.fullmatch(name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        return None
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def iterate_gguf(
    reader: Any, path: str, arch_config: ModelArchConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, float32 tensor)`` one dequantized tensor at a time."""
    permuted = _field(reader, "general.architecture") == "llama"
    for tensor in reader.tensors:
        if tensor.name == _ROPE_FREQS:
            continue  # folded into arch_config.rope_scaling
        hf_name = gguf_hf_name(tensor.name)
        if hf_name is None:
            raise ValueError(f"unexpected tensor {tensor.name!r} in GGUF file '{path}'")
        array = _dequantize(tensor, path)
        if not array.flags.writeable or array.dtype != np.float32:
            # Unquantized tensors come back as read-only views of the file mapping.
            array = np.array(array, dtype=np.float32)
        weight = torch.from_numpy(array)
        if permuted and ".self_attn.q_proj." in hf_name:
            weight = _unpermute(weight, arch_config.num_attention_heads)
        elif permuted and ".self_attn.k_proj." in hf_name:
            weight = _unpermute(weight, arch_config.num_key_value_heads)
        yield hf_name, weight


@functools.lru_cache(maxsize=4)
def gguf_tokenizer(path: str) -> Any:
    """The HF tokenizer built from a GGUF file's vocabulary, read the way transformers
    reads it. Cached per path: building it takes seconds."""
    from transformers import AutoTokenizer

    path = os.path.abspath(path)
    try:
        return AutoTokenizer.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path)
        )
    except Exception as e:
        raise ValueError(f"cannot read the tokenizer of GGUF file '{path}': {e}") from e
