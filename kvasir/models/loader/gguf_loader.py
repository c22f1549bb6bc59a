"""GGUF checkpoints (llama.cpp): metadata -> ModelArchConfig, tensors dequantized to
float and renamed to HF names, llama.cpp's q/k row permutation undone, and the HF
tokenizer rebuilt from the vocabulary. All three share one parse of the file."""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kvasir.config import ModelArchConfig
from kvasir.layers.rotary_embedding import compute_inv_freq
from kvasir.models.loader.gguf_reader import GGUFFile, GGUFTensor, dequantize, read_gguf

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# GGUF `general.architecture` -> (HF architecture, HF model_type)
_ARCHS = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "mamba": ("MambaForCausalLM", "mamba"),
    "mamba2": ("Mamba2ForCausalLM", "mamba2"),
}
_SSM_ARCHS = ("mamba", "mamba2")
# State-space GGUF names (the gguf package's MODEL_TENSOR.SSM_*) -> HF mixer names.
_SSM_GLOBAL_NAMES = {
    "token_embd.weight": "backbone.embeddings.weight",
    "output_norm.weight": "backbone.norm_f.weight",
    "output.weight": "lm_head.weight",
}
_SSM_LAYER_NAMES = {
    "attn_norm.weight": "norm.weight",
    "ssm_in.weight": "mixer.in_proj.weight",
    "ssm_in.bias": "mixer.in_proj.bias",
    "ssm_conv1d.weight": "mixer.conv1d.weight",
    "ssm_conv1d.bias": "mixer.conv1d.bias",
    "ssm_x.weight": "mixer.x_proj.weight",
    "ssm_dt.weight": "mixer.dt_proj.weight",
    "ssm_dt.bias": "mixer.dt_proj.bias",  # Mamba-2: its dt_bias
    "ssm_a": "mixer.A_log",
    "ssm_d": "mixer.D",
    "ssm_norm.weight": "mixer.norm.weight",
    "ssm_out.weight": "mixer.out_proj.weight",
    "ssm_out.bias": "mixer.out_proj.bias",
}
_SSM_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+(?:\.weight|\.bias)?)")
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


def open_gguf(path: str) -> GGUFFile:
    """The parsed GGUF file at ``path`` (parsed once per process, tensors memory-mapped);
    ValueError naming the file if it is not a readable GGUF file."""
    return read_gguf(path)


def _field(gguf: GGUFFile, key: str, default: Any = None) -> Any:
    return gguf.metadata.get(key, default)


def _rope_scaling(
    gguf: GGUFFile, arch: str, path: str, head_dim: int, theta: float
) -> dict[str, Any] | None:
    kind = _field(gguf, f"{arch}.rope.scaling.type")
    factor = _field(gguf, f"{arch}.rope.scaling.factor")
    if kind == "linear" and factor:
        return {"rope_type": "linear", "factor": float(factor)}
    if kind not in (None, "none") and factor not in (None, 1.0):
        raise ValueError(f"GGUF file '{path}': rope scaling {kind!r} is not supported")
    rope_freqs = gguf.tensor_map.get(_ROPE_FREQS)
    if rope_freqs is None:
        return None
    # llama.cpp divides each frequency by rope_freqs[i]; recover HF's llama3 parameters
    # (the long-wavelength divisor is `factor`) and check they reproduce the divisors.
    divisors = torch.from_numpy(dequantize(rope_freqs, path))
    original_ctx = _field(gguf, f"{arch}.rope.scaling.original_context_length", 8192)
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


