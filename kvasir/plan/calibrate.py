"""``kvasir plan --calibrate``: measure this machine and add it to the catalogue.

The rates are what kvasir's own kernels reach here (so the model's efficiency factors
are 1 on a calibrated machine): ``kvasir.bench.hw.measure_ceilings`` (copy bandwidth,
the dense matmul rate of the engine's path), the read bandwidth of a batch-1 linear
layer built as the engine builds it (a GEMV over a weight far larger than the caches),
and the fixed cost of each kind of call: a tiny linear, a tiny decode-attention group
as the torch backend runs it, a tiny RMSNorm, and the engine's per-step and
per-request host cost, timed on the 2-layer ``tiny-llama`` config whose compute is
negligible.
"""

from __future__ import annotations

import logging
import platform
import statistics
import time
from collections.abc import Callable

import torch

from kvasir.plan.hardware import Hardware, KernelOverheads

logger = logging.getLogger(__name__)


def _median_time(fn: Callable[[], object], iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _engine_linear(weight: torch.Tensor) -> torch.nn.Module:
    """A ``ReplicatedLinear`` holding ``weight`` [out, in], processed as the engine's
    layers are (default ``KernelConfig``: float32 prepacked for oneDNN on the CPU)."""
    from kvasir.attention.backend import get_backend_cls
    from kvasir.layers.context import LayerContext
    from kvasir.layers.linear import ReplicatedLinear
    from kvasir.models.loader import process_weights_after_loading

    ctx = LayerContext(get_backend_cls("torch"), params_dtype=weight.dtype)
    layer = ReplicatedLinear(weight.shape[1], weight.shape[0], False, ctx)
    layer.weight.weight_loader(layer.weight, weight)  # type: ignore[union-attr, operator]
    process_weights_after_loading(layer)
    return layer


@torch.inference_mode()
def measure_gemv_bandwidth(
    out_features: int = 8192, in_features: int = 2048, iters: int = 7
) -> float:
    """GB/s of weight read by a batch-1 engine linear over a 64 MiB float32 weight."""
    w = torch.randn(out_features, in_features)
    layer = _engine_linear(w)
    x = torch.randn(1, in_features)
    t = _median_time(lambda: layer(x), iters)
    return out_features * in_features * 4 / t / 1e9


@torch.inference_mode()
def measure_call_overheads(iters: int = 50) -> tuple[float, float, float]:
    """(linear, decode-attention group, RMSNorm) seconds per call at tiny sizes."""
    from kvasir.layers.layernorm import RMSNorm

    lin = _engine_linear(torch.randn(64, 64))
    x = torch.randn(1, 64)
    t_lin = _median_time(lambda: lin(x), iters)
    # One decode group as the torch backend runs it: gather K and V blocks, SDPA over
    # a masked batch of query rows, scatter the output.
    cache = torch.randn(2, 8, 16, 2, 16)
    blocks = torch.tensor([1, 2])
    mask = torch.ones(1, 32, dtype=torch.bool)
    q = torch.randn(1, 2, 2, 16)
    rows = torch.tensor([0])
    out = torch.empty(1, 4, 16)

    def attn() -> None:
        k = cache[0].index_select(0, blocks).view(1, 32, 2, 16)
        v = cache[1].index_select(0, blocks).view(1, 32, 2, 16)
        o = torch.nn.functional.scaled_dot_product_attention(
            q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None, None, :]
        )
        out.index_copy_(0, rows, o.reshape(1, 4, 16))

    t_attn = _median_time(attn, iters)
    norm = RMSNorm(64)
    r = torch.randn(1, 64)
    t_norm = _median_time(lambda: norm(x, r), iters)
    return t_lin, t_attn, t_norm


