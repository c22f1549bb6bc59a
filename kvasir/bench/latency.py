"""Batch-1 latency: time to first token and decode tokens/s.

Reports decode bandwidth as a fraction of the measured copy bandwidth (bytes a decode
step must read: every weight but the input-embedding table, plus the KV cache) and
prefill MFU against the measured matmul rate. ``--compare hf`` runs HF ``generate``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch


def add_cli_args(p: argparse.ArgumentParser) -> None:
    from kvasir.engine.arg_utils import EngineArgs

    EngineArgs.add_cli_args(p)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--num-iters", type=int, default=3)
    p.add_argument(
        "--prefill-len",
        type=int,
        default=0,
        help="also time the prefill of one prompt of this many tokens (MFU)",
    )
    p.add_argument("--compare", choices=["none", "hf"], default="none")
    p.add_argument("--output-json", type=str, default=None)
    from kvasir.bench import spec

    spec.add_cli_args(p)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn) -> float:
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


def main(args: argparse.Namespace) -> int:
    from kvasir.bench.hw import (
        decode_step_bytes,
        engine_device,
        forward_flops,
        measure_ceilings,
        model_weight_bytes,
    )
    from kvasir.engine.arg_utils import EngineArgs
    from kvasir.entrypoints.llm import LLM
    from kvasir.sampling_params import SamplingParams

    if args.speculative_config:
        from kvasir.bench import spec

        return spec.main(args, concurrent=False)
    ea = EngineArgs.from_cli_args(args)
    kwargs = {k: v for k, v in vars(ea).items() if k != "model"}
    t_start = time.perf_counter()
    llm = LLM(model=ea.model, **kwargs)
    core = llm.llm_engine.engine_core
    runner, arch = core.runner, core.arch_config  # runner: None unless one rank in-process
    startup = time.perf_counter() - t_start
    device, dtype, num_devices = engine_device(core)
    ceil = measure_ceilings(device, dtype)
    rng = random.Random(0)
    prompts = [
        [rng.randrange(1000, arch.vocab_size) for _ in range(args.input_len)]
        for _ in range(args.batch_size)
    ]

    def gen(n: int) -> None:
        sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        # A fresh prefix each time: prefix-cache hits would flatter the prefill.
        core.reset_prefix_cache()
        llm.generate(prompts, sp, use_tqdm=False)

    gen(8)  # warm-up
    ttfts = [_timed(lambda: gen(1)) for _ in range(args.num_iters)]
    totals = [_timed(lambda: gen(args.output_len)) for _ in range(args.num_iters)]
    ttft = statistics.median(ttfts)
    per_tok = (statistics.median(totals) - ttft) / max(args.output_len - 1, 1)
    elem = torch.tensor([], dtype=dtype).element_size()
    ctx = args.input_len + args.output_len / 2
    cfg = llm.llm_engine.config
    kv_bytes = 1 if cfg.cache_config.kv_cache_dtype.startswith("fp8") else None
    wbytes = model_weight_bytes(runner.model) if runner is not None else None
    step_bytes = decode_step_bytes(arch, elem, [int(ctx)] * args.batch_size, wbytes, kv_bytes)
    bw = step_bytes / per_tok / 1e9
    result = {
        "bench": "latency",
        "device": ceil.device_name,
        "model": llm.llm_engine.model_info.model_name,
        "dtype": str(dtype).removeprefix("torch."),
        "quantization": cfg.model_config.quantization,
        "kv_cache_dtype": cfg.cache_config.kv_cache_dtype,
        "weight_gb_per_step": round(step_bytes / 1e9, 3),
        "num_devices": num_devices,
        "batch_size": args.batch_size,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "ttft_ms": round(ttft * 1e3, 2),
        "decode_tok_s": round(args.batch_size / per_tok, 1),
        "decode_ms_per_step": round(per_tok * 1e3, 3),
        "achieved_bandwidth_gbs": round(bw, 1),
        # Of every device's copy bandwidth together (tensor/pipeline parallel ranks).
        "bandwidth_fraction": round(bw / (num_devices * ceil.copy_bandwidth_gbs), 4),
        "copy_bandwidth_gbs": round(ceil.copy_bandwidth_gbs, 1),
        "matmul_tflops": round(ceil.matmul_tflops, 1),
        "startup_s": round(startup, 1),
        "weights_load_s": round(runner.load_time, 1) if runner is not None else None,
        "cuda_graphs": bool(getattr(runner, "cuda_graphs_enabled", False))
        if runner is not None
        else None,
    }
    if args.prefill_len:
        # The prompt plus its one generated token must fit max_model_len.
        args.prefill_len = min(args.prefill_len, llm.llm_engine.model_info.max_model_len - 1)
        long_prompt = [rng.randrange(1000, arch.vocab_size) for _ in range(args.prefill_len)]
        sp1 = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)

        def prefill() -> None:
            core.reset_prefix_cache()
            llm.generate([long_prompt], sp1, use_tqdm=False)

        prefill()
        t = statistics.median(_timed(prefill) for _ in range(args.num_iters))
        flops = forward_flops(arch, args.prefill_len, args.prefill_len**2 / 2)
        result["prefill_len"] = args.prefill_len
        result["prefill_s"] = round(t, 4)
        result["prefill_mfu"] = round(flops / t / (num_devices * ceil.matmul_tflops * 1e12), 4)
    if args.compare == "hf":
        from kvasir.bench.throughput import build_hf_model_from_args

        core.shutdown()
        del llm, core, runner
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        hf = build_hf_model_from_args(ea, device, dtype)
        ids = torch.tensor(prompts, device=device)

        @torch.inference_mode()
        def hf_gen(n: int) -> None:
            hf.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )

        hf_gen(4)
        t1 = statistics.median(_timed(lambda: hf_gen(1)) for _ in range(args.num_iters))
        tn = statistics.median(
            _timed(lambda: hf_gen(args.output_len)) for _ in range(max(1, args.num_iters - 1))
        )
        hf_per_tok = (tn - t1) / max(args.output_len - 1, 1)
        result["hf_ttft_ms"] = round(t1 * 1e3, 2)
        result["hf_decode_tok_s"] = round(args.batch_size / hf_per_tok, 1)
        result["speedup_vs_hf"] = round(result["decode_tok_s"] / result["hf_decode_tok_s"], 2)
    print()
    print(f"{'metric':<26}{'value':>16}")
    for k, v in result.items():
        if k not in ("bench", "model"):
            print(f"{k:<26}{v!s:>16}")
    line = json.dumps(result)
    print(line)
    if args.output_json:
        with open(args.output_json, "w") as f:
            f.write(line + "\n")
    return 0