def gguf_arch_config(gguf: GGUFFile, path: str) -> ModelArchConfig:
    """ModelArchConfig from GGUF metadata (llama, qwen2, qwen3 architectures)."""
    arch = _field(gguf, "general.architecture")
    if arch not in _ARCHS:
        raise ValueError(
            f"GGUF architecture {arch!r} of '{path}' not supported; supported: {list(_ARCHS)}"
        )
    hf_arch, model_type = _ARCHS[arch]
    names = gguf.tensor_map
    if "token_embd.weight" not in names:
        raise ValueError(f"GGUF file '{path}' has no token_embd.weight tensor")
    if arch in _SSM_ARCHS:
        return _ssm_arch_config(gguf, path, arch, hf_arch)

    def key(name: str, default: Any = None) -> Any:
        value = _field(gguf, f"{arch}.{name}", default)
        if value is None:
            raise ValueError(f"GGUF file '{path}' lacks metadata '{arch}.{name}'")
        return value

    hidden_size = int(key("embedding_length"))
    num_heads = int(key("attention.head_count"))
    head_dim = _field(gguf, f"{arch}.attention.key_length")
    if head_dim is None and arch == "llama":
        head_dim = _field(gguf, "llama.rope.dimension_count")
    head_dim = int(head_dim or hidden_size // num_heads)
    theta = float(key("rope.freq_base", 10000.0))
    eos = [_field(gguf, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    return ModelArchConfig(
        architectures=(hf_arch,),
        # The embedding's row count is the truth; `vocab_size` metadata is optional.
        vocab_size=int(names["token_embd.weight"].shape[0]),
        hidden_size=hidden_size,
        intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=int(key("block_count")),
        num_attention_heads=num_heads,
        num_key_value_heads=int(key("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=theta,
        rope_scaling=_rope_scaling(gguf, arch, path, head_dim, theta),
        max_position_embeddings=int(key("context_length")),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        bos_token_id=_field(gguf, "tokenizer.ggml.bos_token_id"),
        eos_token_id=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
        model_type=model_type,
    )


def _ssm_arch_config(gguf: GGUFFile, path: str, arch: str, hf_arch: str) -> ModelArchConfig:
    """Mamba / Mamba-2 from llama.cpp's ``{arch}.ssm.*`` metadata (through the same
    HF-config reader, so the checks are the same)."""
    from kvasir.models.loader.hf_config import arch_config_from_hf

    def key(name: str) -> Any:
        value = _field(gguf, f"{arch}.{name}")
        if value is None:
            raise ValueError(f"GGUF file '{path}' lacks metadata '{arch}.{name}'")
        return value

    names = gguf.tensor_map
    hidden = int(key("embedding_length"))
    inner = int(key("ssm.inner_size"))
    cfg: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": arch,
        "vocab_size": int(names["token_embd.weight"].shape[0]),
        "hidden_size": hidden,
        "num_hidden_layers": int(key("block_count")),
        "state_size": int(key("ssm.state_size")),
        "conv_kernel": int(key("ssm.conv_kernel")),
        "intermediate_size": inner,
        "expand": inner // hidden,
        "layer_norm_epsilon": float(_field(gguf, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "max_position_embeddings": int(_field(gguf, f"{arch}.context_length", 1 << 20)),
        "tie_word_embeddings": "output.weight" not in names,
        "use_bias": "blk.0.ssm_in.bias" in names,
        "use_conv_bias": "blk.0.ssm_conv1d.bias" in names,
        "bos_token_id": _field(gguf, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(gguf, "tokenizer.ggml.eos_token_id"),
    }
    if arch == "mamba":
        cfg["time_step_rank"] = int(key("ssm.time_step_rank"))
    else:
        heads = int(names["blk.0.ssm_a"].shape[0])  # one A per head
        cfg.update(num_heads=heads, head_dim=inner // heads, n_groups=int(key("ssm.group_count")))
    return arch_config_from_hf(cfg)


def _ssm_tensor(name: str, weight: np.ndarray, arch_config: ModelArchConfig) -> np.ndarray:
    """llama.cpp's conversions undone: A stored as -exp(A_log), the conv kernel squeezed
    to [channels, width], Mamba-2's D and A as [heads, 1] and its norm per group."""
    if name.endswith(".mixer.A_log"):
        a_log = np.log(-weight.astype(np.float32))
        return a_log.reshape(-1) if arch_config.ssm_version == 2 else a_log
    if name.endswith(".mixer.conv1d.weight") and weight.ndim == 2:
        return weight[:, None, :]
    if arch_config.ssm_version == 2 and (
        name.endswith(".mixer.D") or name.endswith(".mixer.norm.weight")
    ):
        return weight.reshape(-1)
    return weight


def _ssm_hf_name(name: str, arch_config: ModelArchConfig) -> str | None:
    if name in _SSM_GLOBAL_NAMES:
        return _SSM_GLOBAL_NAMES[name]
    m = _SSM_LAYER_RE.fullmatch(name)
    if m is None or m.group(2) not in _SSM_LAYER_NAMES:
        return None
    hf = _SSM_LAYER_NAMES[m.group(2)]
    if arch_config.ssm_version == 2 and hf == "mixer.dt_proj.bias":
        hf = "mixer.dt_bias"
    return f"backbone.layers.{m.group(1)}.{hf}"


def _unpermute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation (HF's interleaved->half-split RoPE layout)."""
    # rows [num_heads, head_dim // 2, 2] -> [num_heads, 2, head_dim // 2]; numpy, not
    # torch: a single-threaded copy does not stall when the CPU is oversubscribed.
    shape = weight.shape
    half = shape[0] // num_heads // 2
    rows = weight.reshape(num_heads, half, 2, *shape[1:]).swapaxes(1, 2)
    return np.ascontiguousarray(rows).reshape(shape)


def _unpermute_t(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    return torch.from_numpy(_unpermute(weight.numpy(), num_heads))


def gguf_hf_name(name: str) -> str | None:
    """HF tensor name for GGUF tensor ``name``, or None for tensors with no HF weight."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _LAYER_RE.fullmatch(name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        return None
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


# Decoder linear layers whose weights ``packed`` keeps in their block format.
_LINEAR_LEAVES = tuple(
    _LAYER_NAMES[k] for k in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                              "ffn_up", "ffn_down")
)  # fmt: skip


def _packed_linear(
    tensor: GGUFTensor, hf_name: str, path: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """``<module>.gguf_type`` and ``<module>.gguf_weight`` (``[N, row bytes]`` uint8,
    or float32 for float types) for ``kvasir.quantization.gguf_packed``."""
    from kvasir.quantization.gguf_packed import FLOAT_TYPES, check_packed_type

    check_packed_type(tensor.name, tensor.tensor_type, path)
    module = hf_name.rpartition(".")[0]
    yield f"{module}.gguf_type", torch.tensor([int(tensor.tensor_type)], dtype=torch.int64)
    if tensor.tensor_type in FLOAT_TYPES:
        yield f"{module}.gguf_weight", torch.from_numpy(dequantize(tensor, path))
    else:
        rows = tensor.shape[0]
        yield f"{module}.gguf_weight", torch.from_numpy(tensor.data.reshape(rows, -1).copy())


def iterate_gguf(
    gguf: GGUFFile, path: str, arch_config: ModelArchConfig, packed: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, float32 tensor)`` one dequantized tensor at a time; with
    ``packed``, the decoder's linear weights as they are stored (``_packed_linear``)."""
    permuted = _field(gguf, "general.architecture") == "llama"
    ssm = _field(gguf, "general.architecture") in _SSM_ARCHS
    for tensor in gguf.tensors:
        if tensor.name == _ROPE_FREQS:
            continue  # folded into arch_config.rope_scaling
        if ssm:
            hf_name = _ssm_hf_name(tensor.name, arch_config)
            if hf_name is None:
                raise ValueError(f"unexpected tensor {tensor.name!r} in GGUF file '{path}'")
            weight = _ssm_tensor(hf_name, dequantize(tensor, path), arch_config)
            yield hf_name, torch.from_numpy(np.ascontiguousarray(weight))
            continue
        hf_name = gguf_hf_name(tensor.name)
        if hf_name is None:
            raise ValueError(f"unexpected tensor {tensor.name!r} in GGUF file '{path}'")
        module = hf_name.rpartition(".")[0]
        if packed and hf_name.endswith(".weight") and module.endswith(_LINEAR_LEAVES):
            parts = list(_packed_linear(tensor, hf_name, path))
            if permuted and ".self_attn.q_proj." in hf_name:
                parts[1] = (parts[1][0], _unpermute_t(parts[1][1], arch_config.num_attention_heads))
            elif permuted and ".self_attn.k_proj." in hf_name:
                parts[1] = (parts[1][0], _unpermute_t(parts[1][1], arch_config.num_key_value_heads))
            yield from parts
            continue
        weight = dequantize(tensor, path)
        if permuted and ".self_attn.q_proj." in hf_name:
            weight = _unpermute(weight, arch_config.num_attention_heads)
        elif permuted and ".self_attn.k_proj." in hf_name:
            weight = _unpermute(weight, arch_config.num_key_value_heads)
        yield hf_name, torch.from_numpy(weight)


# Files that make `AutoTokenizer.from_pretrained(dir, gguf_file=...)` build the tokenizer
# (or pick its class) from the directory rather than from the GGUF metadata alone.
_HF_TOKENIZER_FILE_PREFIXES = (
    "tokenizer", "vocab", "merges", "special_tokens_map", "added_tokens", "chat_template",
    "additional_chat_templates", "tekken", "tiktoken",
)  # fmt: skip
# transformers.integrations.gguf.gguf_tokenizer_mapping._SPECIAL_TOKENS
_SPECIAL_TOKENS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


def _tokenizer_from_metadata(gguf: GGUFFile) -> PreTrainedTokenizerBase | None:
    """The tokenizer ``AutoTokenizer.from_pretrained(dir, gguf_file=name)`` builds, made
    from the already-parsed metadata the way transformers 5 does it (``get_gguf_tokenizer``
    + ``convert_gguf_tokenizer``, then the tokenizer class its GGUF config maps to), with
    none of its file reads. None where transformers would take another route: an
    architecture kvasir does not run, or tokenizer files beside the GGUF."""
    from transformers import TokenizersBackend
    from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    from transformers.models.auto.tokenization_auto import (
        TOKENIZER_MAPPING_NAMES,
        tokenizer_class_from_name,
    )

    meta = gguf.metadata
    arch = meta.get("general.architecture")
    # load_gguf_checkpoint turns a llama file named exactly "mistral" into a mistral config
    if arch not in _ARCHS or (arch == "llama" and meta.get("general.name") == "mistral"):
        return None
    directory = os.path.dirname(gguf.path)
    if any(f.startswith(_HF_TOKENIZER_FILE_PREFIXES) for f in os.listdir(directory)):
        return None
    class_name = TOKENIZER_MAPPING_NAMES.get(_ARCHS[arch][1])
    tokenizer_cls = tokenizer_class_from_name(class_name) if class_name else TokenizersBackend
    if tokenizer_cls is None or class_name == "MistralCommonBackend":
        return None

    # get_gguf_tokenizer: llama.cpp key names -> transformers names. Lists are copied: the
    # parsed metadata is cached and shared.
    grouped = {
        group: {
            name: list(meta[key]) if isinstance(meta[key], list) else meta[key]
            for short, name in renames.items()
            if (key := f"tokenizer.{short}") in meta
        }
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    tokenizer_type = tokenizer_dict.get("tokenizer_type")
    if tokenizer_type == "llama":
        tokenizer_config.setdefault("add_bos_token", True)
    elif tokenizer_type == "gemma4":
        tokenizer_config["add_bos_token"] = False
    for name, key in _SPECIAL_TOKENS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        tokenizer_config[name] = (
            tokenizer_dict["tokens"][token_id] if token_id is not None else None
        )

    backend, extra_kwargs = convert_gguf_tokenizer(arch, tokenizer_dict)
    tokenizer_config.update(extra_kwargs)
    # The kwargs PreTrainedTokenizerBase._from_pretrained hands the class for a local GGUF,
    # with the converted backend in place of `gguf_file` (which would re-read the file).
    return tokenizer_cls(
        tokenizer_object=backend,
        vocab_file=None,
        name_or_path=directory,
        is_local=True,
        local_files_only=False,
        added_tokens_decoder={},
        **tokenizer_config,
    )


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(path: str, mtime_ns: int, size: int) -> PreTrainedTokenizerBase:
    del mtime_ns, size  # cache key only: a rewritten file gets a new tokenizer
    try:
        tokenizer = _tokenizer_from_metadata(read_gguf(path))
        if tokenizer is not None:
            return tokenizer
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path)
        )
    except Exception as e:
        raise ValueError(f"cannot read the tokenizer of GGUF file '{path}': {e}") from e


def gguf_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The HF tokenizer of a GGUF file: equal to ``AutoTokenizer.from_pretrained(dir,
    gguf_file=name)``, built from the shared parse. Cached per (path, mtime, size)."""
    path = os.path.abspath(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise ValueError(f"cannot read the tokenizer of GGUF file '{path}': {e}") from e
    return _cached_tokenizer(path, st.st_mtime_ns, st.st_size)
