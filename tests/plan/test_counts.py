"""FLOP, byte and parameter counts of the planner against independent references: hand
formulas, HF transformers' own models (parameter counts, built on the meta device) and
FLOPs that ``torch.utils.flop_counter.FlopCounterMode`` counts on kvasir's real engine
(model runner included) running the same steps."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from kvasir.plan.config import PlanConfig
from kvasir.plan.memory import kv_bytes_per_token
from kvasir.plan.model_spec import load_model_spec, model_spec_from_hf
from kvasir.plan.model_zoo import ZOO
from kvasir.plan.roofline import (
    StepShape,
    attention_pairs,
    expected_experts_touched,
    step_operators,
    total,
)


def _hf_num_params(cfg: dict) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


JAMBA = {
    "model_type": "jamba",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "vocab_size": 1000,
    "attn_layer_period": 4,
    "attn_layer_offset": 2,
    "expert_layer_period": 2,
    "expert_layer_offset": 1,
    "mamba_d_state": 16,
    "mamba_d_conv": 4,
    "mamba_expand": 2,
}


@pytest.mark.parametrize(
    "name",
    [
        "mixtral-8x7b",
        "qwen3-30b-a3b",
        "mamba-2.8b",
        "mamba2-2.7b",
        "llama-2.7b-shape",
        "mistral-7b-v0.1",
        "jamba",
    ],
)
def test_num_params_match_hf_models(name: str) -> None:
    """Dense, GQA, sliding-window, MoE (routed and shared-free), Mamba, Mamba-2 and a
    Jamba hybrid: the planner's parameter count equals HF's model of the same config
    (two layers of each, so the per-layer formula is what is checked)."""
    cfg = dict(JAMBA) if name == "jamba" else dict(ZOO[name])
    if name != "jamba":
        cfg["num_hidden_layers"] = 2
    if name == "qwen3-30b-a3b":
        cfg["num_experts"] = 16
    spec = model_spec_from_hf(cfg, name)
    assert spec.num_params(include_embedding=True) == _hf_num_params(cfg)


def test_num_params_match_bench_formula_for_builtin_configs() -> None:
    from kvasir.bench.hw import num_params
    from kvasir.config import ModelConfig
    from kvasir.models.loader import load_arch_config

    for name in ("llama-3-8b", "llama-3.1-70b", "qwen3-0.6b", "mistral-7b", "tiny-qwen3"):
        arch = load_arch_config(ModelConfig(model=name, load_format="dummy"))
        assert load_model_spec(name).num_params() == num_params(arch), name


def test_gemm_flops_are_two_per_parameter_per_token() -> None:
    """Decode rows each through every weight once: GEMM FLOPs = 2 x params x tokens
    (the LM head once per sampled row, here every row; norms are not GEMMs)."""
    spec = load_model_spec("llama-3-8b")
    gemm_params = spec.num_params() - (2 * spec.num_layers + 1) * spec.hidden_size
    for batch in (1, 7, 64):
        ops = step_operators(spec, PlanConfig(), "gpu", StepShape.decode(batch, 300))
        flops, _ = total(ops, "gemm")
        assert flops == 2 * gemm_params * batch


def test_kv_bytes_formula() -> None:
    """KV bytes = 2 x layers x kv_heads x head_dim x dtype bytes x tokens."""
    spec = load_model_spec("llama-3.1-70b")
    for kv, b in (("auto", 2), ("fp8", 1), ("float32", 4)):
        cfg = PlanConfig(kv_cache_dtype=kv)
        assert kv_bytes_per_token(spec, cfg, "gpu") == 2 * 80 * 8 * 128 * b
        ops = step_operators(spec, cfg, "gpu", StepShape.decode(3, 1000))
        attn = next(o for o in ops if o.name == "attention_decode")
        # K/V of every context token, plus each row's query and output
        assert attn.bytes == 80 * (3 * 1000 * 2 * 8 * 128 * b + 3 * 2 * 64 * 128 * 2)


def test_attention_pairs_against_brute_force() -> None:
    for q, past, window in itertools.product((1, 5, 64), (0, 3, 100), (None, 1, 16, 70, 1000)):
        brute = sum(min(past + j + 1, window or 10**9) for j in range(q))
        assert attention_pairs(q, past, window) == brute, (q, past, window)


def test_experts_touched_against_simulation() -> None:
    """Uniform top-k routing: E (1 - (1 - k/E)^T) distinct experts, against sampling."""
    rng = random.Random(0)
    for e, k, t in ((8, 2, 1), (8, 2, 4), (128, 8, 16), (64, 6, 3)):
        trials = 4000
        mean = sum(
            len({x for _ in range(t) for x in rng.sample(range(e), k)}) for _ in range(trials)
        )
        assert abs(mean / trials - expected_experts_touched(t, e, k)) < 0.05 * e**0.5


def test_sliding_window_caps_decode_attention() -> None:
    spec = load_model_spec("mistral-7b-v0.1")
    cfg = PlanConfig()
    short = step_operators(spec, cfg, "gpu", StepShape.decode(1, 4000))
    long = step_operators(spec, cfg, "gpu", StepShape.decode(1, 20000))
    a_short = next(o for o in short if o.name == "sliding_attention_decode")
    a_long = next(o for o in long if o.name == "sliding_attention_decode")
    assert a_long.flops == 4 * 128 * 32 * 4096 * 32  # the window, not 20000 keys
    assert a_short.flops == 4 * 128 * 32 * 4000 * 32


def test_quantised_weights_move_fewer_bytes() -> None:
    spec = load_model_spec("llama-3-8b")
    base = total(step_operators(spec, PlanConfig(), "gpu", StepShape.decode(1, 10)), "gemm")[1]
    fp8 = total(
        step_operators(spec, PlanConfig(quantization="fp8"), "gpu", StepShape.decode(1, 10)), "gemm"
    )[1]
    int4 = total(
        step_operators(spec, PlanConfig(quantization="int4"), "gpu", StepShape.decode(1, 10)),
        "gemm",
    )[1]
    weights = spec.num_params() - (2 * spec.num_layers + 1) * spec.hidden_size  # GEMM weights
    # activations are the same; weights shrink from 2 to 1 and to 0.5 + 1/64 bytes
    assert base - fp8 == pytest.approx(weights * 1.0, rel=1e-9)
    assert base - int4 == pytest.approx(weights * (2 - 0.5 - 2 / 128), rel=1e-9)


def test_mamba_decode_is_independent_of_context() -> None:
    spec = load_model_spec("mamba-2.8b")
    a = total(step_operators(spec, PlanConfig(), "gpu", StepShape.decode(4, 100)))
    b = total(step_operators(spec, PlanConfig(), "gpu", StepShape.decode(4, 100000)))
    assert a == b


# -- FlopCounterMode on the real engine -----------------------------------------------

QWEN2_TINY = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "vocab_size": 512,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
}


def _engine_step_flops(model: str, prompt_lens: list[int], max_tokens: int, budget: int) -> int:
    """GEMM FLOPs FlopCounterMode counts while the engine runs ``prompt_lens`` prompts
    for ``max_tokens`` tokens (plain torch linears: oneDNN's prepacked op has no FLOP
    formula in the counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    from kvasir.entrypoints.llm import LLM
    from kvasir.sampling_params import SamplingParams

    llm = LLM(
        model=model,
        load_format="dummy",
        max_model_len=512,
        kv_cache_gb=0.02,
        cpu_prepack=False,
        max_num_batched_tokens=budget,
        enable_prefix_caching=False,
    )
    prompts = [[7 + (i * 31 + j) % 400 for j in range(n)] for i, n in enumerate(prompt_lens)]
    try:
        with FlopCounterMode(display=False) as fc:
            llm.generate(
                prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True), use_tqdm=False
            )
    finally:
        llm.llm_engine.engine_core.shutdown()
    counts = fc.get_flop_counts()["Global"]
    assert set(map(str, counts)) <= {"aten.mm", "aten.addmm", "aten.bmm"}, counts
    return int(sum(counts.values()))


