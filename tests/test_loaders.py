"""Loaders: the default GGUF model vs. HF's GGUF loading, synthetic GGUF files written
from HF models, sharded safetensors, dummy configs, and error messages."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from model_utils import PagedRunner

from kvasir.attention.backend import get_backend_cls
from kvasir.config import ModelConfig
from kvasir.models.default import DEFAULT_MODEL_NAME, default_model_path
from kvasir.models.loader import (
    available_dummy_configs,
    load_arch_config,
    load_model,
    load_tokenizer,
    resolve_model_path,
)
from kvasir.tokenizer import apply_chat_template, get_eos_token_ids

CPU = torch.device("cpu")
TORCH = get_backend_cls("torch")


def _load(model: str, **kw: Any) -> tuple[torch.nn.Module, Any]:
    mc = ModelConfig(model=model, **kw)
    arch = load_arch_config(mc)
    return load_model(mc, arch, TORCH, torch.float32, CPU), arch


# ---- the default model (SmolLM2-135M-Instruct Q4_1 GGUF) --------------------------------


@pytest.fixture(scope="module")
def gguf_path() -> str:
    return default_model_path()


@pytest.fixture(scope="module")
def hf_gguf_model(gguf_path: str) -> torch.nn.Module:
    # HF dequantizes and un-permutes the same file independently: our reference.
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def hf_gguf_tokenizer(gguf_path: str) -> Any:
    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path)
    )


@pytest.fixture(scope="module")
def ours_gguf(gguf_path: str) -> tuple[torch.nn.Module, Any]:
    return _load(gguf_path)


def test_default_model_path(gguf_path: str) -> None:
    assert gguf_path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(gguf_path)
    assert DEFAULT_MODEL_NAME == "SmolLM2-135M-Instruct"
    assert resolve_model_path(ModelConfig(model=gguf_path)) == (gguf_path, "gguf")
    assert resolve_model_path(ModelConfig(model=os.path.dirname(gguf_path))) == (gguf_path, "gguf")


def test_gguf_arch_config(ours_gguf: tuple[torch.nn.Module, Any]) -> None:
    _, arch = ours_gguf
    assert arch.architectures == ("LlamaForCausalLM",)
    assert (arch.num_hidden_layers, arch.hidden_size, arch.intermediate_size) == (30, 576, 1536)
    assert (arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim) == (9, 3, 64)
    assert arch.vocab_size == 49152 and arch.tie_word_embeddings
    assert arch.rope_theta == 100000.0 and arch.rope_scaling is None
    assert arch.max_position_embeddings == 8192
    assert math.isclose(arch.rms_norm_eps, 1e-5, rel_tol=1e-6)
    assert arch.bos_token_id == 1 and arch.eos_token_id == (2,)


def test_gguf_logits_match_hf(
    ours_gguf: tuple[torch.nn.Module, Any], hf_gguf_model: torch.nn.Module, hf_gguf_tokenizer: Any
) -> None:
    model, arch = ours_gguf
    ids = hf_gguf_tokenizer("The capital of France is Paris, and the capital of Italy is")[
        "input_ids"
    ]
    with torch.no_grad():
        ref = hf_gguf_model(torch.tensor([ids + [4, 9]])).logits[0]
    runner = PagedRunner(model, arch, num_blocks=16, block_size=16)
    runner.add_request("a")
    prefill = runner.step([("a", ids)])[0]
    decode = [runner.step([("a", [t])])[0] for t in (4, 9)]
    ours = torch.cat([prefill, *decode])
    torch.testing.assert_close(ours, ref, atol=1e-3, rtol=1e-4)
    assert ours[len(ids) - 1].argmax() == ref[len(ids) - 1].argmax()


def test_gguf_tokenizer(
    hf_gguf_tokenizer: Any, gguf_path: str, ours_gguf: tuple[torch.nn.Module, Any]
) -> None:
    mc = ModelConfig(model=gguf_path)
    tok = load_tokenizer(mc)
    assert load_tokenizer(mc) is tok  # cached per path: building it takes seconds
    for text in [
        "Hello, world!",
        "  leading spaces\nand\ttabs",
        "naïve café ☕ 日本語",
        "<|im_end|>",
    ]:
        assert tok(text)["input_ids"] == hf_gguf_tokenizer(text)["input_ids"]
        assert tok.decode(tok(text)["input_ids"]) == text
    messages = [{"role": "user", "content": "hi"}]
    ids = apply_chat_template(tok, messages)
    expected = hf_gguf_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True
    )["input_ids"]
    assert ids == list(expected)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    assert get_eos_token_ids(tok, ours_gguf[1]) == (2,)


# ---- synthetic GGUF files written from HF models ----------------------------------------


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py LlamaModel.permute: HF half-split -> interleaved rows
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


_GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _head_dim(c: Any) -> int:
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def write_gguf(hf: torch.nn.Module, path: Path, arch: str, rope_freqs: Any = None) -> None:
    """Write ``hf``'s weights and config as llama.cpp's converter would (F32 tensors)."""
    import gguf

    c = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(_head_dim(c))
    w.add_value_length(_head_dim(c))
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_eos_token_id(5)
    w.add_eot_token_id(6)
    for name, t in hf.state_dict().items():
        a = t.float().numpy().copy()
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            if c.tie_word_embeddings:
                continue
            gname = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            gname = f"blk.{layer}.{_GGUF_NAMES[module]}.{kind}"
            if arch == "llama" and module == "self_attn.q_proj":
                a = _llama_cpp_permute(a, c.num_attention_heads)
            if arch == "llama" and module == "self_attn.k_proj":
                a = _llama_cpp_permute(a, c.num_key_value_heads)
        w.add_tensor(gname, a)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _llama3_rope_freqs(theta: float, dim: int, rope: dict[str, float]) -> list[float]:
    # convert_hf_to_gguf.py LlamaModel.generate_extra_tensors
    factor = rope["factor"]
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    old_ctx = rope["original_max_position_embeddings"]
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def _tiny_hf(config_cls: Any, seed: int, **kw: Any) -> torch.nn.Module:
    config = config_cls(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        max_position_embeddings=256, attn_implementation="eager", **kw,
    )  # fmt: skip
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # unit-scale weights so layout bugs show up in the logits
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    return hf


def _compare_prefill(model: torch.nn.Module, arch: Any, hf: torch.nn.Module) -> None:
    ids = torch.randint(0, 128, (19,), generator=torch.Generator().manual_seed(0)).tolist()
    runner = PagedRunner(model, arch, num_blocks=16, block_size=4)
    runner.add_request("a")
    ours = torch.cat([runner.step([("a", ids[:11])])[0], runner.step([("a", ids[11:])])[0]])
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert ref.abs().max() > 0.5
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@pytest.mark.parametrize("variant", ["llama", "llama3-rope-freqs", "qwen2", "qwen3"])
def test_synthetic_gguf(variant: str, tmp_path: Path) -> None:
    rope_freqs = None
    if variant.startswith("llama"):
        kw: dict[str, Any] = dict(num_attention_heads=4, num_key_value_heads=2)
        if variant == "llama3-rope-freqs":
            kw["rope_parameters"] = dict(LLAMA3_ROPE, rope_theta=500000.0)
            rope_freqs = _llama3_rope_freqs(500000.0, 16, LLAMA3_ROPE)
        hf = _tiny_hf(transformers.LlamaConfig, 1, **kw)
        arch_name = "llama"
    elif variant == "qwen2":
        hf = _tiny_hf(transformers.Qwen2Config, 2, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=True)  # fmt: skip
        arch_name = "qwen2"
    else:
        hf = _tiny_hf(transformers.Qwen3Config, 3, num_attention_heads=4, num_key_value_heads=1,
                      head_dim=32, tie_word_embeddings=False)  # fmt: skip
        arch_name = "qwen3"
    path = tmp_path / "model.gguf"
    write_gguf(hf, path, arch_name, rope_freqs)
    model, arch = _load(str(path))
    assert arch.model_type == arch_name and arch.eos_token_id == (5, 6)
    assert arch.head_dim == _head_dim(hf.config)
    assert arch.attention_bias == (arch_name == "qwen2")
    assert arch.qk_norm == (arch_name == "qwen3")
    assert arch.tie_word_embeddings == hf.config.tie_word_embeddings
    if rope_freqs is not None:
        assert arch.rope_scaling == LLAMA3_ROPE
    _compare_prefill(model, arch, hf)


# ---- safetensors --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    hf = _tiny_hf(transformers.LlamaConfig, 4, num_attention_heads=4, num_key_value_heads=2)
    path = tmp_path_factory.mktemp("tiny")
    hf.save_pretrained(path)
    return hf, path


def test_sharded_safetensors(tmp_path: Path) -> None:
    hf = _tiny_hf(transformers.Qwen2Config, 5, num_attention_heads=4, num_key_value_heads=2)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    assert (tmp_path / "model.safetensors.index.json").exists()
    model, arch = _load(str(tmp_path))
    _compare_prefill(model, arch, hf)


def test_config_parsing_variants(tiny_hf_dir: tuple[Any, Path], tmp_path: Path) -> None:
    _, src = tiny_hf_dir
    cfg = json.loads((src / "config.json").read_text())
    # transformers 4 style: top-level rope_theta + rope_scaling, eos list, no head_dim
    old = dict(cfg, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, eos_token_id=[2, 7])
    old.pop("rope_parameters", None)
    old.pop("head_dim", None)
    (tmp_path / "config.json").write_text(json.dumps(old))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    arch = load_arch_config(ModelConfig(model=str(tmp_path), load_format="dummy"))
    assert arch.rope_theta == 500000.0 and arch.rope_scaling == LLAMA3_ROPE
    assert arch.eos_token_id == (2, 7, 9)
    assert arch.head_dim == 16
    # transformers 5 style: rope_theta inside rope_parameters
    new = dict(cfg, rope_parameters=dict(LLAMA3_ROPE, rope_theta=250000.0))
    (tmp_path / "config.json").write_text(json.dumps(new))
    arch = load_arch_config(ModelConfig(model=str(tmp_path / "config.json"), load_format="dummy"))
    assert arch.rope_theta == 250000.0 and arch.rope_scaling == LLAMA3_ROPE
    # sliding-window attention is not implemented: the context is capped to the window
    mistral = dict(cfg, model_type="mistral", sliding_window=64, max_position_embeddings=256)
    (tmp_path / "config.json").write_text(json.dumps(mistral))
    arch = load_arch_config(ModelConfig(model=str(tmp_path), load_format="dummy"))
    assert arch.max_position_embeddings == 64
    qwen2 = dict(cfg, model_type="qwen2", sliding_window=64, use_sliding_window=False)
    (tmp_path / "config.json").write_text(json.dumps(qwen2))
    arch = load_arch_config(ModelConfig(model=str(tmp_path), load_format="dummy"))
    assert arch.max_position_embeddings == cfg["max_position_embeddings"] and arch.attention_bias
    unsupported = dict(cfg, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1.0})
    (tmp_path / "config.json").write_text(json.dumps(unsupported))
    with pytest.raises(ValueError, match="rope_scaling type 'yarn' is not supported"):
        load_arch_config(ModelConfig(model=str(tmp_path), load_format="dummy"))


# ---- dummy configs --------------------------------------------------------------------------


def test_builtin_dummy_shapes() -> None:
    names = available_dummy_configs()
    for n in ("llama-3-8b", "llama-3.1-70b", "qwen3-0.6b", "mistral-7b", "tiny-llama"):
        assert n in names
    a = load_arch_config(ModelConfig(model="llama-3-8b", load_format="dummy"))
    assert (a.num_hidden_layers, a.hidden_size, a.intermediate_size) == (32, 4096, 14336)
    assert (a.num_attention_heads, a.num_key_value_heads, a.head_dim) == (32, 8, 128)
    assert a.vocab_size == 128256 and a.rope_theta == 500000.0 and not a.tie_word_embeddings
    a = load_arch_config(ModelConfig(model="llama-3.1-70b", load_format="dummy"))
    assert (a.num_hidden_layers, a.hidden_size, a.num_attention_heads) == (80, 8192, 64)
    assert a.rope_scaling is not None and a.rope_scaling["rope_type"] == "llama3"
    assert a.eos_token_id == (128001, 128008, 128009)
    a = load_arch_config(ModelConfig(model="qwen3-0.6b", load_format="dummy"))
    assert a.qk_norm and a.tie_word_embeddings and a.head_dim == 128 and a.hidden_size == 1024
    a = load_arch_config(ModelConfig(model="mistral-7b", load_format="dummy"))
    assert a.architectures == ("MistralForCausalLM",) and a.vocab_size == 32768


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])
def test_tiny_dummy_models_run(name: str) -> None:
    mc = ModelConfig(model=name, load_format="dummy", seed=3)
    assert load_tokenizer(mc) is None
    model, arch = _load(name, load_format="dummy", seed=3)
    runner = PagedRunner(model, arch, num_blocks=8, block_size=4)
    runner.add_request("a")
    logits = runner.step([("a", [1, 5, 9, 200])])[0]
    assert logits.shape == (4, arch.vocab_size) and torch.isfinite(logits).all()
    # same seed -> same weights; another seed -> different ones
    again, _ = _load(name, load_format="dummy", seed=3)
    other, _ = _load(name, load_format="dummy", seed=4)
    w = model.model.layers[0].self_attn.qkv_proj.weight
    assert torch.equal(w, again.model.layers[0].self_attn.qkv_proj.weight)
    assert not torch.equal(w, other.model.layers[0].self_attn.qkv_proj.weight)
    assert torch.all(model.model.norm.weight == 1)


def test_dummy_from_hf_dir(tiny_hf_dir: tuple[Any, Path]) -> None:
    hf, path = tiny_hf_dir
    model, arch = _load(str(path), load_format="dummy")
    assert arch.hidden_size == 64
    assert not torch.equal(model.model.embed_tokens.weight, hf.model.embed_tokens.weight)
    assert load_tokenizer(ModelConfig(model=str(path), load_format="dummy")) is None


# ---- errors ---------------------------------------------------------------------------------


def test_missing_path_and_unknown_dummy(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(ValueError, match=f"model path '{missing}' does not exist"):
        load_arch_config(ModelConfig(model=missing))
    with pytest.raises(ValueError, match="model path 'tiny-llama' does not exist.*load_format="):
        resolve_model_path(ModelConfig(model="tiny-llama"))
    with pytest.raises(ValueError, match=r"unknown dummy config 'llama-9t', available: \[.*tiny"):
        resolve_model_path(ModelConfig(model="llama-9t", load_format="dummy"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        resolve_model_path(ModelConfig(model=str(tmp_path / "empty")))


def test_unknown_architecture(tiny_hf_dir: tuple[Any, Path], tmp_path: Path) -> None:
    _, src = tiny_hf_dir
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"\['GPT2LMHeadModel'\] not supported.*LlamaForCausalLM"):
        load_arch_config(ModelConfig(model=str(tmp_path), load_format="dummy"))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(damage: str, tiny_hf_dir: tuple[Any, Path], tmp_path: Path) -> None:
    _, src = tiny_hf_dir
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    data = (src / "model.safetensors").read_bytes()
    bad = data[: len(data) // 2] if damage == "truncate" else b"\x10" + os.urandom(300)
    (tmp_path / "model.safetensors").write_bytes(bad)
    mc = ModelConfig(model=str(tmp_path))
    arch = load_arch_config(mc)
    target = str(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=f"safetensors file '{target}'"):
        load_model(mc, arch, TORCH, torch.float32, CPU)


def test_missing_shard_and_missing_tensor(tiny_hf_dir: tuple[Any, Path], tmp_path: Path) -> None:
    import safetensors.torch

    hf, src = tiny_hf_dir
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    mc = ModelConfig(model=str(tmp_path))
    arch = load_arch_config(mc)
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors' named in"):
        load_model(mc, arch, TORCH, torch.float32, CPU)
    (tmp_path / "model.safetensors.index.json").unlink()
    state = {k: v for k, v in hf.state_dict().items() if "layers.1.mlp.down_proj" not in k}
    safetensors.torch.save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing weight 'model\.layers\.1\.mlp\.down_proj"):
        load_model(mc, arch, TORCH, torch.float32, CPU)


@pytest.mark.parametrize("keep", [0.001, 0.00005])
def test_corrupt_gguf(keep: float, gguf_path: str, tmp_path: Path) -> None:
    with open(gguf_path, "rb") as f:
        data = f.read(int(os.path.getsize(gguf_path) * keep))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data)
    with pytest.raises(ValueError, match=f"GGUF file '{bad}'"):
        load_arch_config(ModelConfig(model=str(bad)))
    (tmp_path / "junk.gguf").write_bytes(b"hello world" * 50)
    with pytest.raises(ValueError, match=f"GGUF file '{tmp_path / 'junk.gguf'}'.*magic"):
        load_arch_config(ModelConfig(model=str(tmp_path / "junk.gguf")))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dummy_8b_on_gpu_loads_in_seconds() -> None:
    import time

    t0 = time.perf_counter()
    mc = ModelConfig(model="llama-3-8b", load_format="dummy")
    arch = load_arch_config(mc)
    model = load_model(mc, arch, TORCH, torch.bfloat16, torch.device("cuda"))
    torch.cuda.synchronize()
    assert time.perf_counter() - t0 < 30
    runner = PagedRunner(model, arch, num_blocks=4, block_size=16, device="cuda")
    runner.add_request("a")
    logits = runner.step([("a", [128000, 791, 6864, 315])])[0]
    assert torch.isfinite(logits).all()
    del model, runner
    torch.cuda.empty_cache()
