"""Scheduling policies on a mixed workload (issue 26): fcfs, lpm, fair, sjf and slo in
one call, each against a fresh ``kvasir serve`` of the default model.

The workload (one JSONL dataset, the same for every policy, sent by
``kvasir bench serve`` at the rows' own ``arrival_s``):

* interactive chat: prompts behind one of a few shared system prompts, short answers,
  SLOs TTFT < ``--ttft-slo-ms`` and TPOT < ``--tpot-slo-ms``, at a steady rate
  (``--interactive-rate``) for ``--duration`` seconds;
* a batch job: ``--num-batch`` long prompts with ``--batch-output-len``-token outputs,
  ``service_tier: batch``, sent at the start;
* two tenants at 10:1 request volume: "big" sends the batch job and 10 of every 11
  chat requests, "small" the rest.

Reported per policy: goodput and SLO attainment per class, total token throughput,
the small tenant's TTFT p99 (and, from one more fcfs run with only its requests, what
it gets alone), the prefix-cache hit rate (``kvasir:prefix_cache_hits / queries``),
Jain's index over tenants. Writes a markdown table and a PNG, prints one JSON line last.

    python benchmarks/bench_sched_policies.py --duration 30 \\
        --png docs/sched-policies.png --table /tmp/sched.md

Start-up needs ``tests/server/server_utils.py``. Default total: about 6 servers x
(start-up + ``--duration`` + drain), a few minutes on an idle 8-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "server"))
from server_utils import API_KEY, start_server  # noqa: E402

from kvasir.bench import serve  # noqa: E402

SYSTEM_PROMPTS = [
    "You are a concise travel assistant. Answer in one sentence and name one city. ",
    "You are a careful cooking assistant. Give one tip and one ingredient only. ",
    "You are a friendly maths tutor. State the answer first, then one short reason. ",
]
QUESTIONS = [
    "What should I see first?", "How long should it rest?", "What is seven times eight?",
    "Which season is best?", "Can I use butter instead?", "Why is that the answer?",
    "Where do I start?", "What goes well with it?", "Is there a quicker way?",
]  # fmt: skip


def make_dataset(args: argparse.Namespace, only_tenant: str | None = None) -> list[dict]:
    rng = random.Random(args.seed)
    rows: list[dict] = []
    filler = " ".join(rng.choice(serve._WORDS) for _ in range(args.batch_input_len))
    for k in range(args.num_batch):
        rows.append({
            "prompt": f"Document {k}: {filler}\nSummarise the document above.",
            "max_tokens": args.batch_output_len, "ignore_eos": True,
            "tenant": "big", "service_tier": "batch", "arrival_s": 0.0,
        })  # fmt: skip
    n = int(args.duration * args.interactive_rate)
    for i in range(n):
        system = SYSTEM_PROMPTS[rng.randrange(len(SYSTEM_PROMPTS))]
        rows.append({
            "prompt": system * 4 + rng.choice(QUESTIONS), "max_tokens": args.chat_output_len,
            "ignore_eos": True,
            "tenant": "small" if i % 11 == 10 else "big", "service_tier": "interactive",
            "ttft_slo_ms": args.ttft_slo_ms, "tpot_slo_ms": args.tpot_slo_ms,
            "arrival_s": 0.5 + i / args.interactive_rate,
        })  # fmt: skip
    if only_tenant is not None:
        rows = [r for r in rows if r["tenant"] == only_tenant]
    return rows


def _metric(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if re.match(re.escape(name) + r"[{ ]", line)
    )


def run_policy(args: argparse.Namespace, policy: str, rows: list[dict]) -> dict:
    extra = [
        "--scheduling-policy", policy, "--kv-cache-gb", str(args.kv_cache_gb),
        "--max-num-batched-tokens", str(args.max_num_batched_tokens),
        "--max-num-seqs", str(args.max_num_seqs), *args.serve_args.split(),
    ]  # fmt: skip
    srv = start_server(*extra)
    try:
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
            path = f.name
        parser = serve.add_cli_args(argparse.ArgumentParser())
        bench_args = parser.parse_args([
            "--base-url", srv.url, "--api-key", API_KEY, "--dataset-path", path,
            "--num-prompts", str(len(rows)), "--disable-tqdm", "--timeout", "1200",
        ])  # fmt: skip
        before = httpx.get(srv.url + "/metrics", timeout=30).text
        t0 = time.perf_counter()
        summary = asyncio.run(serve.run(bench_args))
        wall = time.perf_counter() - t0
        after = httpx.get(srv.url + "/metrics", timeout=30).text
        m = re.search(r"device (\S+?),", srv.log())
    finally:
        srv.stop()
    q = _metric(after, "kvasir:prefix_cache_queries_total") - _metric(
        before, "kvasir:prefix_cache_queries_total"
    )
    h = _metric(after, "kvasir:prefix_cache_hits_total") - _metric(
        before, "kvasir:prefix_cache_hits_total"
    )
    per_class, per_tenant = summary.get("per_class", {}), summary.get("per_tenant", {})
    inter = per_class.get("interactive", {})
    small = per_tenant.get("small", {})
    return {
        "policy": policy,
        "device": m.group(1) if m else "unknown",
        "wall_s": wall,
        "completed": summary["completed"],
        "failed": summary["failed"],
        "total_token_throughput": summary["total_token_throughput"],
        "output_throughput": summary["output_throughput"],
        "interactive_goodput": inter.get("goodput"),
        "interactive_slo_attainment": inter.get("slo_attainment"),
        "interactive_ttft_p99_ms": (inter.get("ttft_ms") or {}).get("p99"),
        "interactive_tpot_p99_ms": (inter.get("tpot_ms") or {}).get("p99"),
        "batch_rejected": per_class.get("batch", {}).get("rejected"),
        "small_tenant_ttft_p99_ms": (small.get("ttft_ms") or {}).get("p99"),
        "prefix_hit_rate": h / q if q else None,
        "jain_fairness": _metric(after, "kvasir:tenant_fairness_jain"),
    }


def _fmt(v: object, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(results: list[dict], alone_p99: float | None) -> str:
    lines = [
        "| policy | interactive goodput (req/s) | interactive SLO met | interactive TTFT p99 "
        "(ms) | TPOT p99 (ms) | total tok/s | small tenant TTFT p99 (ms) | prefix hit rate "
        "| Jain | failed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['policy']} | {_fmt(r['interactive_goodput'], '.3f')} | "
            f"{_fmt(r['interactive_slo_attainment'], '.1%')} | "
            f"{_fmt(r['interactive_ttft_p99_ms'], '.0f')} | "
            f"{_fmt(r['interactive_tpot_p99_ms'], '.0f')} | "
            f"{_fmt(r['total_token_throughput'], '.1f')} | "
            f"{_fmt(r['small_tenant_ttft_p99_ms'], '.0f')} | "
            f"{_fmt(r['prefix_hit_rate'], '.1%')} | {_fmt(r['jain_fairness'], '.2f')} | "
            f"{r['failed']} |"
        )
    lines.append(f"\nSmall tenant alone (fcfs): TTFT p99 {_fmt(alone_p99, '.0f')} ms")
    return "\n".join(lines)


def plot(results: list[dict], alone_p99: float | None, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["policy"] for r in results]
    panels = [
        ("interactive_goodput", "interactive goodput (req/s)", None),
        ("total_token_throughput", "total throughput (tok/s)", None),
        ("small_tenant_ttft_p99_ms", "small tenant TTFT p99 (ms)", alone_p99),
        ("prefix_hit_rate", "prefix-cache hit rate", None),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for ax, (key, title, ref) in zip(axes, panels):
        ax.bar(names, [r[key] or 0.0 for r in results], color="#4878a8")
        if ref is not None:
            ax.axhline(ref, color="#c04040", ls="--", label="alone (fcfs)")
            ax.axhline(2 * ref, color="#c04040", ls=":", label="2x alone")
            ax.legend(fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=9)
    fig.suptitle("kvasir scheduling policies, mixed chat + batch workload", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policies", default="fcfs,lpm,fair,sjf,slo")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of chat arrivals")
    p.add_argument("--interactive-rate", type=float, default=1.0, help="chat requests/s")
    p.add_argument("--chat-output-len", type=int, default=32)
    p.add_argument("--num-batch", type=int, default=4)
    p.add_argument("--batch-input-len", type=int, default=384)
    p.add_argument("--batch-output-len", type=int, default=256)
    p.add_argument("--ttft-slo-ms", type=float, default=1500.0)
    p.add_argument("--tpot-slo-ms", type=float, default=80.0)
    p.add_argument("--kv-cache-gb", type=float, default=0.4)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--serve-args", default="", help="more kvasir serve flags")
    p.add_argument("--no-alone", action="store_true", help="skip the small-tenant-alone run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--png", default=None, help="write the plot here")
    p.add_argument("--table", default=None, help="write the markdown table here")
    args = p.parse_args()
    rows = make_dataset(args)
    results = []
    for policy in args.policies.split(","):
        r = run_policy(args, policy, rows)
        print(json.dumps(r), file=sys.stderr, flush=True)
        results.append(r)
    alone = None
    if not args.no_alone:
        alone = run_policy(args, "fcfs", make_dataset(args, only_tenant="small"))
        print(json.dumps({"small_alone": alone}), file=sys.stderr, flush=True)
    alone_p99 = alone["small_tenant_ttft_p99_ms"] if alone else None
    md = table(results, alone_p99)
    print(md)
    if args.table:
        Path(args.table).write_text(md + "\n")
    if args.png:
        plot(results, alone_p99, args.png)
    by = {r["policy"]: r for r in results}
    device = results[0]["device"] if results else "unknown"
    summary: dict = {"device": device, "results": results, "small_alone_ttft_p99_ms": alone_p99}
    if "fcfs" in by and "slo" in by and by["fcfs"]["interactive_goodput"]:
        summary["slo_over_fcfs_interactive_goodput"] = (
            by["slo"]["interactive_goodput"] or 0.0
        ) / by["fcfs"]["interactive_goodput"]
        summary["slo_over_fcfs_throughput"] = (
            by["slo"]["total_token_throughput"] / by["fcfs"]["total_token_throughput"]
        )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
