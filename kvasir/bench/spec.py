"""Speculative decoding against plain decoding, in the same run.

``kvasir bench latency|throughput --speculative-config JSON`` lands here: the same
prompts through an engine without speculation and one with it, output tokens per
second of each and their ratio, plus the mean accepted length per verifying step
(``1 + accepted / drafts``) and the acceptance rate. Latency runs the prompts one at
a time (batch 1); throughput sends ``--num-prompts`` at once. Prompts are real text,
since random token ids give a draft nothing to predict:

* ``grounded``: rewrite, continue or edit a passage that is in the prompt (passages
  of ``../shared/data/tinyshakespeare.txt`` when present, and small code edits);
* ``chat``: open questions, answered from the model alone.

Greedy decoding with the model's own stop tokens, so both engines produce the same
tokens (speculative decoding is lossless) and the ratio is of the same work.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from dataclasses import replace
from pathlib import Path

import torch

PROMPT_SETS = ("grounded", "chat")

_CODE = """def moving_average(values, window):
    result = []
    total = 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            result.append(total / window)
    return result
"""

_CHAT = [
    "Write a short story about a dragon who learns to cook.",
    "Explain how a rainbow forms, for a ten-year-old.",
    "Give me five ideas for a weekend trip with friends.",
    "What are the pros and cons of working from home?",
    "Describe your ideal breakfast in a few sentences.",
    "How do I start learning to play the guitar?",
    "Write a polite email asking my landlord to fix the heating.",
    "What should I pack for a week of hiking in the mountains?",
]


def _corpus() -> str:
    here = Path(__file__).resolve()
    for parent in here.parents:
        p = parent.parent / "shared" / "data" / "tinyshakespeare.txt"
        if p.is_file():
            return p.read_text()
    env = os.environ.get("KVASIR_CORPUS")
    return Path(env).read_text() if env else ""


def prompt_set(name: str, n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """``n`` chat conversations of the set ``name``."""
    if name not in PROMPT_SETS:
        raise ValueError(f"--prompts must be one of {PROMPT_SETS}, got {name!r}")
    rng = random.Random(seed)
    out = []
    if name == "chat":
        for i in range(n):
            out.append([{"role": "user", "content": _CHAT[i % len(_CHAT)]}])
        return out
    text = _corpus()
    for i in range(n):
        kind = i % 3
        if kind == 2 or not text:
            old, new = rng.choice(
                [("values", "samples"), ("total", "running_sum"), ("window", "size")]
            )
            msg = f"Rename `{old}` to `{new}` in this code and show the whole result:\n\n{_CODE}"
        else:
            start = rng.randrange(0, max(len(text) - 700, 1))
            start = text.find("\n\n", start) + 2
            passage = text[start : start + 500].rsplit("\n", 1)[0]
            if kind == 0:
                msg = f"Repeat the following passage exactly, word for word:\n\n{passage}"
            else:
                msg = f"Rewrite this passage in modern English, line by line:\n\n{passage}"
        out.append([{"role": "user", "content": msg}])
    return out


def _run(llm, convs, max_tokens: int, concurrent: bool) -> tuple[float, int, tuple[int, int, int]]:
    from kvasir.sampling_params import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    sched = llm.llm_engine.engine_core.scheduler
    llm.chat(convs[0], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)  # warm-up
    s0 = sched.make_stats()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    num_out = 0
    if concurrent:
        outs = llm.chat(convs, sp, use_tqdm=False)
        num_out = sum(len(o.outputs[0].token_ids) for o in outs)
    else:
        for conv in convs:
            o = llm.chat(conv, sp, use_tqdm=False)
            num_out += len(o[0].outputs[0].token_ids)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    s1 = sched.make_stats()
    spec = (
        s1.spec_num_drafts - s0.spec_num_drafts,
        s1.spec_num_draft_tokens - s0.spec_num_draft_tokens,
        s1.spec_num_accepted_tokens - s0.spec_num_accepted_tokens,
    )
    return elapsed, num_out, spec


def compare(args: argparse.Namespace, concurrent: bool) -> dict:
    """Both engines on the same prompts, alternating for ``--spec-rounds`` rounds (so a
    noisy neighbour slows both alike); returns the result row. Rates are medians over
    rounds; acceptance is over all of them."""
    import statistics

    from kvasir.engine.arg_utils import EngineArgs
    from kvasir.entrypoints.llm import LLM

    ea = EngineArgs.from_cli_args(args)
    n = args.num_prompts if concurrent else args.num_spec_prompts
    convs = prompt_set(args.prompts, n, getattr(args, "workload_seed", 0))
    engines = {}
    for label, spec in (("baseline", None), ("speculative", ea.speculative_config)):
        e = replace(ea, speculative_config=spec)
        kwargs = {k: v for k, v in vars(e).items() if k != "model"}
        engines[label] = LLM(model=e.model, log=False, **kwargs)
    rates: dict[str, list[float]] = {k: [] for k in engines}
    tokens: dict[str, list[int]] = {k: [] for k in engines}
    drafts = draft_tokens = accepted = 0
    for _ in range(args.spec_rounds):
        for label, llm in engines.items():
            elapsed, num_out, (d, dt, a) = _run(llm, convs, args.spec_max_tokens, concurrent)
            rates[label].append(num_out / elapsed)
            tokens[label].append(num_out)
            if label == "speculative":
                drafts, draft_tokens, accepted = drafts + d, draft_tokens + dt, accepted + a
    info = engines["baseline"].llm_engine.model_info
    for llm in engines.values():
        llm.llm_engine.engine_core.shutdown()
    base_tps = statistics.median(rates["baseline"])
    spec_tps = statistics.median(rates["speculative"])
    ratios = [s / b for s, b in zip(rates["speculative"], rates["baseline"], strict=True)]
    return {
        "bench": "spec_latency" if not concurrent else "spec_throughput",
        "model": info.model_name,
        "device": info.device,
        "prompts": args.prompts,
        "num_prompts": n,
        "concurrent": concurrent,
        "speculative_config": args.speculative_config,
        "max_tokens": args.spec_max_tokens,
        "rounds": args.spec_rounds,
        "baseline_output_tok_s": round(base_tps, 2),
        "spec_output_tok_s": round(spec_tps, 2),
        "speedup": round(spec_tps / base_tps, 3),
        "speedup_per_round": [round(r, 3) for r in ratios],
        "same_output_tokens": tokens["baseline"] == tokens["speculative"],
        "acceptance_rate": round(accepted / draft_tokens, 3) if draft_tokens else 0.0,
        "mean_accepted_length": round(1 + accepted / drafts, 3) if drafts else 1.0,
        "mean_drafts_per_verify": round(draft_tokens / drafts, 3) if drafts else 0.0,
    }


def add_cli_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding comparison (with --speculative-config)")
    g.add_argument("--prompts", choices=PROMPT_SETS, default="grounded")
    g.add_argument(
        "--num-spec-prompts", type=int, default=6, help="latency: prompts, one at a time"
    )
    g.add_argument("--spec-max-tokens", type=int, default=128)
    g.add_argument("--spec-rounds", type=int, default=3, help="alternating rounds per engine")


def main(args: argparse.Namespace, concurrent: bool) -> int:
    import json

    result = compare(args, concurrent)
    print()
    print(f"{'metric':<26}{'value':>16}")
    for k, v in result.items():
        if k not in ("bench", "model", "speculative_config"):
            print(f"{k:<26}{v!s:>16}")
    line = json.dumps(result)
    print(line)
    if getattr(args, "output_json", None):
        with open(args.output_json, "w") as f:
            f.write(line + "\n")
    return 0
