"""``kvasir bench throughput --enable-lora --num-loras N``: requests spread uniformly or
Zipf over N adapters, against the same requests on the base model alone in the same
call (one engine, the base run first); cold-start latency and the adapter cache's hit
rates per tier (device slots, host memory, disk).

Adapters come from ``--lora-modules`` (the first N); with ``--random-lora-dir`` the
missing ones are written there as random PEFT adapters of ``--random-lora-rank`` on
every linear layer of the model (``write_random_adapter``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch


def add_cli_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA throughput (with --enable-lora)")
    g.add_argument("--num-loras", type=int, default=0, help="adapters the requests use")
    g.add_argument("--lora-distribution", choices=["uniform", "zipf"], default="uniform")
    g.add_argument("--zipf-s", type=float, default=1.0, help="Zipf exponent")
    g.add_argument(
        "--random-lora-dir",
        default=None,
        help="write random adapters here for the ones --lora-modules does not name",
    )
    g.add_argument("--random-lora-rank", type=int, default=16)


def write_random_adapter(
    path: str, module_shapes: dict[str, tuple[int, int]], rank: int, seed: int
) -> None:
    """A random LoRA adapter in PEFT's format on every module of ``module_shapes``
    (``A`` unit-scale over its inputs, ``B`` small, so outputs stay sane)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (in_f, out_f) in module_shapes.items():
        key = f"base_model.model.{name}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) / in_f**0.5
        tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * 0.01
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    leaves = sorted({n.rpartition(".")[2] for n in module_shapes})
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": leaves,
           "bias": "none", "use_rslora": False}  # fmt: skip
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)


def assign_adapters(n: int, num_loras: int, distribution: str, s: float, seed: int) -> list[int]:
    """Adapter index (0..num_loras-1) per request: uniform or Zipf(s) over the ranks."""
    rng = random.Random(seed + 1)
    if distribution == "uniform":
        return [rng.randrange(num_loras) for _ in range(n)]
    weights = [1.0 / (k + 1) ** s for k in range(num_loras)]
    return rng.choices(range(num_loras), weights=weights, k=n)


def main(args: argparse.Namespace) -> int:
    from kvasir.bench.hw import engine_device
    from kvasir.bench.throughput import make_workload
    from kvasir.engine.arg_utils import EngineArgs, parse_lora_modules
    from kvasir.entrypoints.llm import LLM
    from kvasir.lora.request import LoRARequest
    from kvasir.sampling_params import SamplingParams

    ea = EngineArgs.from_cli_args(args)
    if not ea.enable_lora:
        raise ValueError("--num-loras needs --enable-lora")
    named = list(parse_lora_modules(ea.lora_modules))
    if len(named) < args.num_loras and args.random_lora_dir is None:
        raise ValueError(
            f"--num-loras {args.num_loras}: --lora-modules names {len(named)} adapters; give "
            "more or --random-lora-dir to write random ones"
        )
    kwargs = {k: v for k, v in vars(ea).items() if k != "model"}
    llm = LLM(model=ea.model, **kwargs)
    core = llm.llm_engine.engine_core
    manager = core.lora_manager
    assert manager is not None
    device, dtype, _ = engine_device(core)
    loras = [LoRARequest(n, i + 1, p) for i, (n, p) in enumerate(named[: args.num_loras])]
    for i in range(len(loras), args.num_loras):
        path = os.path.join(args.random_lora_dir, f"random-r{args.random_lora_rank}-{i}")
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            write_random_adapter(path, manager.module_shapes, args.random_lora_rank, seed=i)
        loras.append(LoRARequest(f"random-{i}", len(named) + i + 1, path))
    work = make_workload(
        args.num_prompts, args.input_len, args.output_len, core.arch_config.vocab_size,
        args.workload_seed,
    )  # fmt: skip
    which = assign_adapters(
        len(work), args.num_loras, args.lora_distribution, args.zipf_s, args.workload_seed
    )
    prompts = [w[0] for w in work]
    params = [SamplingParams(temperature=0.0, max_tokens=w[1], ignore_eos=True) for w in work]
    warm = [SamplingParams(max_tokens=4, ignore_eos=True)] * 2
    llm.generate(prompts[:2], warm, use_tqdm=False)

    def timed(lora_requests) -> tuple[float, int]:
        core.reset_prefix_cache()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False, lora_request=lora_requests)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, sum(len(o.outputs[0].token_ids) for o in outs)

    t_base, n_base = timed(None)
    before = dict(manager.stats())
    slots = core.scheduler.lora_slots
    hits0, loads0 = slots.num_hits, slots.num_loads
    t_lora, n_lora = timed([loras[i] for i in which])
    after = manager.stats()
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    admissions = (slots.num_hits - hits0) + (slots.num_loads - loads0)
    host_lookups = d["host_hits"] + d["host_misses"]
    result = {
        "bench": "throughput_lora",
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "model": llm.llm_engine.model_info.model_name,
        "dtype": str(dtype).removeprefix("torch."),
        "num_prompts": len(work),
        "num_loras": args.num_loras,
        "distribution": args.lora_distribution,
        "max_loras": ea.max_loras,
        "max_cpu_loras": ea.max_cpu_loras or ea.max_loras,
        "lora_strategy": ea.lora_strategy,
        "base_output_tok_s": round(n_base / t_base, 1),
        "lora_output_tok_s": round(n_lora / t_lora, 1),
        "lora_vs_base": round((n_lora / t_lora) / (n_base / t_base), 3),
        "cold_starts": int(d["cold_starts"]),
        "cold_start_mean_s": round(d["cold_start_seconds_sum"] / d["cold_starts"], 4)
        if d["cold_starts"]
        else None,
        "device_slot_hit_rate": round((slots.num_hits - hits0) / admissions, 3)
        if admissions
        else None,
        "device_loads": int(d["device_loads"]),
        "host_hit_rate": round(d["host_hits"] / host_lookups, 3) if host_lookups else None,
        "disk_loads": int(d["disk_loads"]),
        "merged_steps": int(d["merged_steps"]),
    }
    for k, v in result.items():
        print(f"{k:<24}{v!s:>24}")
    line = json.dumps(result)
    print(line)
    if args.output_json:
        with open(args.output_json, "w") as f:
            f.write(line + "\n")
    core.shutdown()
    return 0
