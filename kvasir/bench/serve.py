"""serve: load-test any OpenAI-compatible server (TTFT, TPOT, ITL, latency, goodput).

    kvasir bench serve --base-url http://127.0.0.1:8000 --num-prompts 200 \\
        --request-rate 4 --input-len 256 --output-len 128 --goodput ttft:1000 tpot:50

Arrivals are Poisson (``--burstiness 1``), gamma-distributed (other burstiness), or at
a fixed rate (``--arrival constant``); ``--max-concurrency`` caps requests in flight
(with ``--request-rate inf`` that is a fixed-concurrency closed loop). Every request
streams; TTFT is the first chunk with text, ITL the gaps between text chunks, TPOT
(latency - TTFT) / (output tokens - 1). Token counts come from the server's usage.
Prints a table, then a one-line JSON summary last (also written by ``--result-file``).

A JSONL dataset row may also carry what the scheduler reads -- ``tenant`` (sent as
OpenAI's ``user``), ``service_tier`` (``interactive`` / ``batch``), ``ttft_slo_ms``,
``tpot_slo_ms`` --, ``ignore_eos``, and ``arrival_s`` (seconds after the start; when
any row has it, rows are sent at those times instead of at ``--request-rate``). The
summary then has goodput per class (requests meeting the row's own SLOs, else
``--goodput``'s) and latency per tenant; a request refused with HTTP 429 counts as
rejected (it met no SLO).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

# Common English words: each is one token (with its leading space) in the usual BPE
# vocabularies, so a synthetic prompt of k words is close to k tokens.
_WORDS = (
    "the of and to in is was for on as with by he at from his an were are which this be "
    "or had not but first one their its new after who they have her she two been other "
    "when there all during into school time may years more most only over city some "
    "world would where later up such used many can state about national out known "
    "university united then made year between under part while west would these well "
    "film team through being game best north both three south high house season before "
    "second music war group also where since people family life early work any county "
    "around along three large including area book found name until against because "
    "number each small long good place city land back same play way great three days"
).split()


@dataclass
class RequestSpec:
    prompt: str | list[dict] | list[int]
    max_tokens: int
    tenant: str | None = None
    service_tier: str | None = None
    ttft_slo_ms: float | None = None
    tpot_slo_ms: float | None = None
    ignore_eos: bool | None = None
    arrival_s: float | None = None


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    rejected: bool = False  # HTTP 429 (admission control or a full queue)
    spec: RequestSpec | None = None

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = parser
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    p.add_argument(
        "--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"]
    )
    p.add_argument("--model", default=None, help="default: the first of /v1/models")
    p.add_argument(
        "--api-key", default=os.environ.get("KVASIR_API_KEY") or os.environ.get("OPENAI_API_KEY")
    )
    p.add_argument(
        "--dataset-path",
        default=None,
        help="JSONL: one object per line with 'prompt' (text) or 'messages', and "
        "optionally 'max_tokens'/'output_len'. Default: synthetic prompts.",
    )
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=128, help="synthetic prompt words (~tokens)")
    p.add_argument("--output-len", type=int, default=64, help="max_tokens per request")
    p.add_argument(
        "--random-token-ids",
        action="store_true",
        help="synthetic prompts as random token-id lists of exactly --input-len "
        "(completions only; for models without a tokenizer, e.g. --load-format dummy)",
    )
    p.add_argument(
        "--range-ratio", type=float, default=0.0, help="lengths uniform in [len*(1-r), len*(1+r)]"
    )
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s")
    p.add_argument("--arrival", default="poisson", choices=["poisson", "constant"])
    p.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="gamma shape of inter-arrival times (1: Poisson)",
    )
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument(
        "--ignore-eos",
        action="store_true",
        help="generate exactly max_tokens (vLLM/kvasir extension)",
    )
    p.add_argument(
        "--goodput",
        nargs="*",
        default=[],
        metavar="METRIC:MS",
        help="SLOs in ms, e.g. ttft:1000 tpot:50 e2el:5000",
    )
    p.add_argument("--percentiles", default="50,90,99")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    p.add_argument("--result-file", default=None, help="write the JSON summary here")
    p.add_argument("--disable-tqdm", action="store_true")
    return p


def _length(rng: random.Random, mean: int, ratio: float) -> int:
    lo, hi = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return rng.randint(lo, hi)


# Per-row scheduling fields of a JSONL dataset (see the module docstring).
_ROW_FIELDS = (
    "tenant", "service_tier", "ttft_slo_ms", "tpot_slo_ms", "ignore_eos", "arrival_s"
)  # fmt: skip


def make_requests(args: argparse.Namespace, chat: bool) -> list[RequestSpec]:
    rng = random.Random(args.seed)
    specs: list[RequestSpec] = []
    if args.dataset_path:
        with open(args.dataset_path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if not rows:
            raise ValueError(f"dataset-path {args.dataset_path!r} has no rows")
        for i in range(args.num_prompts):
            row = rows[i % len(rows)]
            max_tokens = int(row.get("max_tokens", row.get("output_len", args.output_len)))
            if "messages" in row:
                prompt: Any = (
                    row["messages"]
                    if chat
                    else "\n".join(m.get("content", "") for m in row["messages"])
                )
            else:
                prompt = row["prompt"]
                if chat:
                    prompt = [{"role": "user", "content": prompt}]
            spec = RequestSpec(prompt, max_tokens)
            for name in _ROW_FIELDS:
                if row.get(name) is not None:
                    setattr(spec, name, row[name])
            specs.append(spec)
        return specs
    if args.random_token_ids and chat:
        raise ValueError("--random-token-ids needs --endpoint /v1/completions")
    for _ in range(args.num_prompts):
        n_in = _length(rng, args.input_len, args.range_ratio)
        if args.random_token_ids:
            # Ids well inside any real vocabulary, away from the special tokens.
            ids = [rng.randrange(1000, 20000) for _ in range(n_in)]
            specs.append(RequestSpec(ids, _length(rng, args.output_len, args.range_ratio)))
            continue
        text = " ".join(rng.choice(_WORDS) for _ in range(n_in))
        specs.append(
            RequestSpec(
                [{"role": "user", "content": text}] if chat else text,
                _length(rng, args.output_len, args.range_ratio),
            )
        )
    return specs


async def _one(
    client: Any, args: argparse.Namespace, model: str, spec: RequestSpec, chat: bool
) -> RequestResult:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": spec.max_tokens,
        "stream": True,
        "temperature": args.temperature,
        "stream_options": {"include_usage": True},
    }
    body["messages" if chat else "prompt"] = spec.prompt
    if args.ignore_eos or spec.ignore_eos:
        body["ignore_eos"] = True
    if spec.tenant is not None:
        body["user"] = spec.tenant
    for name in ("service_tier", "ttft_slo_ms", "tpot_slo_ms"):
        if getattr(spec, name) is not None:
            body[name] = getattr(spec, name)
    res = RequestResult(spec=spec)
    chunks = 0
    start = time.perf_counter()
    last = start
    try:
        async with client.stream("POST", args.endpoint, json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
                res.rejected = r.status_code == 429
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = str(obj["error"].get("message"))
                    return res
                if obj.get("usage"):
                    res.prompt_tokens = obj["usage"].get("prompt_tokens", 0)
                    res.output_tokens = obj["usage"].get("completion_tokens", 0)
                for c in obj.get("choices") or []:
                    # A completion chunk is a token event even with empty text (a model
                    # without a tokenizer) unless it only carries the finish_reason; a
                    # chat chunk counts once it has content (not the role-only chunk).
                    if chat:
                        got = (c.get("delta") or {}).get("content")
                    else:
                        got = c.get("text") or c.get("finish_reason") is None
                    if got:
                        now = time.perf_counter()
                        if chunks == 0:
                            res.ttft = now - start
                        else:
                            res.itl.append(now - last)
                        last = now
                        chunks += 1
    except Exception as e:  # network errors count as failures, not crashes
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.latency = time.perf_counter() - start
    if res.output_tokens == 0:
        res.output_tokens = chunks
    res.ok = True
    return res


def _arrival_gaps(args: argparse.Namespace, n: int) -> list[float]:
    rate = args.request_rate
    if math.isinf(rate) or rate <= 0:
        return [0.0] * n
    if args.arrival == "constant":
        return [1.0 / rate] * n
    rng = random.Random(args.seed + 1)
    shape = args.burstiness
    return [rng.gammavariate(shape, 1.0 / (rate * shape)) for _ in range(n)]


def _stats(xs: list[float], percentiles: list[float], scale: float = 1000.0) -> dict:
    if not xs:
        return {"mean": None, "std": None, **{f"p{p:g}": None for p in percentiles}}
    s = sorted(xs)
    out = {
        "mean": sum(s) / len(s) * scale,
        "std": (sum((x - sum(s) / len(s)) ** 2 for x in s) / len(s)) ** 0.5 * scale,
    }
    for p in percentiles:
        # Linear interpolation between closest ranks (numpy's default).
        k = (len(s) - 1) * p / 100.0
        lo, hi = math.floor(k), math.ceil(k)
        out[f"p{p:g}"] = (s[lo] + (s[hi] - s[lo]) * (k - lo)) * scale
    return out


def _parse_goodput(items: list[str]) -> dict[str, float]:
    slos = {}
    for item in items:
        name, _, ms = item.partition(":")
        if name not in ("ttft", "tpot", "e2el") or not ms:
            raise ValueError(f"--goodput {item!r}: expected ttft:MS, tpot:MS or e2el:MS")
        slos[name] = float(ms)
    return slos


def summarize(
    results: list[RequestResult], duration: float, args: argparse.Namespace, model: str
) -> dict:
    pct = [float(p) for p in str(args.percentiles).split(",") if p]
    ok = [r for r in results if r.ok]
    slos = _parse_goodput(args.goodput)

    def meets(r: RequestResult) -> bool:
        vals = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2el": r.latency}
        return all(vals[k] * 1000.0 <= v for k, v in slos.items())

    n_in = sum(r.prompt_tokens for r in ok)
    n_out = sum(r.output_tokens for r in ok)
    summary = {
        "base_url": args.base_url,
        "endpoint": args.endpoint,
        "model": model,
        "num_prompts": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "request_rate": args.request_rate if not math.isinf(args.request_rate) else "inf",
        "max_concurrency": args.max_concurrency,
        "duration_s": duration,
        "total_input_tokens": n_in,
        "total_output_tokens": n_out,
        "request_throughput": len(ok) / duration,
        "output_throughput": n_out / duration,
        "total_token_throughput": (n_in + n_out) / duration,
        "ttft_ms": _stats([r.ttft for r in ok], pct),
        "tpot_ms": _stats([t for r in ok if (t := r.tpot) is not None], pct),
        "itl_ms": _stats([x for r in ok for x in r.itl], pct),
        "e2el_ms": _stats([r.latency for r in ok], pct),
    }
    if slos:
        good = sum(1 for r in ok if meets(r))
        summary["goodput_slos_ms"] = slos
        summary["goodput"] = good / duration  # requests/s meeting every SLO
    if any(r.spec is not None and _has_class(r.spec) for r in results):
        summary["per_class"] = _per_group(results, duration, pct, slos, _class_of)
        summary["per_tenant"] = _per_group(results, duration, pct, slos, _tenant_of)
    errors = [r.error for r in results if not r.ok]
    if errors:
        summary["first_errors"] = errors[:3]
    return summary


def _has_class(spec: RequestSpec) -> bool:
    return any(getattr(spec, n) is not None for n in _ROW_FIELDS[:4])


def _class_of(r: RequestResult) -> str:
    tier = r.spec.service_tier if r.spec is not None else None
    return "batch" if tier in ("batch", "flex") else "interactive"


def _tenant_of(r: RequestResult) -> str:
    return (r.spec.tenant if r.spec is not None else None) or ""


def _meets_own(r: RequestResult, slos: dict[str, float]) -> bool:
    """The request's own SLOs (its row's), else ``--goodput``'s."""
    if not r.ok:
        return False
    spec = r.spec
    own = dict(slos)
    if spec is not None and spec.ttft_slo_ms is not None:
        own["ttft"] = spec.ttft_slo_ms
    if spec is not None and spec.tpot_slo_ms is not None:
        own["tpot"] = spec.tpot_slo_ms
    vals = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2el": r.latency}
    return all(vals[k] * 1000.0 <= v for k, v in own.items())


