"""The performance model: the time of one engine step from its operators' rooflines,
kvasir's efficiency factors and fixed costs, tensor- and pipeline-parallel
communication, and from it prefill time, decode step time, TTFT, TPOT and tokens/s.

An operator takes ``max(FLOPs / (peak x eff_compute), bytes / (bandwidth x eff_memory))``
plus ``calls x`` its kind's fixed cost; a step is the sum over one rank's operators,
divided by the fraction of wall time the device is kept busy, plus the per-step host
cost the device does not hide. Under tensor parallelism every rank runs the same step
(the slowest rank is any rank); pipeline stages run one after the other for one step,
and overlap across the steps in flight.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from kvasir.plan.config import PlanConfig
from kvasir.plan.efficiency import Efficiency, efficiency_for
from kvasir.plan.hardware import Hardware
from kvasir.plan.model_spec import ModelSpec, load_model_spec
from kvasir.plan.roofline import Operator, StepShape, stage_layer_range, step_operators

# Per-hop latency of a collective step (NCCL's small-message all-reduce over NVLink
# takes ~10-20 us at 8 GPUs; PCIe hops are slower). An assumption, not a kvasir
# measurement: no multi-GPU run of kvasir is recorded in RESULTS.md yet.
LINK_LATENCY_S = {"nvlink": 2e-6, "pcie": 5e-6, "network": 10e-6}
# Tensor or pipeline groups larger than a host's 8 devices cross the network:
# 400 Gb/s (50 GB/s per direction) per GPU, an NDR InfiniBand / 400 GbE NIC each.
DEVICES_PER_HOST = 8
NETWORK_GBS = 50.0


@dataclass(frozen=True)
class OpTime:
    op: Operator
    seconds: float
    bound: str  # "compute", "memory", "overhead" or "comm"


@dataclass(frozen=True)
class StepTime:
    """``seconds``: wall time of the step through every stage, one after the other;
    ``stage_seconds``: each stage's own time (its operators, busy fraction and host
    cost included); ``ops``: stage 0's operator times (the busiest stage is stage 0
    for an even split: it has the extra layer and the embedding)."""

    seconds: float
    stage_seconds: tuple[float, ...]
    ops: tuple[OpTime, ...]

    @property
    def pipelined_period(self) -> float:
        """Time between steps once the pipeline is full (one step per stage in flight)."""
        return max(self.stage_seconds)


def _link(hw: Hardware, group: int) -> tuple[float, float]:
    """(bytes/s per direction, per-hop latency) for a group of ``group`` devices."""
    if group > DEVICES_PER_HOST:
        return NETWORK_GBS * 1e9, LINK_LATENCY_S["network"]
    if hw.link_name.lower().startswith(("nvlink", "infinity", "ici", "c2c")):
        return hw.link_gbs * 1e9, LINK_LATENCY_S["nvlink"]
    return hw.link_gbs * 1e9, LINK_LATENCY_S["pcie"]


def allreduce_time(message_bytes: float, n: int, bw: float, latency: float, algo: str) -> float:
    """Ring: 2 (n-1)/n of the message over each link in 2 (n-1) steps. Tree (double
    binary tree): the message twice through the tree (up and down), 2 log2(n) hops.
    ``auto``: the faster, as NCCL picks per message size."""
    if n <= 1:
        return 0.0
    ring = 2 * (n - 1) / n * message_bytes / bw + 2 * (n - 1) * latency
    tree = 2 * message_bytes / bw + 2 * math.ceil(math.log2(n)) * latency
    if algo == "ring":
        return ring
    if algo == "tree":
        return tree
    return min(ring, tree)


def _ridge(hw: Hardware, dtype: str) -> float:
    """FLOPs per byte where the datasheet roofline turns from memory to compute."""
    return hw.peak(dtype) / (hw.memory_bandwidth_gbs * 1e9)


def op_time(op: Operator, hw: Hardware, eff: Efficiency, cfg: PlanConfig) -> OpTime:
    ov = eff.overheads
    if op.kind == "comm":
        if op.extra.get("p2p"):
            bw, lat = _link(hw, cfg.world_size)
            return OpTime(op, op.message_bytes / bw + lat, "comm")
        bw, lat = _link(hw, cfg.tensor_parallel_size)
        t = op.count * allreduce_time(
            op.message_bytes, cfg.tensor_parallel_size, bw, lat, cfg.allreduce
        )
        return OpTime(op, t, "comm")
    bw = hw.memory_bandwidth_gbs * 1e9
    calls = op.calls
    if ov.layer_s:  # one call of each per layer is in the per-layer cost
        calls = max(op.calls - op.count, 0) if op.kind == "attention" else 0
        if op.name.endswith("_decode") and ov.layer_request_s:
            calls = 0  # the decode groups' calls are in the per-request cost
    if op.kind == "gemm":
        measured = hw.gemm_rate(
            op.dtype, op.extra.get("rows"), op.extra.get("k"), op.extra.get("n")
        )
        if measured is not None:  # a calibrated table: the time of the streaming GEMM
            t = op.flops / measured + calls * ov.gemm_s
            return OpTime(op, t, "memory" if op.intensity < _ridge(hw, op.dtype) else "compute")
        rate = hw.peak(op.dtype) * eff.gemm_compute
        mem, fixed = bw * eff.gemm_memory, ov.gemm_s
    elif op.kind == "attention":
        rate = hw.peak(op.dtype) * eff.attention_compute
        mem, fixed = bw * eff.attention_memory, ov.attention_s
    else:  # elementwise, ssm, sampler: bandwidth-bound kernels
        rate = hw.peak(op.dtype) * eff.attention_compute
        mem, fixed = bw * eff.elementwise_memory, ov.elementwise_s
        if hw.extra.get("elementwise_gbs"):  # calibrated: what the engine's layers reach
            mem = float(hw.extra["elementwise_gbs"]) * 1e9
    tc, tm = op.flops / rate, op.traffic / mem
    to = calls * fixed
    roof = max(tc, tm)
    bound = "overhead" if to > roof else ("compute" if tc >= tm else "memory")
    return OpTime(op, roof + to, bound)


def step_time(
    spec: ModelSpec,
    cfg: PlanConfig,
    hw: Hardware,
    shape: StepShape,
    eff: Efficiency | None = None,
) -> StepTime:
    eff = eff or efficiency_for(hw)
    stages = []
    first_ops: tuple[OpTime, ...] = ()
    for stage in range(cfg.pipeline_parallel_size):
        ops = step_operators(spec, cfg, hw.kind, shape, stage)
        times = tuple(op_time(o, hw, eff, cfg) for o in ops)
        if stage == 0:
            first_ops = times
        device = sum(t.seconds for t in times if t.bound != "comm")
        comm = sum(t.seconds for t in times if t.bound == "comm")
        ov = eff.overheads
        start, end = stage_layer_range(spec.num_layers, cfg.pipeline_parallel_size, stage)
        per_layer = ov.layer_s + ov.layer_request_s * shape.num_reqs
        host = ov.step_s + ov.request_s * shape.num_reqs + per_layer * (end - start)
        stages.append(device / eff.busy_fraction + comm + host)
    return StepTime(sum(stages), tuple(stages), first_ops)


def _mean_decode_step(
    spec: ModelSpec,
    cfg: PlanConfig,
    hw: Hardware,
    batch: int,
    ctx_lo: int,
    ctx_hi: int,
    eff: Efficiency,
) -> float:
    """Mean step time of decode steps at contexts ctx_lo..ctx_hi (linear in context,
    so a few sample points integrate it exactly enough)."""
    pts = sorted({ctx_lo, (ctx_lo + ctx_hi) // 2, ctx_hi})
    return sum(
        step_time(spec, cfg, hw, StepShape.decode(batch, c), eff).seconds for c in pts
    ) / len(pts)


def prefill_time(
    spec: ModelSpec,
    cfg: PlanConfig,
    hw: Hardware,
    prompt_len: int,
    batch: int = 1,
    eff: Efficiency | None = None,
) -> float:
    """Prompts of ``prompt_len`` tokens in chunks of ``max_num_batched_tokens``,
    ``batch`` of them together (the first token is sampled in the last chunk's step)."""
    eff = eff or efficiency_for(hw)
    budget = cfg.max_num_batched_tokens
    chunk = max(1, budget // batch) if cfg.enable_chunked_prefill else prompt_len
    t, done = 0.0, 0
    while done < prompt_len:
        n = min(chunk, prompt_len - done)
        partial = 0 if done + n >= prompt_len else batch
        shape = StepShape((), ((n, done),) * batch, num_partial_chunks=partial)
        t += step_time(spec, cfg, hw, shape, eff).seconds
        done += n
    return t


@dataclass(frozen=True)
class LatencyPrediction:
    ttft_s: float
    tpot_s: float  # mean decode step (per generated token of one request)
    decode_tok_s: float  # batch / tpot
    e2e_s: float
    prefill_tok_s: float
    spec_tokens_per_step: float

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 6) for k, v in self.__dict__.items()}


