"""The seed's design studies, each a table computed by the performance and memory
models: KV memory against sequence length and batch, the best block size, the
chunk size of chunked prefill (TTFT against the TPOT of the decodes it interrupts),
the batch that maximises throughput under a TPOT SLO, and a transformer against an SSM
of comparable size."""

from __future__ import annotations

from dataclasses import replace

from kvasir.plan.config import PlanConfig
from kvasir.plan.hardware import Hardware
from kvasir.plan.memory import GIB, block_size_study, capacity, kv_bytes_per_seq
from kvasir.plan.model_spec import ModelSpec
from kvasir.plan.perf import decode_tpot, prefill_time, step_time
from kvasir.plan.roofline import StepShape


def kv_memory_table(
    spec: ModelSpec, cfg: PlanConfig, hw_kind: str, seq_lens: list[int], batches: list[int]
) -> list[dict[str, float]]:
    """GiB of KV cache (whole blocks, windows and SSM states as they are kept) for
    ``batch`` sequences of ``seq_len`` tokens, all ranks together."""
    return [
        {"seq_len": s, "batch": b, "kv_gib": b * kv_bytes_per_seq(spec, cfg, hw_kind, s) / GIB}
        for s in seq_lens
        for b in batches
    ]


def best_batch_under_slo(
    spec: ModelSpec,
    cfg: PlanConfig,
    hw: Hardware,
    context_len: int,
    tpot_slo_s: float,
    max_batch: int | None = None,
) -> dict[str, float]:
    """The decode batch with the highest tokens/s whose TPOT (steady-state decode at
    ``context_len``) meets ``tpot_slo_s``, capped by what the KV cache holds and by
    max_num_seqs. Throughput rises with batch while TPOT rises too, so the best batch
    is the largest one that meets the SLO (found by bisection)."""
    cap = capacity(spec, cfg, hw)
    limit = min(
        cfg.max_num_seqs, cap.max_batch(context_len) if cap.num_blocks else cfg.max_num_seqs
    )
    if max_batch is not None:
        limit = min(limit, max_batch)
    limit = max(limit, 1)

    def tpot(b: int) -> float:
        return decode_tpot(spec, cfg, hw, b, context_len, context_len)[0]

    if tpot(1) > tpot_slo_s:
        t1 = tpot(1)
        return {
            "batch": 0.0,
            "tpot_s": t1,
            "tok_s": 0.0,
            "kv_limit": float(limit),
            "meets_slo": 0.0,
        }
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tpot(mid) <= tpot_slo_s:
            lo = mid
        else:
            hi = mid - 1
    t = tpot(lo)
    return {
        "batch": float(lo),
        "tpot_s": t,
        "tok_s": lo / t,
        "kv_limit": float(limit),
        "meets_slo": 1.0,
    }


def batch_sweep(
    spec: ModelSpec, cfg: PlanConfig, hw: Hardware, context_len: int, batches: list[int]
) -> list[dict[str, float]]:
    rows = []
    for b in batches:
        t = decode_tpot(spec, cfg, hw, b, context_len, context_len)[0]
        rows.append({"batch": b, "tpot_ms": t * 1e3, "tok_s": b / t})
    return rows


def chunk_size_study(
    spec: ModelSpec,
    cfg: PlanConfig,
    hw: Hardware,
    prompt_len: int,
    num_decodes: int,
    context_len: int,
    chunk_sizes: list[int],
) -> list[dict[str, float]]:
    """Per token budget (``--max-num-batched-tokens``): a prompt of ``prompt_len``
    arriving while ``num_decodes`` requests decode at ``context_len``. Each step
    carries the decodes and a chunk of the remaining budget: the prompt's TTFT is the
    sum of those steps, and the decodes' TPOT during it is the mean mixed-step time
    (the interference); small budgets protect TPOT, large ones shorten TTFT."""
    rows = []
    decode_only = step_time(spec, cfg, hw, StepShape.decode(num_decodes, context_len)).seconds
    for c in chunk_sizes:
        per_chunk = c - num_decodes
        if per_chunk < 1:
            continue
        done, t, steps = 0, 0.0, 0
        while done < prompt_len:
            n = min(per_chunk, prompt_len - done)
            partial = 0 if done + n >= prompt_len else 1
            shape = StepShape(
                (context_len,) * num_decodes, ((n, done),), num_partial_chunks=partial
            )
            t += step_time(spec, cfg, hw, shape).seconds
            done += n
            steps += 1
        rows.append(
            {
                "max_num_batched_tokens": c,
                "ttft_ms": t * 1e3,
                "tpot_during_prefill_ms": t / steps * 1e3,
                "tpot_decode_only_ms": decode_only * 1e3,
                "steps": steps,
            }
        )
    return rows


def best_chunk_size(rows: list[dict[str, float]], tpot_slo_s: float) -> int | None:
    """The budget with the lowest TTFT whose mixed-step TPOT meets the SLO."""
    ok = [r for r in rows if r["tpot_during_prefill_ms"] <= tpot_slo_s * 1e3]
    if not ok:
        return None
    return int(min(ok, key=lambda r: r["ttft_ms"])["max_num_batched_tokens"])


def transformer_vs_ssm(
    models: list[ModelSpec], cfg: PlanConfig, hw: Hardware, context_lens: list[int], batch: int
) -> list[dict[str, float | str]]:
    """Per model and context length: prefill time of the context, TPOT at ``batch``,
    decode tokens/s, per-sequence cache bytes and the batch the memory holds. A
    transformer's decode reads a KV cache that grows with the context; an SSM's
    fixed state does not."""
    rows: list[dict[str, float | str]] = []
    for spec in models:
        for c in context_lens:
            mcfg = replace(cfg, max_model_len=max(c + 1, min(spec.max_position_embeddings, c + 1)))
            spec_c = replace(spec, max_position_embeddings=max(spec.max_position_embeddings, c + 1))
            tpot = decode_tpot(spec_c, mcfg, hw, batch, c, c)[0]
            per_seq = kv_bytes_per_seq(spec_c, mcfg, hw.kind, c)
            cap = capacity(spec_c, mcfg, hw)
            free = (
                cap.kv_budget_bytes
                if cap.num_blocks
                else hw.memory_bytes * cfg.gpu_memory_utilization - cap.weights_bytes
            )
            rows.append(
                {
                    "model": spec.name,
                    "params_b": spec.num_params(include_embedding=True) / 1e9,
                    "context_len": c,
                    "prefill_ms": prefill_time(spec_c, mcfg, hw, c) * 1e3,
                    "tpot_ms": tpot * 1e3,
                    "decode_tok_s": batch / tpot,
                    "cache_mib_per_seq": per_seq / (1 << 20),
                    "max_batch_by_memory": float(int(free // per_seq)) if per_seq else float("inf"),
                }
            )
    return rows


__all__ = [
    "batch_sweep",
    "best_batch_under_slo",
    "best_chunk_size",
    "block_size_study",
    "chunk_size_study",
    "kv_memory_table",
    "transformer_vs_ssm",
]