def measure_engine_overheads(num_steps: int = 48) -> tuple[float, float]:
    """(per step, per request) host seconds of a decode step of the engine, from the
    2-layer ``tiny-llama`` config at batch 1 and batch 16 (its model time is a few
    tiny calls, subtracted by the caller's per-call costs)."""
    from kvasir.entrypoints.llm import LLM
    from kvasir.sampling_params import SamplingParams

    llm = LLM(model="tiny-llama", load_format="dummy", max_model_len=512, kv_cache_gb=0.05)
    core = llm.llm_engine.engine_core

    def run(batch: int) -> float:
        prompts = [[10 + i + j for j in range(8)] for i in range(batch)]
        sp = SamplingParams(temperature=0.0, max_tokens=num_steps + 1, ignore_eos=True)
        one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        core.reset_prefix_cache()
        t1 = _median_time(lambda: llm.generate(prompts, one, use_tqdm=False), 3, 1)
        core.reset_prefix_cache()
        tn = _median_time(lambda: llm.generate(prompts, sp, use_tqdm=False), 3, 1)
        return (tn - t1) / num_steps

    s1, s16 = run(1), run(16)
    core.shutdown()
    per_req = max((s16 - s1) / 15, 0.0)
    return max(s1 - per_req, 0.0), per_req


def calibrate(device: str = "auto") -> Hardware:
    """Measure this machine (the CPU, or the first CUDA GPU when asked or present)."""
    from kvasir.bench.hw import measure_ceilings
    from kvasir.plan.efficiency import measurement

    dev = torch.device(
        "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    ceil = measure_ceilings(dev, dtype)
    when = time.strftime("%Y-%m-%d")
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        small = measurement("small_kernels_h100").value
        return Hardware(
            name="this-machine",
            kind="gpu",
            description=f"{ceil.device_name} (calibrated {when})",
            peak_tflops={"bf16": ceil.matmul_tflops, "fp16": ceil.matmul_tflops},
            memory_gib=props.total_memory / (1 << 30),
            memory_bandwidth_gbs=ceil.copy_bandwidth_gbs,
            cache_mb=getattr(props, "L2_cache_size", 0) / 1e6,
            link_name="PCIe",
            link_gbs=32,
            pcie_gbs=32,
            tdp_w=None,
            price_usd=None,
            price_source="n/a (this machine)",
            price_date=when,
            source=f"measured by kvasir plan --calibrate ({when}): copy bandwidth and "
            "bf16 matmul (kvasir.bench.hw)",
            source_date=when,
            calibrated=True,
            overheads=KernelOverheads(
                attention_s=small, elementwise_s=small, source="RESULTS.md small_kernels_h100"
            ),
            extra={"copy_bandwidth_gbs": ceil.copy_bandwidth_gbs},
        )
    gemv = measure_gemv_bandwidth()
    t_lin, t_attn, t_norm = measure_call_overheads()
    step_s, req_s = measure_engine_overheads()
    # tiny-llama's own decode step: 2 layers x (4 linears, attention, 2 norms, a few
    # elementwise calls) + the LM head and final norm; what remains is the host's.
    model_calls = 2 * (4 * t_lin + t_attn + 4 * t_norm) + t_lin + t_norm
    step_s = max(step_s - model_calls, 0.0)
    import os

    threads = torch.get_num_threads()
    return Hardware(
        name="this-machine",
        kind="cpu",
        description=f"{platform.processor() or platform.machine()} CPU, {threads} threads "
        f"(calibrated {when})",
        peak_tflops={"fp32": ceil.matmul_tflops},
        memory_gib=_host_memory_gib(),
        memory_bandwidth_gbs=gemv,
        cache_mb=0,
        link_name="none",
        link_gbs=10,
        pcie_gbs=10,
        tdp_w=None,
        price_usd=None,
        price_source="n/a (this machine)",
        price_date=when,
        source=f"measured by kvasir plan --calibrate ({when}) on {os.cpu_count()} CPUs: "
        "GEMV read bandwidth and matmul rate of the engine's linear layers",
        source_date=when,
        calibrated=True,
        overheads=KernelOverheads(
            gemm_s=t_lin,
            attention_s=t_attn,
            elementwise_s=t_norm,
            step_s=step_s,
            request_s=req_s,
            source="measured by kvasir plan --calibrate",
        ),
        extra={
            "copy_bandwidth_gbs": ceil.copy_bandwidth_gbs,
            "matmul_dtype": ceil.matmul_dtype,
            "threads": threads,
        },
    )


def _host_memory_gib() -> float:
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    except (ValueError, OSError, AttributeError):
        return 16.0
