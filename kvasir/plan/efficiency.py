"""kvasir's efficiency factors: the fraction of a device's datasheet roofline its kernels
reach, derived from measurements recorded in ``benchmarks/RESULTS.md``, not guessed.

Each ``Measurement`` quotes its RESULTS.md cell verbatim (``quote``; a test checks the
text is there) and states what was run. A factor is solved from it through the same
performance model that later predicts: e.g. the memory efficiency is the value for
which the model's batch-1 decode step of the measured shape takes the measured time.
Devices kvasir has been measured on (H100, H200) get their own factors; the other GPUs
get the H100's (the same kernels; ``Efficiency.source`` says so); the TPU, LPU and
wafer devices, which kvasir does not run on, are pure rooflines (factors 1, no fixed
costs). A calibrated machine's rates are what kvasir's kernels reached on it, so its
factors are 1 and its fixed costs were measured (``kvasir plan --calibrate``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache

from kvasir.plan.hardware import CATALOGUE, Hardware, KernelOverheads


@dataclass(frozen=True)
class Measurement:
    """One measured figure of RESULTS.md: ``value`` (in ``unit``) from the run named."""

    key: str
    hardware: str
    model: str
    what: str
    value: float
    unit: str
    quote: str  # verbatim RESULTS.md text holding the value
    section: str  # the RESULTS.md heading it sits under


MEASUREMENTS: tuple[Measurement, ...] = (
    Measurement(
        "decode_h100",
        "h100-sxm",
        "llama-3-8b",
        "batch-1 decode, 128-token prompt, 256 new (context 256 on average), CUDA graphs, PDL",
        5.456e-3,
        "s/step",
        "**183.3 tok/s, 5.456 ms/step, 93.9 %**",
        "2026-11-28, third session — NVIDIA H200 and H100 80GB HBM3",
    ),
    Measurement(
        "decode_h200",
        "h200",
        "llama-3-8b",
        "batch-1 decode, 128-token prompt, 256 new, final build of the third session",
        3.994e-3,
        "s/step",
        "**250.4 tok/s**, 3.994 ms/step, **91.2 %**",
        "2026-11-28, third session — NVIDIA H200 and H100 80GB HBM3",
    ),
    Measurement(
        "prefill_h100",
        "h100-sxm",
        "llama-3-8b",
        "prefill of one 8,191-token prompt (bench latency --prefill-len 8192)",
        0.242,
        "s",
        "0.242 s = **73.3 % MFU**",
        "2026-11-27 — NVIDIA H100 80GB HBM3",
    ),
    Measurement(
        "prefill_attention_h200",
        "h200",
        "kernel",
        "Triton prefill attention, one 8k causal prompt, 32 q / 8 kv heads, d128",
        392e12,
        "FLOP/s",
        "1,400.8 µs = **392 TFLOP/s**",
        "2026-11-27 — NVIDIA H200",
    ),
    Measurement(
        "decode_attention_h200",
        "h200",
        "kernel",
        "Triton paged decode attention, 32 seqs x 8k, 8 kv heads, d128, bf16: 265.6 us",
        265.6e-6,
        "s",
        "265.6 µs = **95.2 %** of copy bandwidth",
        "2026-11-27 — NVIDIA H200",
    ),
    Measurement(
        "small_kernels_h100",
        "h100-sxm",
        "llama-3-8b",
        "per layer of a batch-1 decode step: RMSNorm x2 (4.6 us), RoPE + cache write "
        "(2.7 us), decode attention split + reduce (6.4 us): 13.7 us over 5 launches",
        13.7e-6 / 5,
        "s/launch",
        "per layer ~4.6 µs of RMSNorm (2 launches), 2.7 µs RoPE + cache write and 6.4 µs",
        "2026-11-28 — NVIDIA H100 80GB HBM3",
    ),
    Measurement(
        "gpu_busy",
        "h100-sxm",
        "qwen3-0.6b",
        "fraction of wall time the GPU is busy in decode steps at batch 64 (async scheduling)",
        0.969,
        "fraction",
        "**96.9 %** (GPU 3.06 ms of 3.16 ms per step",
        "2026-11-27 — NVIDIA H100 80GB HBM3",
    ),
    Measurement(
        "host_step",
        "h100-sxm",
        "qwen3-0.6b",
        "host work of one engine step (schedule, launch, update, output processing), "
        "hidden behind the GPU by async scheduling in steady state",
        (0.53 + 0.97 + 0.28 + 0.48) * 1e-3,
        "s/step",
        "schedule 0.53 ms, launch 0.97 ms, update 0.28 ms, output processing 0.48 ms",
        "2026-11-27 — NVIDIA H100 80GB HBM3",
    ),
    # Held out: predictions are checked against these, nothing is solved from them.
    Measurement(
        "throughput_h200",
        "h200",
        "llama-3-8b",
        "256 requests, in/out U[100,1024], --max-model-len 4096 --max-num-batched-tokens 8192",
        9995.8,
        "output tok/s",
        "kvasir **9,995.8 output tok/s**",
        "2026-11-28, third session — NVIDIA H200 and H100 80GB HBM3",
    ),
    Measurement(
        "throughput_h100",
        "h100-sxm",
        "llama-3-8b",
        "256 requests, in/out U[100,1024], --max-model-len 4096 --max-num-batched-tokens 8192",
        8262.1,
        "output tok/s",
        "8,262.1 output tok/s",
        "2026-11-28, third session — NVIDIA H200 and H100 80GB HBM3",
    ),
)


def measurement(key: str) -> Measurement:
    for m in MEASUREMENTS:
        if m.key == key:
            return m
    raise KeyError(key)


@dataclass(frozen=True)
class Efficiency:
    """Fractions of the datasheet peak (compute) and bandwidth (memory) that kvasir's
    kernels reach, per operator kind, and the fixed costs the roofline misses."""

    gemm_compute: float = 1.0
    gemm_memory: float = 1.0
    attention_compute: float = 1.0
    attention_memory: float = 1.0
    elementwise_memory: float = 1.0
    busy_fraction: float = 1.0  # device busy / wall time of a step (host work not hidden)
    # Host work of a step that nothing overlaps: the first step of an idle engine (TTFT)
    # under async scheduling; 0 where every step already counts its host cost.
    exposed_host_s: float = 0.0
    overheads: KernelOverheads = KernelOverheads()
    source: str = "roofline (ideal): no kvasir measurement on this device"


def _gpu_base() -> Efficiency:
    """Fixed costs and the kernel-level factors, before the end-to-end solves."""
    small = measurement("small_kernels_h100").value
    h200 = CATALOGUE["h200"]
    attn_c = measurement("prefill_attention_h200").value / h200.peak("bf16")
    # Decode attention kernel: K and V of 32 x 8,192 tokens, 8 heads of 128, bf16.
    kv_bytes = 32 * 8192 * 8 * 128 * 2 * 2
    attn_m = (
        kv_bytes / measurement("decode_attention_h200").value / (h200.memory_bandwidth_gbs * 1e9)
    )
    return Efficiency(
        attention_compute=attn_c,
        attention_memory=min(attn_m, 1.0),
        busy_fraction=measurement("gpu_busy").value,
        exposed_host_s=measurement("host_step").value,
        overheads=KernelOverheads(
            attention_s=small, elementwise_s=small, source="RESULTS.md: small_kernels_h100"
        ),
    )


def _solve_memory(hw: Hardware, base: Efficiency, key: str) -> float:
    """The gemm/elementwise memory efficiency for which the model's decode step of
    measurement ``key`` takes the measured time (the model is linear in 1/eff)."""
    from kvasir.plan.perf import decode_step_for_efficiency

    m = measurement(key)
    fixed, memory_at_1 = decode_step_for_efficiency(hw, base, m.model, context_len=256)
    return memory_at_1 / (m.value - fixed)


def _solve_compute(hw: Hardware, eff: Efficiency, key: str) -> float:
    from kvasir.plan.perf import prefill_for_efficiency

    m = measurement(key)
    fixed, gemm_at_1 = prefill_for_efficiency(hw, eff, m.model, prompt_len=8191)
    return gemm_at_1 / (m.value - fixed)


@cache
def _measured(name: str) -> Efficiency:
    hw = CATALOGUE[name]
    base = _gpu_base()
    mem = _solve_memory(hw, base, f"decode_{name.split('-')[0]}")
    eff = replace(base, gemm_memory=mem, elementwise_memory=mem)
    h100 = CATALOGUE["h100-sxm"]
    comp = _solve_compute(h100, replace(eff, gemm_memory=_h100_memory()), "prefill_h100")
    return replace(
        eff,
        gemm_compute=comp,
        source=f"RESULTS.md measurements on {name} (memory: decode_{name.split('-')[0]}; "
        "compute: prefill_h100; attention: H200 kernels; fixed: small_kernels_h100, gpu_busy)",
    )


@cache
def _h100_memory() -> float:
    return _solve_memory(CATALOGUE["h100-sxm"], _gpu_base(), "decode_h100")


def efficiency_for(hw: Hardware) -> Efficiency:
    """The factors the performance model applies to ``hw``."""
    if hw.calibrated:
        return Efficiency(
            overheads=hw.overheads or KernelOverheads(),
            source=f"calibrated on this machine ({hw.description})",
        )
    if hw.name in ("h100-sxm", "h200"):
        return _measured(hw.name)
    if hw.kind == "gpu":
        e = _measured("h100-sxm")
        return replace(e, source="transferred from the H100 measurements (" + e.source + ")")
    return Efficiency()
