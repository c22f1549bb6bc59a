"""Memory predictions against the engine's own start-up numbers (KV blocks for a given
budget, exactly), against hand-computed cases, and the fit errors."""

from __future__ import annotations

import math

import pytest

from kvasir.plan.config import PlanConfig
from kvasir.plan.hardware import CATALOGUE, Hardware, get_hardware
from kvasir.plan.memory import (
    GIB,
    best_block_size,
    block_size_study,
    capacity,
    expected_waste_tokens,
    kv_bytes_per_seq,
    weight_bytes_per_rank,
)
from kvasir.plan.model_spec import load_model_spec

CPU = Hardware(
    name="test-cpu",
    kind="cpu",
    description="a CPU for tests",
    peak_tflops={"fp32": 1.0},
    memory_gib=64,
    memory_bandwidth_gbs=50,
    cache_mb=0,
    link_name="none",
    link_gbs=10,
    pcie_gbs=10,
    tdp_w=None,
    price_usd=None,
    price_source="n/a",
    price_date="n/a",
    source="hand-written for tests",
    source_date="n/a",
)


def _engine_blocks(model: str, **kw) -> int:  # noqa: ANN003
    from kvasir.entrypoints.llm import LLM

    load_format = "auto" if model.endswith(".gguf") else "dummy"
    llm = LLM(model=model, load_format=load_format, **kw)
    try:
        return llm.llm_engine.engine_core.model_info.num_gpu_blocks
    finally:
        llm.llm_engine.engine_core.shutdown()


@pytest.mark.parametrize(
    "model,kw",
    [
        ("tiny-llama", {"kv_cache_gb": 0.05, "block_size": 16}),
        ("tiny-llama", {"kv_cache_gb": 0.0123, "block_size": 8}),
        ("tiny-qwen3", {"kv_cache_gb": 0.031, "block_size": 32}),
        ("tiny-llama", {"block_size": 64}),  # the CPU default budget (1 GiB)
        # 2 ranks of a 1-KV-head model: each rank holds a replica of the KV head
        ("mqa", {"kv_cache_gb": 0.01, "tensor_parallel_size": 2}),
    ],
)
def test_num_blocks_equal_engine_startup(model: str, kw: dict, tmp_path) -> None:  # noqa: ANN001
    """(The default model's count is checked by the verify test, from its own start-up.)"""
    path = model
    if model == "mqa":
        import json

        from kvasir.models.loader.dummy_loader import dummy_config_path

        with open(dummy_config_path("tiny-llama"), encoding="utf-8") as f:
            cfg_json = json.load(f)
        cfg_json["num_key_value_heads"] = 1
        path = str(tmp_path / "mqa.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(cfg_json, f)
    spec = load_model_spec(path)
    cfg = PlanConfig(
        kv_cache_gb=kw.get("kv_cache_gb"),
        block_size=kw.get("block_size", 16),
        tensor_parallel_size=kw.get("tensor_parallel_size", 1),
        max_model_len=kw.get("max_model_len", 512),
    )
    engine_kw = {"max_model_len": 512, **kw}
    assert capacity(spec, cfg, CPU).num_blocks == _engine_blocks(path, **engine_kw)


def test_num_blocks_by_hand() -> None:
    """Llama-3-8B on one rank, bf16: 32 layers x 2 x 16 x 8 x 128 x 2 bytes = 2 MiB a
    block; 10 GiB hold 5,120 of them. TP 2 halves the heads a rank keeps: 10,240.
    PP 3 of 32 layers: stages of 11, 11, 10; the 11-layer stages bound the count."""
    spec = load_model_spec("llama-3-8b")
    h100 = CATALOGUE["h100-sxm"]
    assert capacity(spec, PlanConfig(kv_cache_gb=10), h100).num_blocks == 5120
    assert (
        capacity(spec, PlanConfig(kv_cache_gb=10, tensor_parallel_size=2), h100).num_blocks == 10240
    )
    pp3 = capacity(spec, PlanConfig(kv_cache_gb=10, pipeline_parallel_size=3), h100)
    assert pp3.num_blocks == (10 * GIB) // (11 * 2 * 16 * 8 * 128 * 2)
    fp8 = capacity(spec, PlanConfig(kv_cache_gb=10, kv_cache_dtype="fp8"), h100)
    assert fp8.num_blocks == 10240
    assert fp8.max_concurrency == (10240 - 1) * 16 / spec.max_position_embeddings


def test_weights_per_rank_by_hand() -> None:
    spec = load_model_spec("llama-3-8b")
    h, v = 4096, 128256
    layers = spec.num_params() - (h + v * h)  # decoder layers
    norms = 32 * 2 * h
    w1 = weight_bytes_per_rank(spec, PlanConfig(), "gpu")
    assert w1 == 2 * (layers + h + 2 * v * h)  # layers, final norm, embedding, LM head
    w2 = weight_bytes_per_rank(spec, PlanConfig(tensor_parallel_size=2), "gpu")
    assert w2 == 2 * ((layers - norms) / 2 + norms + h + v * h)
    w_fp8 = weight_bytes_per_rank(spec, PlanConfig(quantization="fp8"), "gpu")
    assert w_fp8 == 1 * (layers - norms) + 1 * v * h + 2 * (norms + h + v * h)


def test_does_not_fit_says_by_how_much() -> None:
    spec = load_model_spec("llama-3.1-70b")
    l40s = get_hardware("l40s")
    with pytest.raises(ValueError) as e:
        capacity(spec, PlanConfig(), l40s)
    weights = weight_bytes_per_rank(spec, PlanConfig(), "gpu")
    short = (weights - 48 * GIB * 0.9) / GIB
    assert f"short by {short:.1f} GiB" in str(e.value)
    assert "--tensor-parallel-size" in str(e.value)
    capacity(spec, PlanConfig(tensor_parallel_size=8), l40s)  # fits across 8


def test_sliding_window_and_ssm_bytes_per_seq() -> None:
    mistral = load_model_spec("mistral-7b-v0.1")
    cfg = PlanConfig()
    per_token = 2 * 8 * 128 * 2
    # a window of 4096: a layer keeps at most ceil(4096 / 16) + 1 blocks
    assert kv_bytes_per_seq(mistral, cfg, "gpu", 1000) == 32 * 63 * 16 * per_token
    assert kv_bytes_per_seq(mistral, cfg, "gpu", 30000) == 32 * 257 * 16 * per_token
    mamba = load_model_spec("mamba-2.8b")
    state = 64 * (5120 * 16 + 5120 * 3) * 4
    assert (
        kv_bytes_per_seq(mamba, cfg, "gpu", 10)
        == kv_bytes_per_seq(mamba, cfg, "gpu", 10**6)
        == state
    )


def test_block_size_study() -> None:
    for bs in (1, 16, 128):
        lengths = range(100, 400)
        brute = sum(math.ceil(L / bs) * bs - L for L in lengths) / len(lengths)
        assert expected_waste_tokens(bs, lengths) == brute
    spec = load_model_spec("llama-3-8b")
    rows = block_size_study(spec, PlanConfig(), "gpu", range(64, 4097))
    best = best_block_size(rows)
    totals = {r["block_size"]: r["total_bytes"] for r in rows}
    assert totals[best] == min(totals.values())
    # 128 KiB of KV per token dwarfs a block's table entry: small blocks win, but not 1
    assert 1 < best <= 16
