"""Batch-1 GEMV: cuBLAS (``F.linear`` at M = 1) against ``kvasir.kernels.gemv`` tile
configs, Llama-3-8B projection shapes, bf16, as a fraction of the measured copy
bandwidth.

Each timing replays a CUDA graph of 64 calls that cycle through enough copies of the
weight to overflow L2 (so every call streams its matrix from HBM, as in a decode step)
and reports the per-call time; the graph removes launch overhead, as in the engine.

    PYTHONPATH=. python benchmarks/bench_gemv.py [--sweep]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from kvasir.bench.hw import measure_ceilings
from kvasir.kernels.gemv import (
    FUSE_SILU_MUL_OUT,
    default_gemv_config,
    gemv,
)
from kvasir.kernels.pdl import use_pdl

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336), "lm_head": (128256, 4096)}  # fmt: skip
CALLS = 64


def time_per_call(fn_for_copy, copies: int) -> float:
    """Seconds per call: a graph of CALLS calls cycling through ``copies`` weights."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(copies):
            fn_for_copy(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(CALLS):
            fn_for_copy(i % copies)
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / CALLS)
    return sorted(times)[len(times) // 2]


def bench_shape(name: str, n: int, k: int, copy_gbs: float, sweep: bool) -> dict[str, float]:
    dev = torch.device("cuda")
    nbytes = n * k * 2
    copies = max(2, -(-150_000_000 // nbytes))  # > 3x the 50 MB L2
    ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)

    def frac(t: float) -> float:
        return nbytes / t / 1e9 / copy_gbs

    row = {}
    t = time_per_call(lambda i: F.linear(x, ws[i]), copies)
    row["cublas"] = (t, frac(t))
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    cfg = default_gemv_config(n, k, sms, use_pdl(x))
    cfgs = [cfg]
    if sweep and name != "lm_head":
        cfgs += [(bn, bk, w) for bn in (8, 16, 32) for bk in (256, 512, 1024) for w in (4, 8)
                 if (bn, bk, w) != cfg]  # fmt: skip
    for c in cfgs:
        try:
            t = time_per_call(lambda i, c=c: gemv(x, ws[i], config=c), copies)
            row[f"gemv{c}"] = (t, frac(t))
        except Exception as e:  # noqa: BLE001 - a config may not compile
            print(f"  {name} {c}: {type(e).__name__}")
    if name == "gate_up":  # the activation in the epilogue (the engine's path)
        t = time_per_call(lambda i: gemv(x, ws[i], None, FUSE_SILU_MUL_OUT), copies)
        row["gemv+silu_mul_out"] = (t, frac(t))
    ranked = sorted(row.items(), key=lambda kv: kv[1][0])
    print(f"\n{name} N={n} K={k} ({nbytes / 1e6:.0f} MB)")
    for label, (t, f) in ranked[:8] + [("cublas", row["cublas"])]:
        print(f"  {label:<28}{t * 1e6:>9.1f} us {f * 100:>6.1f} % of copy")
    keep = ("cublas", f"gemv{cfg}", "gemv+silu_mul_out")
    out = {k_: round(v[1], 4) for k_, v in row.items() if k_ in keep}
    ws.clear()
    torch.cuda.empty_cache()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sweep", action="store_true")
    args = p.parse_args()
    dev = torch.device("cuda")
    ceil = measure_ceilings(dev, torch.bfloat16)
    copy_gbs = ceil.copy_bandwidth_gbs
    print(f"device {ceil.device_name}: copy {copy_gbs:.0f} GB/s")
    results = {name: bench_shape(name, n, k, copy_gbs, args.sweep)
               for name, (n, k) in SHAPES.items()}  # fmt: skip
    print(
        json.dumps(
            {
                "bench": "gemv",
                "device": ceil.device_name,
                "copy_gbs": round(copy_gbs),
                "fraction_of_copy": results,
            }
        )
    )


if __name__ == "__main__":
    main()
