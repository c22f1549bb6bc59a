"""Offline throughput: many requests at once, output tokens per second.

Measures the device's copy bandwidth and matmul rate first and reports model-FLOPs
utilisation against the measured rate. ``--compare hf`` runs HF transformers on the
same requests in the same run (padded-batch ``generate`` on the CPU, HF's continuous
batching, the manager behind ``generate_batch``, on a GPU).
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
    p.add_argument(
        "--input-len", type=str, default="100:1024", help="prompt length, N or MIN:MAX (uniform)"
    )
    p.add_argument(
        "--output-len", type=str, default="100:1024", help="output length, N or MIN:MAX (uniform)"
    )
    p.add_argument("--workload-seed", type=int, default=0)
    p.add_argument("--compare", choices=["none", "hf"], default="none")
    p.add_argument(
        "--hf-batch-size",
        type=int,
        default=None,
        help="padded-generate batch size for the CPU comparison (default: all)",
    )
    p.add_argument("--output-json", type=str, default=None)
    from kvasir.bench import lora, spec

    spec.add_cli_args(p)
    lora.add_cli_args(p)


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
    llm.generate(prompts[:2], [SamplingParams(max_tokens=4, ignore_eos=True)] * 2, use_tqdm=False)
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
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        max_new = max(o for _, o in chunk)
        model.generate(
            input_ids=ids.to(dev),
            attention_mask=mask.to(dev),
            max_new_tokens=max_new,
            min_new_tokens=max_new,
            do_sample=False,
            pad_token_id=pad,
        )
        useful += sum(o for _, o in chunk)
    return time.perf_counter() - t0, useful


def _run_hf_continuous(
    model, work: list[tuple[list[int], int]], cb_config=None
) -> tuple[float, int]:
    """HF's continuous batching: the manager behind ``generate_batch``, driven directly so
    each request gets its own ``max_new_tokens`` (``generate_batch`` takes one for all).
    Greedy, EOS disabled (``eos_token_id=-1``, like kvasir's ``ignore_eos``), so every
    request must come back with exactly its requested length; the time runs from the
    first request in to the last result out (cache allocation and HF's warm-up excluded,
    as kvasir's start-up is). ``cb_config`` is an optional ``ContinuousBatchingConfig``
    (None: HF sizes its paged cache from free memory).

    HF logs errors in its worker thread instead of raising them, and hands back failed
    or dropped requests with partial or no tokens; so any request that failed, is
    missing or is short raises here instead of being counted.

    Runs outside inference mode: transformers 5.17 builds its batch processor in this
    thread (warm-up) and resets it in a worker thread that is not in inference mode, so
    under ``run_hf``'s ``inference_mode`` the worker died on its first in-place update
    and every request was dropped (0 tokens). 5.24 copies the caller's mode into the
    worker; both work with it off.
    """
    from transformers import GenerationConfig

    kwargs = {}
    try:  # sizing hints, as generate_batch passes them (transformers >= 5.1x)
        from transformers.generation.continuous_batching.utils import WorkloadHints

        kwargs["workload_hints"] = WorkloadHints(
            max_prompt_length=max(len(p) for p, _ in work),
            max_generated_length=max(o for _, o in work),
            num_requests=len(work),
        )
    except ImportError:
        pass
    gen_cfg = GenerationConfig(
        max_new_tokens=max(o for _, o in work), do_sample=False, eos_token_id=-1
    )
    ids = [f"req_{i}" for i in range(len(work))]
    results: dict = {}
    dropped: list[str] = []
    with (
        torch.inference_mode(False),
        torch.no_grad(),
        model.continuous_batching_context_manager(
            generation_config=gen_cfg,
            continuous_batching_config=cb_config,
            block=True,
            timeout=60,
            **kwargs,
        ) as manager,
    ):
        _sync()
        t0 = time.perf_counter()
        for rid, (p, o) in zip(ids, work):
            if (
                manager.add_request(
                    input_ids=list(p), request_id=rid, max_new_tokens=o, eos_token_id=-1
                )
                is None
            ):
                dropped.append(rid)  # the worker thread has already died
        while len(results) + len(dropped) < len(work):
            r = manager.get_result(timeout=1)
            if r is None:
                if not manager.is_running():
                    break
                continue
            if r.is_finished():
                results[r.request_id] = r
        _sync()
        elapsed = time.perf_counter() - t0
        status = getattr(manager, "background_thread_status", None)
        fatal = getattr(status, "fatal_error", None)
    bad = []
    for rid, (_, o) in zip(ids, work):
        r = results.get(rid)
        if r is None:
            bad.append(f"{rid}: dropped" if rid in dropped else f"{rid}: no result")
        elif r.error is not None:
            bad.append(f"{rid}: failed after {len(r.generated_tokens)} tokens: {r.error}")
        elif len(r.generated_tokens) != o:
            bad.append(f"{rid}: {len(r.generated_tokens)} tokens, asked for {o}")
    if bad:
        worker = f"; worker thread error: {fatal!r}" if fatal is not None else ""
        raise RuntimeError(
            f"HF continuous batching did not complete {len(bad)} of {len(work)} requests "
            f"as asked (first: {bad[0]}){worker}; no comparison made"
        )
    return elapsed, sum(len(results[rid].generated_tokens) for rid in ids)


def main(args: argparse.Namespace) -> int:
    from kvasir.bench.hw import engine_device, forward_flops, measure_ceilings
    from kvasir.engine.arg_utils import EngineArgs
    from kvasir.entrypoints.llm import LLM

    if args.speculative_config:
        from kvasir.bench import spec

        return spec.main(args, concurrent=True)
    if getattr(args, "num_loras", 0):
        from kvasir.bench import lora

        return lora.main(args)
    ea = EngineArgs.from_cli_args(args)
    kwargs = {k: v for k, v in vars(ea).items() if k != "model"}
    llm = LLM(model=ea.model, **kwargs)
    core = llm.llm_engine.engine_core
    arch = core.arch_config
    device, dtype, num_devices = engine_device(core)
    ceil = measure_ceilings(device, dtype)
    work = make_workload(
        args.num_prompts, args.input_len, args.output_len, arch.vocab_size, args.workload_seed
    )
    elapsed, num_out = run_kvasir(llm, work)
    num_in = sum(len(p) for p, _ in work)
    # FLOPs actually required: every prompt and output token through the model, and
    # attention over each token's causal context.
    pairs = sum((len(p) + o) ** 2 / 2 for p, o in work)
    flops = forward_flops(arch, num_in + num_out, pairs)
    mfu = flops / elapsed / (num_devices * ceil.matmul_tflops * 1e12)
    result = {
        "bench": "throughput",
        "device": ceil.device_name,
        "model": llm.llm_engine.model_info.model_name,
        "dtype": str(dtype).removeprefix("torch."),
        "num_devices": num_devices,
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
        core.shutdown()
        del llm, core  # free the engine's weights and KV cache before loading HF
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
    for k in (
        "device",
        "output_tok_s",
        "total_tok_s",
        "mfu",
        "hf_output_tok_s",
        "speedup_vs_hf",
        "copy_bandwidth_gbs",
        "matmul_tflops",
    ):
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
        return (
            transformers.AutoModelForCausalLM.from_pretrained(
                os.path.dirname(path), gguf_file=os.path.basename(path), dtype=dtype
            )
            .to(device)
            .eval()
        )
    if ea.load_format != "dummy":
        return (
            transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        )
    from kvasir.config import ModelConfig
    from kvasir.models.loader import resolve_model_path

    cfg_path, _ = resolve_model_path(ModelConfig(model=path, load_format="dummy"))
    if os.path.isdir(cfg_path):
        cfg_path = os.path.join(cfg_path, "config.json")
    cfg = transformers.AutoConfig.from_pretrained(cfg_path)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()
