"""``kvasir plan --calibrate``: measure this machine and add it to the catalogue.

The rates are what kvasir's own kernels reach here, so the model's efficiency factors
are 1 on a calibrated machine: ``kvasir.bench.hw.measure_ceilings`` (copy bandwidth and
the dense matmul rate of the engine's path), then the engine's linear layers streaming
their weights from memory at 1 to 256 rows, either for a model's own projection shapes
(``--model``: Vidur-style operator profiling; the working set is the model's, one copy
per layer) or for a generic table of widths, and the fixed costs: a decode-attention
group as the torch backend runs it, and the engine's host cost per step, per request,
per decoder layer and per layer and request, solved from decode steps of dummy models
whose layers are tiny (2 and 16 layers, batch 1 and 32), so their time is fixed cost.
On a GPU only the ceilings are measured (the factors of ``efficiency`` apply).
"""

from __future__ import annotations

import logging
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from kvasir.plan.hardware import Hardware, KernelOverheads
from kvasir.plan.model_spec import ModelSpec

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
    num_layers: int = 16, out_features: int = 4096, in_features: int = 2048
) -> float:
    """GB/s of weight read by batch-1 engine linears, one pass over ``num_layers``
    float32 weights of 32 MiB each (512 MiB together: past the last-level cache, as a
    model's weights are), less each call's fixed cost."""
    layers = [_engine_linear(torch.randn(out_features, in_features)) for _ in range(num_layers)]
    x = torch.randn(1, in_features)

    def one_pass() -> None:
        for layer in layers:
            layer(x)

    t = _median_time(one_pass, 5, 1)
    return num_layers * out_features * in_features * 4 / t / 1e9


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


@torch.inference_mode()
def measure_gemm_table(
    ks: tuple[int, ...] = (512, 2048, 8192),
    rows: tuple[int, ...] = (1, 4, 16, 64, 256),
    n: int = 4096,
    set_bytes: int = 256 << 20,
) -> list[tuple[int, int, float]]:
    """(K, rows, TFLOP/s) of the engine's linear streaming its weights: each K's rate
    is one pass over a set of ``n x K`` float32 weights of ``set_bytes`` together (past
    the caches, as a model's weights are), so a row of the table holds both the
    bandwidth (few rows) and the arithmetic rate (many rows) at that width."""
    out = []
    for k in ks:
        count = max(1, set_bytes // (n * k * 4))
        layers = [_engine_linear(torch.randn(n, k)) for _ in range(count)]
        for m in rows:
            x = torch.randn(m, k)

            def one_pass(x: torch.Tensor = x, layers: list = layers) -> None:
                for layer in layers:
                    layer(x)

            t = _median_time(one_pass, 3, 1)
            out.append((k, m, 2 * m * n * k * count / t / 1e12))
        del layers
    return out


_TINY = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 1024,
    "max_position_embeddings": 2048,
    "model_type": "llama",
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


def _decode_step_seconds(config_path: str, batch: int, num_steps: int) -> float:
    """Mean decode step of the engine on a dummy model (fresh prompts, greedy)."""
    from kvasir.entrypoints.llm import LLM
    from kvasir.sampling_params import SamplingParams

    llm = LLM(model=config_path, load_format="dummy", max_model_len=512, kv_cache_gb=0.05)
    core = llm.llm_engine.engine_core
    try:
        prompts = [[10 + i + j for j in range(8)] for i in range(batch)]
        sp = SamplingParams(temperature=0.0, max_tokens=num_steps + 1, ignore_eos=True)
        one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)

        def gen(p: SamplingParams) -> None:
            core.reset_prefix_cache()
            llm.generate(prompts, p, use_tqdm=False)

        t1 = _median_time(lambda: gen(one), 3, 1)
        tn = _median_time(lambda: gen(sp), 3, 1)
    finally:
        core.shutdown()
    return (tn - t1) / num_steps


