"""Device ceilings measured in the same run as a benchmark, and the model's cost.

Every benchmark reports its result as a fraction of what this device can do:
copy bandwidth (bytes read + written by a large device-to-device copy) and the dense
matmul rate (bf16 on a GPU, float32 on the CPU).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from kvasir.config import ModelArchConfig


@dataclass
class DeviceCeilings:
    device_name: str
    copy_bandwidth_gbs: float  # GB/s (1e9), read + write
    matmul_tflops: float  # dense, in the model's dtype
    matmul_dtype: str

    def as_dict(self) -> dict:
        return asdict(self)


def _time_cuda(fn, iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def _time_cpu(fn, iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def _engine_cpu_linear(weight: torch.Tensor) -> torch.nn.Module:
    """A ``ReplicatedLinear`` holding ``weight`` ``[out, in]``, built and processed as the
    engine builds its layers (default ``KernelConfig``: float32 prepacked for oneDNN)."""
    from kvasir.attention.backend import get_backend_cls
    from kvasir.layers.context import LayerContext
    from kvasir.layers.linear import ReplicatedLinear
    from kvasir.models.loader import process_weights_after_loading

    ctx = LayerContext(get_backend_cls("torch"), params_dtype=weight.dtype)
    layer = ReplicatedLinear(weight.shape[1], weight.shape[0], False, ctx)
    layer.weight.weight_loader(layer.weight, weight)
    process_weights_after_loading(layer)
    return layer


def measure_ceilings(device: torch.device, dtype: torch.dtype) -> DeviceCeilings:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        n = 1 << 30  # 1 GiB buffers: far larger than L2
        src = torch.randn(n // 4, device=device)
        dst = torch.empty_like(src)
        t = _time_cuda(lambda: dst.copy_(src), 20)
        bw = 2 * n / t / 1e9
        del src, dst
        m = 8192
        a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
        b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
        t = _time_cuda(lambda: a @ b, 20)
        tflops = 2 * m**3 / t / 1e12
        mm_dtype = "bfloat16"
        del a, b
        torch.cuda.empty_cache()
    else:
        import platform

        name = (
            f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        )
        n = 1 << 28
        src = torch.randn(n // 4)
        dst = torch.empty_like(src)
        t = _time_cpu(lambda: dst.copy_(src), 5)
        bw = 2 * n / t / 1e9
        m = 1024
        # The run's own dtype: on CPUs with avx512_bf16/AMX, bf16 matmuls run several times
        # faster than float32 (benchmarks/RESULTS.md, "Measurements that used to live in
        # docstrings"), so MFU against the float32 rate would flatter a bf16 run.
        mm_dt = dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32
        a = torch.randn(m, m, dtype=mm_dt)
        b = torch.randn(m, m, dtype=mm_dt)
        # The faster of a plain matmul and the engine's own CPU linear (float32: oneDNN
        # on prepacked weights, faster than MKL's sgemm on some CPUs): MFU is against the
        # best the device was seen to do, never against a slower path than the engine's.
        layer = _engine_cpu_linear(b)
        with torch.inference_mode():
            layer(a), a @ b  # warm-up (oneDNN picks its kernel on the first call)
            t = min(_time_cpu(lambda: a @ b, 5), _time_cpu(lambda: layer(a), 5))
        tflops = 2 * m**3 / t / 1e12
        mm_dtype = str(mm_dt).removeprefix("torch.")
    return DeviceCeilings(name, bw, tflops, mm_dtype)


def num_params(a: ModelArchConfig, include_embedding: bool = False) -> int:
    """Parameters of a Llama-family model (the input embedding counted only if asked;
    a tied LM head is counted once as the output projection)."""
    h, i, d = a.hidden_size, a.intermediate_size, a.head_dim
    q, kv = a.num_attention_heads * d, a.num_key_value_heads * d
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
    if a.attention_bias:
        per_layer += q + 2 * kv
    if a.qk_norm:
        per_layer += 2 * d
    total = a.num_hidden_layers * per_layer + h + a.vocab_size * h  # final norm + lm head
    if include_embedding and not a.tie_word_embeddings:
        total += a.vocab_size * h
    return total


def decode_step_bytes(
    a: ModelArchConfig,
    dtype_bytes: int,
    context_lens: list[int],
    weight_bytes: int | None = None,
    kv_bytes: int | None = None,
) -> float:
    """Bytes a decode step must read: every weight but the input-embedding table, plus
    the K and V of every context token attended to. ``weight_bytes`` / ``kv_bytes`` (per
    element): the model's real ones where they differ from ``dtype_bytes`` (quantised
    weights: ``model_weight_bytes``; an FP8 KV cache: 1)."""
    kv_elem = dtype_bytes if kv_bytes is None else kv_bytes
    kv_per_token = 2 * a.num_hidden_layers * a.num_key_value_heads * a.head_dim * kv_elem
    weights = num_params(a) * dtype_bytes if weight_bytes is None else weight_bytes
    return weights + kv_per_token * sum(context_lens)


def model_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter a decode step reads, as stored (8-bit weights and their
    scales included): all but the input-embedding table, which a step only gathers from
    (unless the LM head is tied to it)."""
    total = 0
    seen: set[int] = set()
    embeds = {id(m.weight) for n, m in model.named_modules() if n.endswith("embed_tokens")}
    heads = {id(m.weight) for n, m in model.named_modules() if n.endswith("lm_head")}
    for p in model.parameters():
        if id(p) in seen or (id(p) in embeds and id(p) not in heads):
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total


def forward_flops(a: ModelArchConfig, num_tokens: int, attn_pairs: float) -> float:
    """Model FLOPs: 2 per parameter per token plus attention's QK^T and PV
    (4 * head_dim * num_heads per (query, key) pair, per layer)."""
    dense = 2 * num_params(a) * num_tokens
    attn = 4 * a.head_dim * a.num_attention_heads * a.num_hidden_layers * attn_pairs
    return dense + attn


def engine_device(core: Any) -> tuple[torch.device, torch.dtype, int]:
    """(device, dtype, devices in use) of an ``EngineCore``: one rank's device, and as
    many devices as ranks on CUDA (one GPU each; on the CPU the ranks share the host,
    whose ceilings ``measure_ceilings`` already measures)."""
    info = core.model_info
    device = torch.device(info.device)
    dtype = getattr(torch, info.dtype)
    ranks = core.config.parallel_config.world_size
    return device, dtype, ranks if device.type == "cuda" else 1