def expected_accepted(k: int, alpha: float) -> float:
    """Tokens one verify step yields with k drafts each accepted with probability
    alpha, stopping at the first rejection, plus the bonus/corrected token:
    (1 - alpha^(k+1)) / (1 - alpha)."""
    if k == 0:
        return 1.0
    return (1 - alpha ** (k + 1)) / (1 - alpha)


def _draft_step(cfg: PlanConfig, hw: Hardware, batch: int, ctx: int, eff: Efficiency) -> float:
    """One step of the draft model (none for n-gram proposals)."""
    if not cfg.draft_model or cfg.num_speculative_tokens == 0:
        return 0.0
    draft = load_model_spec(cfg.draft_model)
    dcfg = replace(cfg, tensor_parallel_size=1, pipeline_parallel_size=1, num_speculative_tokens=0)
    return step_time(draft, dcfg, hw, StepShape.decode(batch, ctx), eff).seconds


def decode_tpot(
    spec: ModelSpec,
    cfg: PlanConfig,
    hw: Hardware,
    batch: int,
    ctx_lo: int,
    ctx_hi: int,
    eff: Efficiency | None = None,
) -> tuple[float, float]:
    """(seconds per generated token of one request, tokens per verify step) over
    contexts ctx_lo..ctx_hi, with speculative decoding if configured."""
    eff = eff or efficiency_for(hw)
    k = cfg.num_speculative_tokens
    if k == 0:
        return _mean_decode_step(spec, cfg, hw, batch, ctx_lo, ctx_hi, eff), 1.0
    mid = (ctx_lo + ctx_hi) // 2
    verify = step_time(spec, cfg, hw, StepShape.decode(batch, mid, k), eff).seconds
    per_step = verify + k * _draft_step(cfg, hw, batch, mid, eff)
    acc = expected_accepted(k, cfg.acceptance_rate)
    return per_step / acc, acc


