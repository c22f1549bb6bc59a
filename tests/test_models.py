"""Llama-family model vs. HF transformers on tiny random-weight checkpoints, loaded
through kvasir's safetensors loader and run over the paged KV cache."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import transformers
from model_utils import PagedRunner, randomize_

from kvasir.attention.backend import get_backend_cls
from kvasir.config import ModelArchConfig, ModelConfig
from kvasir.layers.activation import SiluAndMul
from kvasir.layers.context import LayerContext
from kvasir.layers.layernorm import RMSNorm
from kvasir.layers.rotary_embedding import RotaryEmbedding, compute_inv_freq
from kvasir.models.llama import LlamaForCausalLM
from kvasir.models.loader import load_arch_config, load_model
from kvasir.models.registry import get_model_cls

ATOL = 1e-4
VOCAB = 256
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)
# name -> (HF config class, kwargs): covers llama3 rope, qkv bias (Qwen2) and q/k/v/o bias
# (Llama, Qwen3 with attention_bias), qk norm, an explicit
# head_dim != hidden/heads, tied and untied embeddings, GQA and MQA.
VARIANTS: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {
    "llama3-gqa": (
        transformers.LlamaConfig,
        dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
             rope_scaling=LLAMA3_ROPE, tie_word_embeddings=False),
    ),
    "llama-tied-mqa": (
        transformers.LlamaConfig,
        dict(num_attention_heads=4, num_key_value_heads=1, rope_theta=10000.0,
             tie_word_embeddings=True, attention_bias=True),
    ),
    "qwen2": (
        transformers.Qwen2Config,
        dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6,
             tie_word_embeddings=True),
    ),
    "qwen3": (
        transformers.Qwen3Config,
        dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32, rope_theta=1e6,
             tie_word_embeddings=True, attention_bias=True),
    ),
    "mistral": (
        transformers.MistralConfig,
        dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8, rope_theta=1e6,
             sliding_window=None, tie_word_embeddings=False),
    ),
}  # fmt: skip


@dataclass
class Pair:
    hf: torch.nn.Module
    model: LlamaForCausalLM
    arch: ModelArchConfig

    def hf_logits(self, ids: list[int]) -> torch.Tensor:  # [len(ids), vocab]
        with torch.no_grad():
            return self.hf(torch.tensor([ids])).logits[0].float()

    def runner(self, block_size: int = 4) -> PagedRunner:
        return PagedRunner(self.model, self.arch, num_blocks=96, block_size=block_size)


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Pair:
    config_cls, kwargs = VARIANTS[request.param]
    config = config_cls(**_COMMON, **kwargs, attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    randomize_(hf, seed=len(request.param))
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    mc = ModelConfig(model=str(path))
    arch = load_arch_config(mc)
    model = load_model(mc, arch, get_backend_cls("torch"), torch.float32, torch.device("cpu"))
    assert isinstance(model, LlamaForCausalLM)
    return Pair(hf, model, arch)


def prompts(n: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (length,), generator=gen).tolist() for length in lengths[:n]]


def check(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ref.abs().max() > 0.5  # logits are not trivially small
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def test_arch_config_from_hf(pair: Pair) -> None:
    c = pair.hf.config
    assert pair.arch.num_key_value_heads == c.num_key_value_heads
    assert pair.arch.head_dim == (getattr(c, "head_dim", None) or 64 // c.num_attention_heads)
    assert pair.arch.tie_word_embeddings == c.tie_word_embeddings
    assert pair.arch.qk_norm == (c.model_type == "qwen3")
    assert pair.arch.attention_bias == (
        c.model_type == "qwen2" or getattr(c, "attention_bias", False)
    )


def test_batched_prefill(pair: Pair) -> None:
    seqs = prompts(3, [5, 11, 17])
    runner = pair.runner()
    for i in range(3):
        runner.add_request(str(i))
    outs = runner.step([(str(i), s) for i, s in enumerate(seqs)])
    for out, s in zip(outs, seqs, strict=True):
        check(out, pair.hf_logits(s))


def test_prefill_then_decode(pair: Pair) -> None:
    seqs = prompts(3, [3, 9, 14], seed=1)
    extra = prompts(3, [6, 6, 6], seed=2)
    runner = pair.runner()
    for i in range(3):
        runner.add_request(str(i))
    runner.step([(str(i), s) for i, s in enumerate(seqs)])
    for step in range(6):  # decode-only steps: the batched fast path
        outs = runner.step([(str(i), [extra[i][step]]) for i in range(3)])
        for i in range(3):
            full = seqs[i] + extra[i][: step + 1]
            check(outs[i], pair.hf_logits(full)[-1:])


def test_chunked_prefill(pair: Pair) -> None:
    (seq,) = prompts(1, [22], seed=3)
    ref = pair.hf_logits(seq)
    runner = pair.runner()
    runner.add_request("a")
    start = 0
    for chunk in (5, 6, 11):  # chunk edges fall mid-block (block_size 4)
        out = runner.step([("a", seq[start : start + chunk])])[0]
        check(out, ref[start : start + chunk])
        start += chunk


def test_mixed_decode_and_prefill_chunk(pair: Pair) -> None:
    a, b = prompts(2, [10, 19], seed=4)
    runner = pair.runner()
    runner.add_request("a")
    runner.add_request("b")
    runner.step([("a", a[:9])])
    out_a, out_b = runner.step([("a", a[9:]), ("b", b[:8])])
    check(out_a, pair.hf_logits(a)[9:])
    check(out_b, pair.hf_logits(b)[:8])
    out_b, out_a = runner.step([("b", b[8:]), ("a", [7])])
    check(out_b, pair.hf_logits(b)[8:])
    check(out_a, pair.hf_logits(a + [7])[-1:])


def test_cached_prefix_blocks(pair: Pair) -> None:
    (a,) = prompts(1, [14], seed=5)
    (tail,) = prompts(1, [7], seed=6)
    b = a[:12] + tail  # shares a's first 3 full blocks (block_size 4)
    runner = pair.runner()
    runner.add_request("a")
    runner.step([("a", a)])
    runner.add_request("b", shared_from="a", num_shared=3)
    out_b = runner.step([("b", tail)])[0]
    check(out_b, pair.hf_logits(b)[12:])
    # a keeps decoding from its own (shared) blocks, unaffected by b
    out_a = runner.step([("a", [3]), ("b", [4])])
    check(out_a[0], pair.hf_logits(a + [3])[-1:])
    check(out_a[1], pair.hf_logits(b + [4])[-1:])


def test_block_size_one_and_large(pair: Pair) -> None:
    (seq,) = prompts(1, [13], seed=7)
    ref = pair.hf_logits(seq)
    for block_size in (1, 16):
        runner = pair.runner(block_size)
        runner.add_request("a")
        check(runner.step([("a", seq[:10])])[0], ref[:10])
        check(runner.step([("a", seq[10:11])])[0], ref[10:11])
        check(runner.step([("a", seq[11:])])[0], ref[11:])


# ---- load_weights errors --------------------------------------------------------------


def _tiny_arch(**overrides: Any) -> ModelArchConfig:
    kw = dict(
        architectures=("LlamaForCausalLM",), vocab_size=32, hidden_size=16,
        intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8,
    )  # fmt: skip
    kw.update(overrides)
    return ModelArchConfig(**kw)  # type: ignore[arg-type]


def _hf_state(arch: ModelArchConfig) -> dict[str, torch.Tensor]:
    model = LlamaForCausalLM(arch, LayerContext(get_backend_cls("torch")))
    return {n: torch.zeros(s) for n, s in model.expected_weight_shapes().items()}


def test_load_weights_errors() -> None:
    arch = _tiny_arch()
    model = LlamaForCausalLM(arch, LayerContext(get_backend_cls("torch")))
    state = _hf_state(arch)
    model.load_weights(state.items())  # complete: fine

    missing = dict(state)
    del missing["model.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(ValueError, match=r"missing weight 'model\.layers\.0\.self_attn\.k_proj"):
        model.load_weights(missing.items())
    extra = dict(state, **{"model.layers.7.mlp.up_proj.weight": torch.zeros(24, 16)})
    with pytest.raises(ValueError, match=r"unexpected weight 'model\.layers\.7\.mlp\.up_proj"):
        model.load_weights(extra.items())
    bad = dict(state, **{"model.layers.0.mlp.gate_proj.weight": torch.zeros(24, 15)})
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.gate_proj\.weight' has shape"):
        model.load_weights(bad.items())


def test_load_weights_fills_fused_shards() -> None:
    arch = _tiny_arch(attention_bias=True)
    model = LlamaForCausalLM(arch, LayerContext(get_backend_cls("torch")))
    state = {n: torch.randn(s) for n, s in model.expected_weight_shapes().items()}
    model.load_weights(state.items())
    attn = model.model.layers[0].self_attn
    p = "model.layers.0."
    expected_qkv = torch.cat([state[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
    torch.testing.assert_close(attn.qkv_proj.weight, expected_qkv, atol=0, rtol=0)
    expected_bias = torch.cat([state[p + f"self_attn.{x}_proj.bias"] for x in "qkv"])
    torch.testing.assert_close(attn.qkv_proj.bias, expected_bias, atol=0, rtol=0)
    mlp = model.model.layers[0].mlp
    expected_gu = torch.cat([state[p + "mlp.gate_proj.weight"], state[p + "mlp.up_proj.weight"]])
    torch.testing.assert_close(mlp.gate_up_proj.weight, expected_gu, atol=0, rtol=0)


def test_registry() -> None:
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert get_model_cls([arch]) is LlamaForCausalLM
    assert get_model_cls(["Foo", "Qwen2ForCausalLM"]) is LlamaForCausalLM
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*supported architectures: .*Qwen3"):
        get_model_cls(["GPT2LMHeadModel"])


# ---- layers vs. HF ---------------------------------------------------------------------


def test_rmsnorm_matches_hf_and_fuses_residual() -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x, res = torch.randn(7, 32), torch.randn(7, 32)
    ours, hf = RMSNorm(32, eps=1e-5), LlamaRMSNorm(32, eps=1e-5)
    with torch.no_grad():
        ours.weight.copy_(torch.rand(32) + 0.5)
        hf.weight.copy_(ours.weight)
        torch.testing.assert_close(ours(x), hf(x), atol=0, rtol=0)
        out, new_res = ours(x, res)
        torch.testing.assert_close(new_res, x + res, atol=0, rtol=0)
        torch.testing.assert_close(out, hf(x + res), atol=0, rtol=0)


def test_silu_and_mul() -> None:
    x = torch.randn(4, 10, dtype=torch.float64)
    expected = x[:, :5] / (1 + torch.exp(-x[:, :5])) * x[:, 5:]
    torch.testing.assert_close(SiluAndMul()(x), expected)


@pytest.mark.parametrize(
    "rope_scaling", [None, LLAMA3_ROPE, {"rope_type": "linear", "factor": 4.0}]
)
def test_rotary_matches_hf(rope_scaling: dict[str, Any] | None) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    head_dim, theta = 32, 500000.0
    rope = dict(rope_scaling or {"rope_type": "default"}, rope_theta=theta)
    config = transformers.LlamaConfig(
        hidden_size=128, num_attention_heads=4, head_dim=head_dim, rope_parameters=rope,
        max_position_embeddings=512,
    )  # fmt: skip
    inv_freq = compute_inv_freq(head_dim, theta, rope_scaling)
    if rope_scaling is not None:
        hf_inv_freq, factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, "cpu")
        assert factor == 1.0
        torch.testing.assert_close(inv_freq, hf_inv_freq, atol=0, rtol=0)
    hf_rope = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
    positions = torch.tensor([0, 1, 7, 100, 511])
    q, k = torch.randn(5, 4, head_dim), torch.randn(5, 2, head_dim)
    cos, sin = hf_rope(q, positions[None])
    # HF layout [batch, heads, seq, dim]
    hq, hk = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    ours = RotaryEmbedding(head_dim, 512, theta, rope_scaling)
    oq, ok = ours(positions, q.reshape(5, -1), k.reshape(5, -1))
    torch.testing.assert_close(oq.view(5, 4, head_dim), hq[0].transpose(0, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(ok.view(5, 2, head_dim), hk[0].transpose(0, 1), atol=1e-6, rtol=0)


def test_rotary_table_stays_float32() -> None:
    rope = RotaryEmbedding(16, 64, 10000.0).to(torch.bfloat16)
    assert rope.cos_sin_cache.dtype == torch.float32
    torch.testing.assert_close(rope.cos_sin_cache, RotaryEmbedding(16, 64, 10000.0).cos_sin_cache)


def _run_on(pair: Pair, dtype: torch.dtype, device: str, path: Any) -> None:
    """Prefill + chunked prefill of two requests in ``dtype`` on ``device`` vs. HF fp32."""
    pair.hf.save_pretrained(path)
    mc = ModelConfig(model=str(path))
    model = load_model(mc, pair.arch, get_backend_cls("torch"), dtype, torch.device(device))
    seqs = prompts(2, [9, 14], seed=8)
    runner = PagedRunner(model, pair.arch, num_blocks=16, block_size=4, device=device)
    runner.add_request("a")
    runner.add_request("b")
    outs = runner.step([("a", seqs[0]), ("b", seqs[1][:10])])
    outs += runner.step([("b", seqs[1][10:])])
    ours = [outs[0].cpu(), torch.cat(outs[1:]).cpu()]
    for out, ref in zip(ours, [pair.hf_logits(s) for s in seqs], strict=True):
        assert out.dtype == torch.float32
        if dtype == torch.float32:
            torch.testing.assert_close(out, ref, atol=1e-3, rtol=0)
        else:  # bf16 weights/activations: ~0.5% of the logit range observed
            assert (out - ref).abs().max() < 0.02 * ref.abs().max()


def test_bfloat16_on_cpu(pair: Pair, tmp_path: Any) -> None:
    _run_on(pair, torch.bfloat16, "cpu", tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_hf(pair: Pair, dtype: torch.dtype, tmp_path: Any) -> None:
    _run_on(pair, dtype, "cuda", tmp_path)
