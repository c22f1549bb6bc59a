"""Cost of the security features, measured in one process and one call each:

* generation throughput of the same batch with the watermark on vs off (engine, same
  prompts and seeds; alternating rounds, best of each);
* the watermark's logits bias alone on a [batch, vocab] block, beside the sampler;
* per request: tenant admission + refund, the input injection guard;
* per streamed chunk: the output redaction guard.

``python benchmarks/bench_security.py [--model tiny-llama --load-format dummy]``; the
last line is a JSON summary. Timings on a shared, loaded machine are noisy: compare the
on/off pairs, which ran interleaved.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def _best(fn, rounds: int) -> float:  # noqa: ANN001
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def engine_throughput(
    model: str | None, load_format: str, batch: int, max_tokens: int, rounds: int
) -> dict:
    from kvasir import LLM, SamplingParams

    kw = {"model": model, "load_format": load_format} if model else {}
    llms = {
        "off": LLM(max_model_len=512, kv_cache_gb=0.2, log=False, **kw),
        "on": LLM(watermark_key="bench", max_model_len=512, kv_cache_gb=0.2, log=False, **kw),
    }
    prompts = [[1, 100 + i, 200 + i, 300 + i] for i in range(batch)]
    sp = SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True, seed=1)
    out: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(rounds):
        for name, llm in llms.items():
            t0 = time.perf_counter()
            llm.generate(prompts, sp, use_tqdm=False)
            out[name].append(batch * max_tokens / (time.perf_counter() - t0))
    best = {k: max(v) for k, v in out.items()}
    return {
        "tokens_per_s_off": best["off"],
        "tokens_per_s_on": best["on"],
        "watermark_cost_pct": 100 * (1 - best["on"] / best["off"]),
    }


def watermark_kernel(batch: int, vocab: int, rounds: int) -> dict:
    from kvasir.security.watermark import Watermark, WatermarkParams

    wm = Watermark(WatermarkParams("bench"))
    logits = torch.randn(batch, vocab)
    ctx = torch.randint(0, vocab, (batch, 1))
    probs_t = _best(lambda: torch.softmax(logits / 0.8, dim=-1), rounds)
    wm_t = _best(lambda: wm.apply(logits, ctx), rounds)
    return {"watermark_apply_ms": 1e3 * wm_t, "softmax_ms": 1e3 * probs_t}


def per_request_costs(rounds: int) -> dict:
    from pathlib import Path

    from kvasir.guard.injection import detect_injection
    from kvasir.guard.redact import Redactor, StreamRedactor
    from kvasir.security.tenants import TenantRegistry

    reg = TenantRegistry.from_dict(
        {"tenants": [{"name": f"t{i}", "keys": [f"sk-{i:04d}-bench-key"],
                      "limits": {"requests_per_minute": 10**9, "tokens_per_minute": 10**12,
                                 "max_concurrent_requests": 10**6}} for i in range(100)]}
    )  # fmt: skip
    n = 2000
    t0 = time.perf_counter()
    for i in range(n):
        t = reg.lookup(f"sk-{i % 100:04d}-bench-key")
        reg.limiter.admit(t, 100, 200).finish(50)
    tenant_us = 1e6 * (time.perf_counter() - t0) / n
    corpus = Path(__file__).resolve().parents[1] / "tests/security/data/injection_corpus.jsonl"
    prompts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    t0 = time.perf_counter()
    for _ in range(rounds):
        for p in prompts:
            detect_injection(p)
    inj_us = 1e6 * (time.perf_counter() - t0) / (rounds * len(prompts))
    text = ("The answer is that the committee met on Tuesday and agreed. " * 20).split(" ")
    r = Redactor()
    t0 = time.perf_counter()
    chunks = 0
    for _ in range(rounds):
        sr = StreamRedactor(r)
        for w in text:
            sr.feed(w + " ")
            chunks += 1
        sr.flush()
    redact_us = 1e6 * (time.perf_counter() - t0) / chunks
    return {
        "tenant_lookup_admit_finish_us": tenant_us,
        "injection_guard_us_per_prompt": inj_us,
        "redaction_guard_us_per_chunk": redact_us,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    res = {
        "device": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
    }
    res.update(
        engine_throughput(
            args.model or None, args.load_format, args.batch, args.max_tokens, args.rounds
        )
    )
    res.update(watermark_kernel(32, 49152, 10))
    res.update(per_request_costs(5))
    for k, v in res.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}))


if __name__ == "__main__":
    main()