def predict_latency(
    spec: ModelSpec,
    cfg: PlanConfig,
    hw: Hardware,
    input_len: int,
    output_len: int,
    batch: int = 1,
    eff: Efficiency | None = None,
) -> LatencyPrediction:
    """What ``kvasir bench latency`` measures: TTFT of ``batch`` prompts of
    ``input_len`` tokens, and the mean decode step over the next ``output_len - 1``
    tokens (contexts input_len + 1 .. input_len + output_len - 1)."""
    eff = eff or efficiency_for(hw)
    # The first step of an idle engine: its host work has no earlier step to hide behind.
    ttft = prefill_time(spec, cfg, hw, input_len, batch, eff) + eff.exposed_host_s
    lo, hi = input_len + 1, input_len + max(output_len - 1, 1)
    tpot, acc = decode_tpot(spec, cfg, hw, batch, lo, hi, eff)
    return LatencyPrediction(
        ttft_s=ttft,
        tpot_s=tpot,
        decode_tok_s=batch / tpot,
        e2e_s=ttft + tpot * max(output_len - 1, 0),
        prefill_tok_s=batch * input_len / ttft,
        spec_tokens_per_step=acc,
    )


def _linear_solve(predict, scale: str, eff: Efficiency) -> tuple[float, float]:
    """(fixed, variable) with predict(eff with scale = x) = fixed + variable / x, read
    off two evaluations (exact while the scaled operators stay on the same side of
    their roofline ridge)."""
    at1: dict[str, Any] = {f: 1.0 for f in _SCALED[scale]}
    at2: dict[str, Any] = {f: 0.5 for f in _SCALED[scale]}
    p1, p2 = predict(replace(eff, **at1)), predict(replace(eff, **at2))
    v = p2 - p1
    return p1 - v, v


_SCALED = {"memory": ("gemm_memory", "elementwise_memory"), "compute": ("gemm_compute",)}


def decode_step_for_efficiency(
    hw: Hardware, eff: Efficiency, model: str, context_len: int
) -> tuple[float, float]:
    """For the efficiency solve: (fixed, variable) of the batch-1 decode step of
    ``model`` on ``hw`` in bf16, as a function of the memory efficiency."""
    spec, cfg = load_model_spec(model), PlanConfig()
    return _linear_solve(
        lambda e: step_time(spec, cfg, hw, StepShape.decode(1, context_len), e).seconds,
        "memory",
        eff,
    )


def prefill_for_efficiency(
    hw: Hardware, eff: Efficiency, model: str, prompt_len: int
) -> tuple[float, float]:
    """(fixed, variable) of one ``prompt_len`` prefill step as a function of the GEMM
    compute efficiency."""
    spec, cfg = load_model_spec(model), PlanConfig(max_num_batched_tokens=prompt_len + 1)
    return _linear_solve(
        lambda e: step_time(spec, cfg, hw, StepShape.prefill(prompt_len), e).seconds, "compute", eff
    )


def breakdown(st: StepTime) -> list[dict]:
    """Per-operator rows of stage 0 for tables and JSON."""
    return [
        {
            "op": t.op.name,
            "kind": t.op.kind,
            "gflops": t.op.flops / 1e9,
            "mbytes": t.op.bytes / 1e6,
            "intensity": t.op.intensity,
            "bound": t.bound,
            "ms": t.seconds * 1e3,
        }
        for t in st.ops
    ]


def sum_seconds(times: Sequence[OpTime]) -> float:
    return sum(t.seconds for t in times)
