"""``kvasir top``: a terminal view of a running server's live metrics (rich).

Scrapes ``/metrics`` every ``--interval`` seconds and shows requests (running,
waiting, per second, errors), KV-cache usage and prefix hit rate, TTFT / TPOT / ITL /
e2e percentiles and tokens per second over the last interval (from the histograms'
bucket deltas), engine step times and batch sizes, and GPU stats when the server
exports ``kvasir:gpu_*``. ``--once`` prints one frame (two scrapes ``--interval``
apart) and exits: for scripts and for users without a TTY.
"""

from __future__ import annotations

import argparse
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table

# name -> list of (labels, value); histogram buckets as "<name>_bucket" samples.
Samples = dict[str, list[tuple[dict[str, str], float]]]


@dataclass
class Scrape:
    time: float
    samples: Samples = field(default_factory=dict)

    def total(self, name: str, **match: str) -> float:
        return sum(
            v
            for labels, v in self.samples.get(name, [])
            if all(labels.get(k) == x for k, x in match.items())
        )

    def has(self, name: str) -> bool:
        return name in self.samples

    def buckets(self, name: str) -> list[tuple[float, float]]:
        """Cumulative (le, count) over every label set, sorted by le."""
        acc: dict[float, float] = defaultdict(float)
        for labels, v in self.samples.get(name + "_bucket", []):
            acc[float(labels["le"])] += v
        return sorted(acc.items())


def parse(text: str, now: float) -> Scrape:
    out: Samples = defaultdict(list)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name].append((dict(s.labels), float(s.value)))
    return Scrape(now, dict(out))


def scrape(url: str, timeout: float = 10.0) -> Scrape:
    r = httpx.get(url.rstrip("/") + "/metrics", timeout=timeout)
    r.raise_for_status()
    return parse(r.text, time.monotonic())


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus's ``histogram_quantile`` over cumulative (le, count) buckets."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return prev_le
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le


def _delta_buckets(new: Scrape, old: Scrape | None, name: str) -> list[tuple[float, float]]:
    nb = new.buckets(name)
    if old is None:
        return nb
    ob = dict(old.buckets(name))
    delta = [(le, c - ob.get(le, 0.0)) for le, c in nb]
    # Nothing new in the interval: show the cumulative distribution instead.
    return delta if delta and delta[-1][1] > 0 else nb


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.1f}"


