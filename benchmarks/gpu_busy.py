"""How busy the GPU is during steady decode: GPU time / wall time over a window of steps.

Runs ``--batch-size`` requests of ``--input-len`` random tokens decoding together
(Qwen3-0.6B shape by default, random weights), lets them settle into pure decode, then
times ``--steps`` engine steps (``LLMEngine.step``: scheduling, the device step, output
processing) two ways at once:

* wall: ``time.perf_counter`` around the steps, ending with a device synchronize;
* GPU: CUDA events recorded on the stream right before each step's forward (graph
  replay, or the eager model call) and right after its sampler, summed over the steps.
  Each pair brackets the device work of one step (input copies excluded, so this is a
  lower bound), read back after the window so the measurement adds no sync.

busy = GPU / wall. As a cross-check it also replays the captured decode graph plus a
greedy argmax ``--steps`` times back to back (no host in the way): the device's own
time per step, and ``replay_ms / wall_ms`` as a second busy estimate. The host side of
the window is split into scheduler / runner launch / read-back + update / output
processing (perf_counter around each call). torch.profiler is not used: its
per-op CPU tracing slows the host several-fold and misattributes graph kernels.

Prints a one-line JSON summary last (with ``--compare-sync``, the run with async
scheduling off is nested under "sync").
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
from collections import defaultdict
from typing import Any

import torch


def _wrap_timed(obj: Any, name: str, acc: dict[str, float], key: str) -> None:
    fn = getattr(obj, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[key] += time.perf_counter() - t

    setattr(obj, name, timed)


def run_once(args: argparse.Namespace, async_scheduling: bool | None) -> dict:
    from kvasir import LLM, SamplingParams
    from kvasir.engine.arg_utils import EngineArgs

    kw: dict[str, Any] = {}
    if async_scheduling is not None and "async_scheduling" in EngineArgs.__dataclass_fields__:
        kw["async_scheduling"] = async_scheduling
    llm = LLM(
        model=args.model,
        load_format="dummy",
        max_model_len=args.max_model_len,
        enforce_eager=args.enforce_eager,
        log=False,
        **kw,
    )
    engine = llm.llm_engine
    core = engine.engine_core
    runner = core.runner
    vocab = engine.model_info.vocab_size
    rng = random.Random(0)
    total_steps = args.warmup_steps + args.steps
    sp = SamplingParams(temperature=0.0, max_tokens=total_steps + 16, ignore_eos=True)
    for i in range(args.batch_size):
        prompt = [rng.randrange(1000, vocab) for _ in range(args.input_len)]
        engine.add_request(str(i), prompt, sp)
    for _ in range(args.warmup_steps):  # prefill, then settle into pure decode
        engine.step()
    torch.cuda.synchronize()
    assert core.scheduler.make_stats().num_running_reqs == args.batch_size

    # GPU brackets: start before the forward, end after the sampler.
    pairs: list[list[torch.cuda.Event]] = []

    def mark_start() -> None:
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        pairs.append([e])

    cg = getattr(runner, "cuda_graph", None)
    if cg is not None:
        for g in cg.graphs.values():
            replay = g.replay

            def bracketed(replay: Any = replay) -> None:
                mark_start()
                replay()

            g.replay = bracketed  # type: ignore[method-assign]
    model_forward = runner.model.forward

    def forward(*a: Any, **k: Any) -> Any:
        mark_start()
        return model_forward(*a, **k)

    runner.model.forward = forward  # type: ignore[method-assign]
    sampler_forward = runner.sampler.forward

    def sample(*a: Any, **k: Any) -> Any:
        out = sampler_forward(*a, **k)
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        pairs[-1].append(e)
        return out

    runner.sampler.forward = sample  # type: ignore[method-assign]
    host: dict[str, float] = defaultdict(float)
    _wrap_timed(core.scheduler, "schedule", host, "schedule")
    _wrap_timed(core.scheduler, "update_from_output", host, "update_from_output")
    launch = "execute_model_async" if hasattr(runner, "execute_model_async") else "execute_model"
    _wrap_timed(runner, launch, host, "runner_" + launch)
    _wrap_timed(engine.output_processor, "process_outputs", host, "output_processor")

    t0 = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    assert all(len(p) == 2 for p in pairs), "a forward without a sampler"
    gpu_ms = sum(a.elapsed_time(b) for a, b in pairs)
    wall_ms = wall * 1e3
    result: dict[str, Any] = {
        "async_scheduling": bool(getattr(core, "async_scheduling", False)),
        "cuda_graphs": cg is not None,
        "ms_per_step": round(wall_ms / args.steps, 3),
        "gpu_ms_per_step": round(gpu_ms / len(pairs), 3) if pairs else None,
        "gpu_busy_fraction": round(gpu_ms / wall_ms, 4),
        "forwards_in_window": len(pairs),
        "decode_tok_s": round(args.batch_size * args.steps / wall, 1),
        "host_ms_per_step": {k: round(v * 1e3 / args.steps, 3) for k, v in host.items()},
    }
    if cg is not None:
        size = cg.padded_size(args.batch_size)
        graph, logits = cg.graphs[size], cg.logits[size]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(3):
            torch.cuda.CUDAGraph.replay(graph)
        start.record()
        for _ in range(args.steps):
            torch.cuda.CUDAGraph.replay(graph)  # the unwrapped method
            logits[: args.batch_size].argmax(dim=-1)
        end.record()
        torch.cuda.synchronize()
        replay_ms = start.elapsed_time(end) / args.steps
        result["replay_ms_per_step"] = round(replay_ms, 3)
        result["busy_vs_replay"] = round(replay_ms / (wall_ms / args.steps), 4)
    del llm, engine, core, runner, cg
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="default: the engine's default (on for CUDA)",
    )
    p.add_argument("--compare-sync", action="store_true", help="also run with it off")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_busy needs a CUDA GPU")

    result: dict[str, Any] = {
        "bench": "gpu_busy",
        "device": torch.cuda.get_device_name(),
        "model": args.model,
        "batch_size": args.batch_size,
        "input_len": args.input_len,
        "steps": args.steps,
    }
    result.update(run_once(args, args.async_scheduling))
    if args.compare_sync:
        sync = run_once(args, False)
        print(json.dumps({"sync": sync}))
        result["sync"] = sync
    print(json.dumps(result))


if __name__ == "__main__":
    main()
