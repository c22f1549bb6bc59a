"""Where a batch-1 decode step's time goes: per-kernel GPU time (torch profiler) vs the
step's wall time, Llama-3-8B shape, random weights.

    python3 benchmarks/profile_decode.py [--eager] [--no-fused-rotary] [--no-fused-gemv]
        [--no-pdl] [--batch-size B]

Prints the wall time per decode step (CUDA graphs unless --eager), the summed kernel
time per step, and the kernels that take the most of it (per step, averaged over the
profiled steps). The kernel variants are engines built with another ``KernelConfig``:
``--no-fused-gemv`` builds the engine with ``fused_gemv=False`` (cuBLAS + separate norm/SiLU
kernels instead of the batch-1 GEMV path); ``--no-pdl`` with ``pdl=False``, every kernel
launched without programmatic dependent launch (``kvasir.kernels.pdl``; without the
flag PDL is on unless ``KVASIR_PDL=0``). With PDL on, a kernel's time includes the time
its programs wait for the kernel in front, so the summed kernel time exceeds the wall
time and only the wall time compares. ``--no-fused-rotary`` runs the torch rotary layer
+ separate cache write instead of the fused Triton kernel (the before/after of that
fusion, same call).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--eager", action="store_true")
    p.add_argument("--no-fused-rotary", action="store_true")
    p.add_argument("--no-fused-gemv", action="store_true")
    p.add_argument("--no-pdl", action="store_true")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--top", type=int, default=18)
    p.add_argument("--quantization", "-q", default=None, help="fp8 | int8 | w8a8")
    args = p.parse_args()

    from kvasir.attention.triton_backend import TritonAttentionBackend
    from kvasir.entrypoints.llm import LLM
    from kvasir.sampling_params import SamplingParams

    if args.no_fused_rotary:
        TritonAttentionBackend.fuses_rotary = False
    llm = LLM(model=args.model, load_format="dummy", max_model_len=2048,
              enforce_eager=args.eager, fused_gemv=not args.no_fused_gemv,
              pdl=False if args.no_pdl else None,
              quantization=args.quantization)  # fmt: skip
    kernel_config = llm.llm_engine.config.kernel_config
    core = llm.llm_engine.engine_core
    vocab = core.arch_config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1000, vocab, (args.input_len,), generator=g).tolist()
               for _ in range(args.batch_size)]  # fmt: skip

    def gen(n: int) -> float:
        core.reset_prefix_cache()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True),
                     use_tqdm=False)  # fmt: skip
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    gen(8)
    t1 = min(gen(1) for _ in range(3))
    tn = min(gen(1 + args.steps) for _ in range(3))
    wall_ms = (tn - t1) / args.steps * 1e3

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        gen(1 + args.steps)
    per_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            rec = per_name[ev.name[:90]]
            rec[0] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time
            rec[1] += 1
    total_us = sum(v[0] for v in per_name.values())
    n = args.steps  # the prefill step's kernels are included; small next to 64 steps
    rows = sorted(per_name.items(), key=lambda kv: -kv[1][0])
    print(f"\nmode={'eager' if args.eager else 'graphs'} fused_rotary={not args.no_fused_rotary}"
          f" fused_gemv={kernel_config.fused_gemv} pdl={kernel_config.pdl}"
          f" batch={args.batch_size}")  # fmt: skip
    print(f"{'kernel':<92}{'us/step':>9}{'n/step':>8}")
    for name, (us, cnt) in rows[: args.top]:
        print(f"{name:<92}{us / n:>9.1f}{cnt / n:>8.1f}")
    kernels_per_step = sum(v[1] for v in per_name.values()) / n
    summary = {
        "device": torch.cuda.get_device_name(),
        "mode": "eager" if args.eager else "graphs",
        "fused_rotary": not args.no_fused_rotary,
        "fused_gemv": kernel_config.fused_gemv,
        "pdl": kernel_config.pdl,
        "batch_size": args.batch_size,
        "quantization": args.quantization,
        "wall_ms_per_step": round(wall_ms, 3),
        "kernel_ms_per_step": round(total_us / n / 1e3, 3),
        "kernels_per_step": round(kernels_per_step, 1),
        "tok_s": round(args.batch_size * 1e3 / wall_ms, 1),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
