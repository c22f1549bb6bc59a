"""Structured outputs' cost: the same 32 concurrent requests through one engine, with a
JSON schema vs without, and the first request of a new schema's wait for its grammar.

Both runs generate exactly ``--max-tokens`` tokens per request (the unconstrained one
with ``ignore_eos``; the schema needs at least ``--max-tokens`` tokens to complete), so
tokens/s compares like with like. Rounds alternate (constrained, unconstrained, ...)
after a warm-up of each, with the grammar cached from the warm-up; the median round
is reported. Then a fresh schema: the time from submitting it to its grammar being
ready (``GrammarState.compile_wait_s``) and its first token against an unconstrained
request's, in an idle engine.

Example (CPU, the default model's shape with random weights and its tokenizer):
    python benchmarks/bench_structured_outputs.py --model smollm2-135m --load-format dummy \\
        --tokenizer /path/to/smollm2-tokenizer
Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

from kvasir import LLM, SamplingParams
from kvasir.sampling_params import StructuredOutputsParams


def schema(min_items: int, salt: int = 0) -> dict:
    # An object whose array needs at least min_items integers: no early stop.
    return {
        "type": "object",
        "properties": {
            f"values_{salt}": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": 999},
                "minItems": min_items,
            }
        },
        "required": [f"values_{salt}"],
    }


def run(llm: LLM, prompts: list[str], sp: SamplingParams) -> tuple[float, int]:
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    dt = time.perf_counter() - t0
    return dt, sum(len(o.outputs[0].token_ids) for o in outs)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--load-format", default="auto")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    llm = LLM(
        args.model,
        log=False,
        load_format=args.load_format,
        tokenizer=args.tokenizer,
        max_model_len=512,
        max_num_seqs=max(64, args.num_requests),
        device=args.device,
    )
    prompts = [f"Request {i}: list some numbers as JSON." for i in range(args.num_requests)]
    base = dict(temperature=0.0, max_tokens=args.max_tokens)
    plain = SamplingParams(ignore_eos=True, **base)
    constrained = SamplingParams(
        structured_outputs=StructuredOutputsParams(json=schema(args.max_tokens)), **base
    )
    run(llm, prompts, plain)  # warm-up (and the grammar compiled and cached)
    run(llm, prompts, constrained)
    rates: dict[str, list[float]] = {"json_schema": [], "none": []}
    for _ in range(args.rounds):
        for name, sp in (("json_schema", constrained), ("none", plain)):
            dt, n = run(llm, prompts, sp)
            assert n == args.num_requests * args.max_tokens, (name, n)
            rates[name].append(n / dt)
    med = {k: statistics.median(v) for k, v in rates.items()}

    # A schema the engine has not seen: its grammar's wait, and its first token.
    core = llm.llm_engine.engine_core
    fresh = SamplingParams(
        structured_outputs=StructuredOutputsParams(json=schema(4, salt=12345)),
        temperature=0.0,
        max_tokens=1,
    )
    t0 = time.perf_counter()
    llm.generate(prompts[:1], fresh, use_tqdm=False)
    ttft_new = time.perf_counter() - t0
    waits = [
        st.compile_wait_s
        for st in [core.structured_output._last_state]  # type: ignore[union-attr]
        if st is not None
    ]
    t0 = time.perf_counter()
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    ttft_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    backend = core.structured_output._backend  # type: ignore[union-attr]
    backend.compile(StructuredOutputsParams(json=schema(4, salt=777)))
    compile_s = time.perf_counter() - t0
    summary = {
        "device": platform.processor() or platform.machine(),
        "num_requests": args.num_requests,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "tok_s_none": round(med["none"], 1),
        "tok_s_json_schema": round(med["json_schema"], 1),
        "cost_pct": round(100 * (1 - med["json_schema"] / med["none"]), 2),
        "rounds_none": [round(x, 1) for x in rates["none"]],
        "rounds_json_schema": [round(x, 1) for x in rates["json_schema"]],
        "new_schema_compile_wait_s": round(waits[0], 4) if waits else None,
        "new_schema_compile_s": round(compile_s, 4),
        "ttft_new_schema_s": round(ttft_new, 4),
        "ttft_unconstrained_s": round(ttft_plain, 4),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
