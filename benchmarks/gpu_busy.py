"""How busy the GPU is during steady decode: kernel time / wall time over a window.

Runs `--batch-size` requests of `--input-len` tokens decoding together (Qwen3-0.6B shape
by default, random weights) and profiles a window of engine steps with torch.profiler:
busy = (sum of GPU kernel durations; one stream, so they do not overlap) / wall time of
the window. Prints a one-line JSON summary last.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--enforce-eager", action="store_true")
    args = p.parse_args()

    from kvasir import LLM, SamplingParams

    llm = LLM(model=args.model, load_format="dummy", max_model_len=2048,
              enforce_eager=args.enforce_eager, log=False)
    engine = llm.llm_engine
    vocab = engine.model_info.vocab_size
    rng = random.Random(0)
    sp = SamplingParams(temperature=0.0, max_tokens=args.steps * 3, ignore_eos=True)
    for i in range(args.batch_size):
        engine.add_request(str(i), [rng.randrange(1000, vocab) for _ in range(args.input_len)], sp)
    for _ in range(args.steps // 2):  # prefill + settle into pure decode
        engine.step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    kernel_us = sum(e.device_time_total for e in prof.key_averages()
                    if e.device_type.name == "CUDA")
    # key_averages double-counts nothing for kernels (they are leaves); cap at wall.
    busy = min(kernel_us / 1e6 / wall, 1.0)
    result = {
        "bench": "gpu_busy", "device": torch.cuda.get_device_name(), "model": args.model,
        "batch_size": args.batch_size, "steps": args.steps, "wall_s": round(wall, 4),
        "ms_per_step": round(wall / args.steps * 1e3, 3),
        "gpu_kernel_s": round(kernel_us / 1e6, 4), "gpu_busy_fraction": round(busy, 4),
        "cuda_graphs": engine.engine_core.runner.cuda_graphs_enabled,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