def _per_group(
    results: list[RequestResult],
    duration: float,
    pct: list[float],
    slos: dict[str, float],
    key: Any,
) -> dict[str, dict]:
    groups: dict[str, list[RequestResult]] = {}
    for r in results:
        groups.setdefault(key(r), []).append(r)
    out = {}
    for name, rs in sorted(groups.items()):
        ok = [r for r in rs if r.ok]
        good = sum(1 for r in rs if _meets_own(r, slos))
        out[name] = {
            "num_requests": len(rs),
            "completed": len(ok),
            "rejected": sum(1 for r in rs if r.rejected),
            "slo_met": good,
            "slo_attainment": good / len(rs),
            "goodput": good / duration,  # requests/s that met their SLOs
            "output_throughput": sum(r.output_tokens for r in ok) / duration,
            "ttft_ms": _stats([r.ttft for r in ok], pct),
            "tpot_ms": _stats([t for r in ok if (t := r.tpot) is not None], pct),
        }
    return out


def _print_table(s: dict) -> None:
    print(f"{'=' * 20} Serving Benchmark Result {'=' * 20}")
    rows = [
        ("Successful requests", s["completed"]),
        ("Failed requests", s["failed"]),
        ("Benchmark duration (s)", f"{s['duration_s']:.2f}"),
        ("Total input tokens", s["total_input_tokens"]),
        ("Total generated tokens", s["total_output_tokens"]),
        ("Request throughput (req/s)", f"{s['request_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{s['output_throughput']:.2f}"),
        ("Total token throughput (tok/s)", f"{s['total_token_throughput']:.2f}"),
    ]
    if "goodput" in s:
        rows.append(("Request goodput (req/s)", f"{s['goodput']:.2f}"))
    for name, v in rows:
        print(f"{name:<40}{v:>12}")
    for key, title in (
        ("ttft_ms", "TTFT"),
        ("tpot_ms", "TPOT"),
        ("itl_ms", "ITL"),
        ("e2el_ms", "E2E latency"),
    ):
        for stat, v in s[key].items():
            if v is not None:
                print(f"{title + ' ' + stat + ' (ms)':<40}{v:>12.2f}")
    for group in ("per_class", "per_tenant"):
        for name, g in s.get(group, {}).items():
            label = f"{group[4:]} {name or '(none)'}"
            p99 = g["ttft_ms"].get("p99")
            print(
                f"{label:<24} n={g['num_requests']:<5} rejected={g['rejected']:<4} "
                f"SLO met {g['slo_attainment']:6.1%}  goodput {g['goodput']:.2f} req/s"
                + (f"  TTFT p99 {p99:.0f} ms" if p99 is not None else "")
            )
    print("=" * 66)