@torch.inference_mode()
def measure_elementwise_bandwidth(num_tokens: int = 2048, hidden: int = 1024) -> float:
    """GB/s of the minimum traffic (as the roofline counts it) of the engine's own
    elementwise layers over a prompt-sized batch: RMSNorm with the residual add (read x
    and residual, write both) and SiLU-and-mul (read gate and up, write their product).
    Framework ops make several passes, so this is well under the copy bandwidth."""
    from kvasir.layers.activation import silu_and_mul
    from kvasir.layers.layernorm import RMSNorm

    norm = RMSNorm(hidden)
    x, r = torch.randn(num_tokens, hidden), torch.randn(num_tokens, hidden)
    t_norm = _median_time(lambda: norm(x, r), 5)
    inter = 3 * hidden
    gate_up = torch.randn(num_tokens, 2 * inter)
    t_act = _median_time(lambda: silu_and_mul(gate_up), 5)
    moved = 4 * num_tokens * hidden * 4 + 3 * num_tokens * inter * 4
    return moved / (t_norm + t_act) / 1e9


def _stream_bandwidth(shaped: list) -> float:
    """GB/s of float32 weights read by the batch-1 rows of ``measure_model_gemms``:
    2 FLOPs per weight, so bytes/s = 4 x (FLOP/s) / 2, weighted by each shape's size."""
    ones = [(n * k, t) for n, k, m, t in shaped if m == 1]
    weights = sum(w for w, _ in ones)
    seconds = sum(w / t for w, t in ones)  # proportional to the time of one pass
    return 2 * weights / seconds * 1e12 / 1e9


def measure_engine_overheads(num_steps: int = 24) -> tuple[float, float, float, float]:
    """(per step, per request, per decoder layer, per layer and request) host seconds
    of the engine's decode steps, from dummy models whose layers are tiny (hidden 64)
    with 2 and 16 layers, each at batch 1 and 32. Their roofline time is negligible,
    so what their steps take is fixed cost; four runs, four unknowns."""
    import json
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        paths = {}
        for layers in (2, 16):
            path = os.path.join(d, f"tiny-{layers}.json")
            with open(path, "w", encoding="utf-8") as f:
                json.dump({**_TINY, "num_hidden_layers": layers}, f)
            paths[layers] = path
        t = {(n, b): _decode_step_seconds(paths[n], b, num_steps) for n in (2, 16) for b in (1, 32)}
    layer_s = max((t[16, 1] - t[2, 1]) / 14, 0.0)
    layer_req_s = max(((t[16, 32] - t[2, 32]) / 14 - layer_s) / 31, 0.0)
    request_s = max((t[2, 32] - t[2, 1]) / 31 - 2 * layer_req_s, 0.0)
    step_s = max(t[2, 1] - 2 * layer_s - request_s - 2 * layer_req_s, 0.0)
    return step_s, request_s, layer_s, layer_req_s


@torch.inference_mode()
def measure_model_gemms(spec: ModelSpec, rows: tuple[int, ...] = (1, 4, 16, 64, 256)) -> list:
    """[N, K, rows, TFLOP/s] of each projection shape of ``spec`` (one rank, float32),
    each timed streaming as many copies as the model has layers with it, so the working
    set is the model's own, as in a real step (Vidur-style operator profiling)."""
    from kvasir.plan.config import PlanConfig
    from kvasir.plan.roofline import StepShape, step_operators

    ops = step_operators(spec, PlanConfig(), "cpu", StepShape.decode(1, 1))
    shapes: dict[tuple[int, int], int] = {}
    for op in ops:
        if op.kind == "gemm" and "n" in op.extra and op.name != "moe_experts":
            key = (int(op.extra["n"]), int(op.extra["k"]))
            shapes[key] = shapes.get(key, 0) + op.count
    sets = {key: [_engine_linear(torch.randn(*key)) for _ in range(c)] for key, c in shapes.items()}
    out = []
    for m in rows:
        for (n, k), layers in sets.items():
            x = torch.randn(m, k)

            def one_pass(x: torch.Tensor = x, layers: list = layers) -> None:
                for layer in layers:
                    layer(x)

            t = _median_time(one_pass, 3, 1)
            out.append((n, k, m, 2 * m * n * k * len(layers) / t / 1e12))
    return out