def _rate(new: Scrape, old: Scrape | None, name: str, **match: str) -> float | None:
    if old is None or new.time <= old.time:
        return None
    return max(new.total(name, **match) - old.total(name, **match), 0.0) / (new.time - old.time)


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def render(new: Scrape, old: Scrape | None, url: str) -> Group:
    """One frame: what the server's metrics say now (and over the last interval)."""
    model = next(
        (
            labels.get("model_name", "?")
            for labels, _ in new.samples.get("kvasir:num_requests_running", [])
        ),
        "?",
    )
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_column(style="bold")
    summary.add_column()
    queries = new.total("kvasir:prefix_cache_queries_total")
    hits = new.total("kvasir:prefix_cache_hits_total")
    errors = sum(
        v
        for labels, v in new.samples.get("kvasir:http_requests_total", [])
        if labels.get("status", "").startswith("5")
    )
    summary.add_row(
        "running",
        f"{new.total('kvasir:num_requests_running'):.0f}",
        "waiting",
        f"{new.total('kvasir:num_requests_waiting'):.0f}",
    )
    summary.add_row(
        "KV cache",
        f"{new.total('kvasir:kv_cache_usage_perc') * 100:.1f} %",
        "prefix hit rate",
        "-" if queries == 0 else f"{hits / queries * 100:.1f} %",
    )
    summary.add_row(
        "requests/s",
        _fmt(_rate(new, old, "kvasir:request_success_total"), ".2f"),
        "finished",
        f"{new.total('kvasir:request_success_total'):.0f}",
    )
    summary.add_row(
        "prompt tok/s",
        _fmt(_rate(new, old, "kvasir:prompt_tokens_total")),
        "generation tok/s",
        _fmt(_rate(new, old, "kvasir:generation_tokens_total")),
    )
    summary.add_row(
        "preemptions",
        f"{new.total('kvasir:num_preemptions_total'):.0f}",
        "5xx responses",
        f"{errors:.0f}",
    )

    lat = Table(title="latency (ms)", expand=False)
    lat.add_column("metric")
    for q in ("p50", "p90", "p99"):
        lat.add_column(q, justify="right")
    for label, name in (
        ("TTFT", "kvasir:time_to_first_token_seconds"),
        ("TPOT", "kvasir:request_time_per_output_token_seconds"),
        ("ITL", "kvasir:inter_token_latency_seconds"),
        ("e2e", "kvasir:e2e_request_latency_seconds"),
        ("queue", "kvasir:request_queue_time_seconds"),
        ("step", "kvasir:engine_step_duration_seconds"),
        ("schedule", "kvasir:engine_schedule_duration_seconds"),
    ):
        b = _delta_buckets(new, old, name)
        lat.add_row(label, *(_ms(quantile(q, b)) for q in (0.5, 0.9, 0.99)))

    parts: list = [Panel(summary, title=f"kvasir top - {model} @ {url}"), lat]
    if new.has("kvasir:gpu_info"):
        gpu = Table(title="GPUs")
        for col in ("gpu", "name", "SM %", "mem BW %", "mem used/total GiB", "temp C", "power W"):
            gpu.add_column(col)
        for labels, _ in new.samples["kvasir:gpu_info"]:
            g = {"gpu": labels["gpu"]}

            def one(name: str, _g: dict[str, str] = g, **extra: str) -> float | None:
                vals = [
                    v
                    for lab, v in new.samples.get(name, [])
                    if lab.get("gpu") == _g["gpu"]
                    and all(lab.get(k) == x for k, x in extra.items())
                ]
                return vals[0] if vals else None

            sm, bw = one("kvasir:gpu_utilization_ratio"), one("kvasir:gpu_memory_utilization_ratio")
            used, total = one("kvasir:gpu_memory_used_bytes"), one("kvasir:gpu_memory_total_bytes")
            p, lim = one("kvasir:gpu_power_watts"), one("kvasir:gpu_power_limit_watts")
            gpu.add_row(
                labels["gpu"],
                labels.get("name", ""),
                _fmt(None if sm is None else sm * 100, ".0f"),
                _fmt(None if bw is None else bw * 100, ".0f"),
                f"{_fmt(None if used is None else used / 2**30)}/"
                f"{_fmt(None if total is None else total / 2**30)}",
                _fmt(one("kvasir:gpu_temperature_celsius", sensor="gpu"), ".0f"),
                f"{_fmt(p, '.0f')}/{_fmt(lim, '.0f')}",
            )
        parts.append(gpu)
    return Group(*parts)


def add_top_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("top", help="live terminal view of a running server's metrics")
    t.add_argument("--url", default="http://localhost:8000", help="the server's base URL")
    t.add_argument("--interval", type=float, default=1.0, help="seconds between scrapes")
    t.add_argument("--once", action="store_true", help="print one frame and exit")
    t.set_defaults(func=run_top)


def run_top(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        raise ValueError(f"--interval must be > 0, got {args.interval}")
    console = Console()
    try:
        old = scrape(args.url)
    except httpx.HTTPError as e:
        raise ValueError(f"cannot read {args.url}/metrics: {e}") from None
    if args.once:
        time.sleep(args.interval)
        console.print(render(scrape(args.url), old, args.url))
        return 0
    from rich.live import Live

    with Live(render(old, None, args.url), console=console, screen=False) as live:
        while True:
            time.sleep(args.interval)
            try:
                new = scrape(args.url)
            except httpx.HTTPError as e:
                live.update(Panel(f"cannot read {args.url}/metrics: {e}", title="kvasir top"))
                continue
            live.update(render(new, old, args.url))
            old = new