async def run(args: argparse.Namespace) -> dict:
    import httpx

    chat = args.endpoint.endswith("chat/completions")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(
        base_url=args.base_url.rstrip("/"), headers=headers, timeout=args.timeout, limits=limits
    ) as client:
        model = args.model
        if model is None:
            r = await client.get("/v1/models")
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        specs = make_requests(args, chat)
        if any(s.arrival_s is not None for s in specs):  # the dataset's own schedule
            specs.sort(key=lambda s: s.arrival_s or 0.0)
            times = [s.arrival_s or 0.0 for s in specs]
            gaps = [b - a for a, b in zip(times, times[1:])] + [0.0]
            first_delay = times[0]
        else:
            gaps = _arrival_gaps(args, len(specs))
            first_delay = 0.0
        sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        bar = None
        if not args.disable_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(specs), file=sys.stderr, desc="requests")

        async def go(spec: RequestSpec) -> RequestResult:
            if sem is None:
                res = await _one(client, args, model, spec, chat)
            else:
                async with sem:
                    res = await _one(client, args, model, spec, chat)
            if bar is not None:
                bar.update(1)
            return res

        start = time.perf_counter()
        tasks = []
        if first_delay > 0:
            await asyncio.sleep(first_delay)
        for spec, gap in zip(specs, gaps, strict=True):
            tasks.append(asyncio.create_task(go(spec)))
            if gap > 0:
                await asyncio.sleep(gap)
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        if bar is not None:
            bar.close()
    return summarize(list(results), duration, args, model)


def main(args: argparse.Namespace) -> int:
    _parse_goodput(args.goodput)  # fail on a bad SLO before sending anything
    summary = asyncio.run(run(args))
    _print_table(summary)
    line = json.dumps(summary)
    if args.result_file:
        with open(args.result_file, "w") as f:
            f.write(line + "\n")
    print(line)
    return 0 if summary["completed"] > 0 else 1
