"""A workload (arrivals, prompt and output lengths) run through a model of kvasir's
scheduler: continuous batching with chunked prefill, ``max_num_seqs`` and
``max_num_batched_tokens`` per step, KV blocks allocated per block of tokens and
preemption (recompute) when they run out. Each step's time is the performance model's.

The scheduler model follows ``kvasir/core/scheduler.py``: running requests first (a
decode token each, or their next prompt chunk), then waiting requests in arrival order
while the token budget, the sequence limit and free blocks last; a prompt's last chunk
samples its first token. Under pipeline parallelism the requests form one group per
stage, each advancing once per full pipeline round.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import deque
from dataclasses import dataclass, field, replace

from kvasir.plan.config import PlanConfig
from kvasir.plan.efficiency import Efficiency, efficiency_for
from kvasir.plan.hardware import Hardware
from kvasir.plan.model_spec import ModelSpec
from kvasir.plan.perf import _draft_step, expected_accepted, step_time
from kvasir.plan.roofline import StepShape


@dataclass(frozen=True)
class Request:
    arrival_s: float
    prompt_len: int
    output_len: int
    cached_len: int = 0  # prompt tokens already in the prefix cache


def parse_range(spec: str | int) -> tuple[int, int]:
    """ "N" or "MIN:MAX" (as ``kvasir bench throughput``)."""
    s = str(spec)
    if ":" in s:
        lo, hi = s.split(":")
        return int(lo), int(hi)
    return int(s), int(s)


def make_requests(
    num_requests: int,
    input_len: str | int,
    output_len: str | int,
    request_rate: float = math.inf,
    seed: int = 0,
    prefix_hit_rate: float = 0.0,
) -> list[Request]:
    """Lengths uniform over the ranges, arrivals Poisson at ``request_rate`` (inf: all
    at once), ``prefix_hit_rate`` of each prompt found in the prefix cache."""
    rng = random.Random(seed)
    (ilo, ihi), (olo, ohi) = parse_range(input_len), parse_range(output_len)
    t, out = 0.0, []
    for _ in range(num_requests):
        il, ol = rng.randint(ilo, ihi), rng.randint(olo, ohi)
        if math.isfinite(request_rate):
            t += rng.expovariate(request_rate)
        cached = min(int(il * prefix_hit_rate), il - 1)
        out.append(Request(t, il, ol, cached))
    return out


@dataclass(eq=False)  # identity: a request is itself, whatever its counts
class _Live:
    req: Request
    index: int
    computed: int = 0  # tokens in the KV cache
    generated: int = 0
    generated_before: int = 0  # tokens generated before a preemption (recomputed now)
    first_token_s: float | None = None
    token_times: list[float] = field(default_factory=list)

    @property
    def prompt_to_compute(self) -> int:
        """The prompt, plus what it generated before a preemption (recompute)."""
        return self.req.prompt_len + self.generated_before


@dataclass(frozen=True)
class WorkloadResult:
    elapsed_s: float
    num_requests: int
    input_tokens: int
    output_tokens: int
    num_steps: int
    num_preemptions: int
    ttft_s: tuple[float, ...]
    tpot_s: tuple[float, ...]
    e2e_s: tuple[float, ...]
    mean_batch: float

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def total_tok_s(self) -> float:
        return (self.input_tokens + self.output_tokens) / self.elapsed_s if self.elapsed_s else 0.0

    def summary(self) -> dict[str, float]:
        def pct(xs: tuple[float, ...], p: float) -> float:
            if not xs:
                return 0.0
            s = sorted(xs)
            return s[min(len(s) - 1, int(p / 100 * len(s)))]

        return {
            "elapsed_s": self.elapsed_s,
            "output_tok_s": self.output_tok_s,
            "total_tok_s": self.total_tok_s,
            "request_s": self.num_requests / self.elapsed_s if self.elapsed_s else 0.0,
            "ttft_mean_s": statistics.fmean(self.ttft_s) if self.ttft_s else 0.0,
            "ttft_p50_s": pct(self.ttft_s, 50),
            "ttft_p99_s": pct(self.ttft_s, 99),
            "tpot_mean_s": statistics.fmean(self.tpot_s) if self.tpot_s else 0.0,
            "tpot_p50_s": pct(self.tpot_s, 50),
            "tpot_p99_s": pct(self.tpot_s, 99),
            "e2e_mean_s": statistics.fmean(self.e2e_s) if self.e2e_s else 0.0,
            "mean_batch": self.mean_batch,
            "num_steps": float(self.num_steps),
            "num_preemptions": float(self.num_preemptions),
        }


def simulate(
    spec: ModelSpec,
    cfg: PlanConfig,
    hw: Hardware,
    requests: list[Request],
    num_blocks: int,
    eff: Efficiency | None = None,
) -> WorkloadResult:
    """Run ``requests`` through the scheduler model with ``num_blocks`` KV block ids
    (block 0 reserved, as the engine's null block)."""
    eff = eff or efficiency_for(hw)
    pp = cfg.pipeline_parallel_size
    groups = [requests[i::pp] for i in range(pp)]
    # Each in-flight group holds its share of the blocks and of the sequence limit.
    gcfg = replace(cfg, max_num_seqs=max(1, cfg.max_num_seqs // pp))
    gblocks = max(2, (num_blocks - 1) // pp + 1)
    results = [_simulate_group(spec, gcfg, hw, g, gblocks, eff, pp) for g in groups if g]
    ttft = tuple(x for r in results for x in r.ttft_s)
    tpot = tuple(x for r in results for x in r.tpot_s)
    e2e = tuple(x for r in results for x in r.e2e_s)
    steps = sum(r.num_steps for r in results)
    return WorkloadResult(
        elapsed_s=max(r.elapsed_s for r in results),
        num_requests=len(requests),
        input_tokens=sum(r.input_tokens for r in results),
        output_tokens=sum(r.output_tokens for r in results),
        num_steps=steps,
        num_preemptions=sum(r.num_preemptions for r in results),
        ttft_s=ttft,
        tpot_s=tpot,
        e2e_s=e2e,
        mean_batch=sum(r.mean_batch * r.num_steps for r in results) / max(steps, 1),
    )


def _simulate_group(
    spec: ModelSpec,
    cfg: PlanConfig,
    hw: Hardware,
    requests: list[Request],
    num_blocks: int,
    eff: Efficiency,
    pp: int,
) -> WorkloadResult:
    bs = cfg.block_size
    k = cfg.num_speculative_tokens
    acc = expected_accepted(k, cfg.acceptance_rate)
    usable = num_blocks - 1
    pending = deque(sorted(enumerate(requests), key=lambda x: x[1].arrival_s))
    waiting: deque[_Live] = deque()
    running: list[_Live] = []
    held: dict[int, int] = {}  # request index -> blocks held
    free = usable
    now = 0.0
    done: list[_Live] = []
    steps = preemptions = 0
    batch_sum = 0
    spec_carry: dict[int, float] = {}

    def blocks_for(tokens: int) -> int:
        return -(-tokens // bs)

    while pending or waiting or running:
        while pending and pending[0][1].arrival_s <= now:
            i, r = pending.popleft()
            waiting.append(_Live(r, i, computed=r.cached_len))
        if not waiting and not running:
            now = pending[0][1].arrival_s
            continue
        budget = cfg.max_num_batched_tokens
        scheduled: list[tuple[_Live, int]] = []
        for live in list(running):
            if budget <= 0:
                break
            if live not in running:
                continue  # preempted for an earlier request of this step
            is_decode = live.generated > 0
            need = 1 + k if is_decode else live.prompt_to_compute - live.computed
            n = min(need, budget)
            want = blocks_for(live.computed + n) - held[live.index]
            while want > free and live in running:
                victim = running[-1]  # the most recently admitted, as the engine's FCFS
                running.remove(victim)
                free += held.pop(victim.index)
                preemptions += 1
                victim.generated_before += victim.generated
                victim.generated = 0
                victim.computed = 0  # recompute: its KV is dropped
                waiting.appendleft(victim)
                scheduled = [(x, m) for x, m in scheduled if x is not victim]
            if live not in running:
                continue
            free -= want
            held[live.index] += want
            budget -= n
            scheduled.append((live, n))
        while waiting and budget > 0 and len(running) < cfg.max_num_seqs:
            live = waiting[0]
            n = min(live.prompt_to_compute - live.computed, budget)
            if not cfg.enable_chunked_prefill and n < live.prompt_to_compute - live.computed:
                break
            want = blocks_for(live.computed + n)
            if want > free:
                break
            waiting.popleft()
            free -= want
            held[live.index] = want
            running.append(live)
            budget -= n
            scheduled.append((live, n))
        decode_ctx = [x.computed + 1 for x, _ in scheduled if x.generated > 0]
        chunks = [(n, x.computed) for x, n in scheduled if x.generated == 0]
        if not scheduled:
            if pending:
                now = max(now, pending[0][1].arrival_s)
                continue
            raise ValueError(
                "the KV cache cannot hold a single request of this workload: "
                f"{usable} blocks of {bs} tokens"
            )
        partial = sum(
            1 for x, n in scheduled if x.generated == 0 and x.computed + n < x.prompt_to_compute
        )
        shape = StepShape(tuple(decode_ctx), tuple(chunks), k if decode_ctx else 0, partial)
        st = step_time(spec, cfg, hw, shape, eff)
        dt = st.seconds if pp == 1 else st.pipelined_period * pp
        if k and decode_ctx:
            dt += k * _draft_step(cfg, hw, len(decode_ctx), max(decode_ctx), eff)
        now += dt
        steps += 1
        batch_sum += len(scheduled)
        for live, n in scheduled:
            if live.generated > 0:
                # Speculative decoding yields acc tokens per step on average: carry the
                # fraction so the long-run rate is exact.
                got = spec_carry.get(live.index, 0.0) + acc
                new = min(int(got), live.req.output_len - live.generated)
                spec_carry[live.index] = got - int(got)
                live.computed += new
                live.generated += new
                live.token_times.extend([now] * new)
            else:
                live.computed += n
                if live.computed >= live.prompt_to_compute:  # the last chunk samples
                    if live.first_token_s is None:
                        live.first_token_s = now
                    live.generated = live.generated_before + 1
                    live.generated_before = 0
                    live.token_times.append(now)
            if live.generated >= live.req.output_len:
                running.remove(live)
                free += held.pop(live.index)
                done.append(live)
    ttft = tuple((d.first_token_s or now) - d.req.arrival_s for d in done)
    tpot = tuple(
        (d.token_times[-1] - d.token_times[0]) / (len(d.token_times) - 1)
        for d in done
        if len(d.token_times) > 1
    )
    e2e = tuple(d.token_times[-1] - d.req.arrival_s for d in done if d.token_times)
    return WorkloadResult(
        elapsed_s=now - (requests[0].arrival_s if requests else 0.0),
        num_requests=len(requests),
        input_tokens=sum(r.prompt_len for r in requests),
        output_tokens=sum(d.generated for d in done),
        num_steps=steps,
        num_preemptions=preemptions,
        ttft_s=ttft,
        tpot_s=tpot,
        e2e_s=e2e,
        mean_batch=batch_sum / max(steps, 1),
    )