def calibrate(
    device: str = "auto", threads: int | None = None, model: ModelSpec | None = None
) -> Hardware:
    """Measure this machine (the CPU, or the first CUDA GPU when asked or present).
    ``threads``: CPU threads to measure with (default: torch's, as the engine runs);
    ``model``: also profile that model's projection shapes."""
    from kvasir.bench.hw import measure_ceilings
    from kvasir.plan.efficiency import measurement

    if threads is not None:
        torch.set_num_threads(threads)

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
    if model is not None:
        # The model's own projections: their rates, and the bandwidth of the batch-1
        # pass over them (bytes streamed per second).
        shaped = measure_model_gemms(model)
        table: list = []
        gemv = _stream_bandwidth(shaped)
    else:
        shaped = []
        table = measure_gemm_table()
        gemv = measure_gemv_bandwidth()
    _, t_attn, _ = measure_call_overheads()
    elementwise = measure_elementwise_bandwidth()
    step_s, req_s, layer_s, layer_req_s = measure_engine_overheads()
    import os

    threads = torch.get_num_threads()
    return Hardware(
        name="this-machine",
        kind="cpu",
        description=f"{platform.processor() or platform.machine()} CPU, {threads} threads "
        f"(calibrated {when})",
        peak_tflops={"fp32": max([ceil.matmul_tflops] + [r[-1] for r in table + shaped])},
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
            attention_s=t_attn,
            step_s=step_s,
            request_s=req_s,
            layer_s=layer_s,
            layer_request_s=layer_req_s,
            source="measured by kvasir plan --calibrate",
        ),
        extra={
            "elementwise_gbs": elementwise,
            "gemm_tflops_by_k_rows": table,
            "gemm_tflops_by_shape": shaped,
            "profiled_model": model.name if model is not None else None,
            "copy_bandwidth_gbs": ceil.copy_bandwidth_gbs,
            "matmul_dtype": ceil.matmul_dtype,
            "threads": threads,
        },
    )


def mean_calibration(a: Hardware, b: Hardware) -> Hardware:
    """Two calibrations of this machine averaged (rates, bandwidths, fixed costs and
    the measured GEMM tables point by point): the machine a benchmark between them saw,
    when other work on a shared machine makes it drift."""
    from dataclasses import replace

    def avg(x: Any, y: Any) -> Any:
        if (
            isinstance(x, bool)
            or not isinstance(x, (int, float))
            or not isinstance(y, (int, float))
        ):
            return x
        return (x + y) / 2

    def rows(tx: list, ty: list) -> list:
        by = {tuple(r[:-1]): r[-1] for r in ty}
        return [[*r[:-1], (r[-1] + by[tuple(r[:-1])]) / 2] for r in tx if tuple(r[:-1]) in by]

    extra = dict(a.extra)
    for key in ("gemm_tflops_by_shape", "gemm_tflops_by_k_rows"):
        if a.extra.get(key) and b.extra.get(key):
            extra[key] = rows(list(a.extra[key]), list(b.extra[key]))
    for key in ("elementwise_gbs", "copy_bandwidth_gbs"):
        if key in a.extra and key in b.extra:
            extra[key] = avg(a.extra[key], b.extra[key])
    ov = a.overheads
    if ov is not None and b.overheads is not None:
        fields = ("gemm_s", "attention_s", "elementwise_s", "step_s", "request_s", "layer_s",
                  "layer_request_s")  # fmt: skip
        ov = replace(ov, **{f: avg(getattr(ov, f), getattr(b.overheads, f)) for f in fields})
    return replace(
        a,
        peak_tflops={k: (v + b.peak_tflops.get(k, v)) / 2 for k, v in a.peak_tflops.items()},
        memory_bandwidth_gbs=(a.memory_bandwidth_gbs + b.memory_bandwidth_gbs) / 2,
        overheads=ov,
        extra=extra,
    )


def _host_memory_gib() -> float:
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    except (ValueError, OSError, AttributeError):
        return 16.0
