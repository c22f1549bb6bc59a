"""Router benchmarks (real ``kvasir serve`` replicas of the default model, loopback).

1. Overhead: ``kvasir bench serve`` straight to one replica vs through ``kvasir router``
   to the same single replica, alternating rounds; TTFT p50 of each.
2. Cache-aware vs round-robin over N replicas on a multi-turn chat workload with shared
   system prompts: the replicas' prefix-cache hit rate (kvasir:prefix_cache_hits /
   queries, summed over replicas) and the throughput, same requests for both.
3. Optionally (``--chaos``) the issue's chaos load: ``--num-prompts`` requests at
   ``--max-concurrency`` through the router while one replica is killed (-9) and another
   cordoned; reports failures and migrations.

    python benchmarks/bench_router.py --replicas 3 --rounds 3 --chaos

Prints one JSON line last. Start-up needs ``tests/server/server_utils.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "server"))
sys.path.insert(0, str(ROOT / "tests" / "router"))
from router_utils import metric, start_router  # noqa: E402
from server_utils import start_server  # noqa: E402


def bench(url: str, *extra: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "kvasir.entrypoints.cli", "bench", "serve", "--base-url", url,
         "--disable-tqdm", *extra],
        capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def prefix_stats(urls: list[str]) -> tuple[float, float]:
    q = h = 0.0
    for u in urls:
        m = httpx.get(u + "/metrics").text
        q += metric(m, "kvasir:prefix_cache_queries_total") or metric(
            m, "kvasir:prefix_cache_queries"
        )
        h += metric(m, "kvasir:prefix_cache_hits_total") or metric(m, "kvasir:prefix_cache_hits")
    return q, h


def chat_dataset(path: Path, num_systems: int, num_users: int, turns: int, seed: int) -> None:
    rng = random.Random(seed)
    words = "the a of model cache token replica router prefix system answer question".split()
    systems = [
        f"You are assistant number {i}. " + " ".join(rng.choice(words) for _ in range(300))
        for i in range(num_systems)
    ]
    lines = []
    for u in range(num_users):
        sys_prompt = systems[u % num_systems]
        history = [{"role": "system", "content": sys_prompt}]
        for t in range(turns):
            history.append({"role": "user", "content": f"user {u} turn {t}: "
                            + " ".join(rng.choice(words) for _ in range(20))})  # fmt: skip
            lines.append({"messages": list(history), "max_tokens": 8})
            history.append({"role": "assistant", "content": "ok " * 8})
    rng.shuffle(lines)
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--overhead-prompts", type=int, default=40)
    ap.add_argument("--chaos", action="store_true")
    ap.add_argument("--num-prompts", type=int, default=200)
    ap.add_argument("--max-concurrency", type=int, default=16)
    a = ap.parse_args()
    with ThreadPoolExecutor(a.replicas) as ex:
        srvs = list(ex.map(lambda _: start_server(api_key=None), range(a.replicas)))
    result: dict = {"device": "cpu", "replicas": a.replicas}
    routers = []
    try:
        # 1. overhead: one replica, direct vs routed
        one = start_router("--replica", f"a={srvs[0].url}", "--policy", "round_robin",
                           "--canary-interval", "0")  # fmt: skip
        routers.append(one)
        common = ["--num-prompts", str(a.overhead_prompts), "--max-concurrency", "1",
                  "--input-len", "32", "--output-len", "4"]  # fmt: skip
        bench(srvs[0].url, *common)  # warm-up
        direct, routed = [], []
        for _ in range(a.rounds):
            direct.append(bench(srvs[0].url, *common)["ttft_ms"]["p50"])
            routed.append(bench(one.url, *common)["ttft_ms"]["p50"])
        result["ttft_p50_ms_direct"] = sorted(direct)[len(direct) // 2]
        result["ttft_p50_ms_router"] = sorted(routed)[len(routed) // 2]
        result["router_overhead_ms"] = result["ttft_p50_ms_router"] - result["ttft_p50_ms_direct"]
        result["ttft_rounds"] = {"direct": direct, "router": routed}
        # 2. cache-aware vs round-robin on shared system prompts
        with tempfile.TemporaryDirectory() as d:
            data = Path(d) / "chat.jsonl"
            chat_dataset(data, num_systems=a.replicas, num_users=4 * a.replicas, turns=3, seed=0)
            for policy in ("round_robin", "cache_aware"):
                r = start_router(*sum((["--replica", f"r{i}={s.url}"] for i, s in enumerate(srvs)), []),
                                 "--policy", policy, "--canary-interval", "0")  # fmt: skip
                routers.append(r)
                q0, h0 = prefix_stats([s.url for s in srvs])
                summ = bench(r.url, "--endpoint", "/v1/chat/completions", "--dataset-path",
                             str(data), "--max-concurrency", "4")  # fmt: skip
                q1, h1 = prefix_stats([s.url for s in srvs])
                result[policy] = {
                    "prefix_hit_rate": (h1 - h0) / max(q1 - q0, 1.0),
                    "output_throughput": summ["output_throughput"],
                    "total_token_throughput": summ["total_token_throughput"],
                    "failed": summ["failed"],
                }
                r.stop()
                # The second policy gets fresh system prompts (warm caches would favour it).
                chat_dataset(data, num_systems=a.replicas, num_users=4 * a.replicas, turns=3,
                             seed=1)  # fmt: skip
        rr, ca = result["round_robin"], result["cache_aware"]
        result["hit_rate_ratio"] = ca["prefix_hit_rate"] / max(rr["prefix_hit_rate"], 1e-9)
        result["throughput_ratio"] = ca["total_token_throughput"] / rr["total_token_throughput"]
        # 3. chaos
        if a.chaos and a.replicas >= 3:
            r = start_router(*sum((["--replica", f"r{i}={s.url}"] for i, s in enumerate(srvs)), []),
                             "--policy", "power_of_two", "--canary-interval", "0",
                             admin_key="k")  # fmt: skip
            routers.append(r)
            p = subprocess.Popen(
                [sys.executable, "-m", "kvasir.entrypoints.cli", "bench", "serve", "--base-url",
                 r.url, "--num-prompts", str(a.num_prompts), "--max-concurrency",
                 str(a.max_concurrency), "--input-len", "32", "--output-len", "32",
                 "--ignore-eos", "--disable-tqdm"],
                stdout=subprocess.PIPE, text=True, cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )  # fmt: skip
            time.sleep(20)
            os.kill(srvs[0].proc.pid, signal.SIGKILL)
            os.kill(srvs[0].core_pid, signal.SIGKILL)
            httpx.post(r.url + "/admin/replicas/r1/cordon", headers={"x-admin-key": "k"})
            out, _ = p.communicate()
            summ = json.loads(out.strip().splitlines()[-1])
            m = httpx.get(r.url + "/metrics").text
            result["chaos"] = {
                "num_prompts": summ["num_prompts"],
                "completed": summ["completed"],
                "failed": summ["failed"],
                "migrations": metric(m, "kvasir_router:migrations_total"),
                "retries": metric(m, "kvasir_router:retries_total"),
            }
    finally:
        for r in routers:
            r.stop()
        for s in srvs:
            s.stop()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