def _predicted_gemm_flops(spec, steps: list[StepShape]) -> float:  # noqa: ANN001
    return sum(total(step_operators(spec, PlanConfig(), "cpu", s), "gemm")[0] for s in steps)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen3", "qwen2-tiny"])
def test_gemm_flops_match_flop_counter_on_engine(model: str, tmp_path) -> None:  # noqa: ANN001
    """Three prompts prefilled in one step, then two decode steps of all three; and
    with a 24-token budget, the chunked schedule the engine runs (computed by hand)."""
    if model == "qwen2-tiny":
        path = tmp_path / "config.json"
        path.write_text(json.dumps(QWEN2_TINY))
        model = str(path)
    spec = load_model_spec(model)
    lens = [17, 40, 9]
    steps = [
        StepShape((), tuple((n, 0) for n in lens)),
        StepShape(tuple(n + 1 for n in lens)),
        StepShape(tuple(n + 2 for n in lens)),
    ]
    assert _engine_step_flops(model, lens, 3, 2048) == _predicted_gemm_flops(spec, steps)
    # Budget 24: step 1 = 17 + 7 of the second prompt; step 2 = a decode of the first
    # + 23 more of the second; step 3 = a decode of the first + the second's last 10
    # + 9 of the third is 1 + 10 + 9 = 20 tokens; then no more (max_tokens=2 each).
    # The second prompt's first two chunks sample nothing: no logits for them.
    chunked = [
        StepShape((), ((17, 0), (7, 0)), num_partial_chunks=1),
        StepShape((18,), ((23, 7),), num_partial_chunks=1),
        StepShape((), ((10, 30), (9, 0))),
        StepShape((41, 10)),
    ]
    assert _engine_step_flops(model, lens, 2, 24) == _predicted_gemm_flops(spec, chunked)
