"""Offline throughput: many requests at once, output tokens per second.

Measures the device's copy bandwidth and matmul rate first and reports model-FLOPs
utilisation against the measured rate. ``--compare hf`` runs HF transformers on the
same requests in the same run (padded-batch ``generate`` on the CPU, continuous-batching
``generate_batch`` on a GPU).
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch


def add_cli_args(p: argparse.ArgumentParser) -> None:
    from kvasir.engine.arg_utils import EngineArgs

    EngineArgs.add_cli_args(p)
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=str, default="100:1024",
                   help="prompt length, N or MIN:MAX (uniform)")
    p.add_argument("--output-len", type=str, default="100:1024",
                   help="output length, N or MIN:MAX (uniform)")
    p.add_argument("--workload-seed", type=int, default=0)
    p.add_argument("--compare", choices=["none", "hf"], default="none")
    p.add_argument("--hf-batch-size", type=int, default=None,
                   help="padded-generate batch size for the CPU comparison (default: all)")
    p.add_argument("--output-json", type=str, default=None)


def _range(spec: str) -> tuple[int, int]:
    if ":" in spec:
        lo, hi = spec.split(":")
        return int(lo), int(hi)
    return int(spec), int(spec)


def make_workload(
    n: int, input_len: str, output_len: str, vocab_size: int, seed: int
) -> list[tuple[list[int], int]]:
    """n requests of random token ids (vLLM's 'random' dataset), lengths uniform."""
    rng = random.Random(seed)
    (ilo, ihi), (olo, ohi) = _range(input_len), _range(output_len)
    # Skip the first 1000 ids: special tokens live there in most vocabularies.
    lo_id = min(1000, vocab_size // 2)
    work = []
    for _ in range(n):
        il, ol = rng.randint(ilo, ihi), rng.randint(olo, ohi)
        work.append(([rng.randrange(lo_id, vocab_size) for _ in range(il)], ol))
    return work


def run_kvasir(llm, work: list[tuple[list[int], int]]) -> tuple[float, int]:
    from kvasir.sampling_params import SamplingParams

    prompts = [w[0] for w in work]
    params = [SamplingParams(temperature=0.0, max_tokens=w[1], ignore_eos=True) for w in work]
    # Warm-up: compile/caches/CUDA graphs are start-up cost, not throughput.
    llm.generate(prompts[:2], [SamplingParams(max_tokens=4, ignore_eos=True)] * 2,
                 use_tqdm=False)
    _sync()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=True)
    _sync()
    elapsed = time.perf_counter() - t0
    num_out = sum(len(o.outputs[0].token_ids) for o in outs)
    return elapsed, num_out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.inference_mode()
def run_hf(model, work: list[tuple[list[int], int]], batch_size: int | None) -> tuple[float, int]:
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        return _run_hf_continuous(model, work)
    # CPU: padded-batch generate, each batch runs to its longest requested output.
    bs = batch_size or len(work)
    pad = 0
    t0 = time.perf_counter()
    useful = 0
    for s in range(0, len(work), bs):
        chunk = work[s : s + bs]
        width = max(len(p) for p, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (p, _) in enumerate(chunk):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        max_new = max(o for _, o in chunk)
        model.generate(
            input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new,
            min_new_tokens=max_new, do_sample=False, pad_token_id=pad,
        )
        useful += sum(o for _, o in chunk)
    return time.perf_counter() - t0, useful


def _run_hf_continuous(model, work: list[tuple[list[int], int]]) -> tuple[float, int]:
    """HF's continuous batching (``generate_batch``). It takes one max_new_tokens for the
    batch, so every request runs to the workload's longest output; the tokens it really
    generated are what we count, so its tok/s is not penalised for that."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=max(o for _, o in work), do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    t0 = time.perf_counter()
    res = model.generate_batch(inputs=[p for p, _ in work], generation_config=cfg)
    elapsed = time.perf_counter() - t0
    total = sum(len(r.generated_tokens) for r in res.values())
    return elapsed, total


def main(args: argparse.Namespace) -> int:
    from kvasir.bench.hw import forward_flops, measure_ceilings
    from kvasir.engine.arg_utils import EngineArgs
    from kvasir.entrypoints.llm import LLM

    ea = EngineArgs.from_cli_args(args)
    kwargs = {k: v for k, v in vars(ea).items() if k != "model"}
    llm = LLM(model=ea.model, **kwargs)
    runner = llm.llm_engine.engine_core.runner
    arch = llm.llm_engine.engine_core.arch_config
    ceil = measure_ceilings(runner.device, runner.dtype)
    work = make_workload(args.num_prompts, args.input_len, args.output_len,
                         arch.vocab_size, args.workload_seed)
    elapsed, num_out = run_kvasir(llm, work)
    num_in = sum(len(p) for p, _ in work)
    # FLOPs actually required: every prompt and output token through the model, and
    # attention over each token's causal context.
    pairs = sum((len(p) + o) ** 2 / 2 for p, o in work)
    flops = forward_flops(arch, num_in + num_out, pairs)
    mfu = flops / elapsed / (ceil.matmul_tflops * 1e12)
    result = {
        "bench": "throughput",
        "device": ceil.device_name,
        "model": llm.llm_engine.model_info.model_name,
        "dtype": str(runner.dtype).removeprefix("torch."),
        "num_prompts": len(work),
        "input_tokens": num_in,
        "output_tokens": num_out,
        "elapsed_s": round(elapsed, 3),
        "output_tok_s": round(num_out / elapsed, 1),
        "total_tok_s": round((num_in + num_out) / elapsed, 1),
        "mfu": round(mfu, 4),
        "copy_bandwidth_gbs": round(ceil.copy_bandwidth_gbs, 1),
        "matmul_tflops": round(ceil.matmul_tflops, 1),
    }
    if args.compare == "hf":
        device, dtype = runner.device, runner.dtype
        del llm, runner  # free the engine's weights and KV cache before loading HF
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        hf = build_hf_model_from_args(ea, device, dtype)
        t_hf, n_hf = run_hf(hf, work, args.hf_batch_size)
        if n_hf == 0:
            raise RuntimeError("HF produced no tokens on this workload; no comparison made")
        result["hf_output_tok_s"] = round(n_hf / t_hf, 1)
        result["speedup_vs_hf"] = round(result["output_tok_s"] / result["hf_output_tok_s"], 2)
    print()
    print(f"{'metric':<22}{'value':>14}")
    for k in ("device", "output_tok_s", "total_tok_s", "mfu", "hf_output_tok_s",
              "speedup_vs_hf", "copy_bandwidth_gbs", "matmul_tflops"):
        if k in result:
            print(f"{k:<22}{result[k]!s:>14}")
    line = json.dumps(result)
    print(line)
    if args.output_json:
        with open(args.output_json, "w") as f:
            f.write(line + "\n")
    return 0


def build_hf_model_from_args(ea, device: torch.device, dtype: torch.dtype):
    """Build the HF model after the engine is gone (to free its memory first)."""
    import os

    import transformers

    from kvasir.models.default import default_model_path

    path = ea.model or default_model_path()
    if ea.load_format != "dummy" and path.endswith(".gguf"):
        return transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=dtype
        ).to(device).eval()
    if ea.load_format != "dummy":
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(
            device).eval()
    from kvasir.config import ModelConfig
    from kvasir.models.loader import resolve_model_path

    cfg_path, _ = resolve_model_path(ModelConfig(model=path, load_format="dummy"))
    if os.path.isdir(cfg_path):
        cfg_path = os.path.join(cfg_path, "config.json")
    cfg = transformers.AutoConfig.from_pretrained(cfg_path)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()
