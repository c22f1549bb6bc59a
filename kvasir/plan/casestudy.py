"""The case study of ``docs/tco-llama-3-70b.md``: Llama-3-70B as an interactive chatbot
on H100 and on L40S clusters, written by the tool (``kvasir plan casestudy``); a test
regenerates it and compares it with the committed file.

Serving is modelled in steady state: a replica holding ``B`` conversations generates
``B`` tokens per step, and for every output token admits ``prompt_len / output_len``
prompt tokens of new conversations, chunked into the same steps. So each step carries
``B`` decode rows at the mean context and ``B x prompt_len / output_len`` prefill
tokens; its time is the TPOT. TTFT is a step of queueing plus the steps that the
token budget left beside the decodes needs for one prompt. The best batch is the
largest that meets both SLOs and fits the KV cache.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from kvasir.plan.config import PlanConfig
from kvasir.plan.hardware import CATALOGUE, Hardware
from kvasir.plan.memory import GIB, capacity
from kvasir.plan.model_spec import ModelSpec, load_model_spec
from kvasir.plan.perf import step_time
from kvasir.plan.roofline import StepShape
from kvasir.plan.tco import CLOUD_PRICES, RESERVED_DISCOUNT, cost_per_user_month, inputs_for, tco

MODEL = "llama-3-70b"
PROMPT_LEN = 1024  # system prompt + conversation so far
OUTPUT_LEN = 256
TTFT_SLO_S = 1.0
TPOT_SLO_S = 0.050  # 20 tokens/s per user, faster than reading
TOKENS_PER_USER_PER_DAY = 5_000  # output tokens: ~20 answers a day
UTILIZATION = 0.6
MAX_NUM_BATCHED_TOKENS = 8192
CANDIDATES: tuple[tuple[str, int, int, str], ...] = (
    ("h100-sxm", 2, 1, "fp8"),
    ("h100-sxm", 4, 1, "none"),
    ("h100-sxm", 4, 1, "fp8"),
    ("h100-sxm", 8, 1, "none"),
    ("l40s", 4, 1, "fp8"),
    ("l40s", 8, 1, "fp8"),
    ("l40s", 8, 1, "none"),
    ("l40s", 4, 2, "none"),
)


@dataclass(frozen=True)
class ServingPoint:
    batch: int
    tpot_s: float
    ttft_s: float
    output_tok_s: float


def _steady_shape(batch: int, prompt_len: int, output_len: int, prefix_hit: float) -> StepShape:
    ctx = prompt_len + output_len // 2
    new = round(batch * prompt_len * (1 - prefix_hit) / output_len)
    past = int(prompt_len * prefix_hit)
    chunks = [(prompt_len - past, past)] * (new // max(prompt_len - past, 1))
    rest = new - sum(n for n, _ in chunks)
    if rest > 0:
        chunks.append((rest, past))  # a part of a prompt: it samples nothing yet
    return StepShape((ctx,) * batch, tuple(chunks), num_partial_chunks=1 if rest > 0 else 0)


def serving_point(
    spec: ModelSpec, cfg: PlanConfig, hw: Hardware, batch: int, prefix_hit: float = 0.0
) -> ServingPoint:
    # Pipeline parallelism: the batch is one micro-batch per stage in flight, and each
    # conversation's next token needs its micro-batch's whole trip through the stages.
    micro = -(-batch // cfg.pipeline_parallel_size)
    st = step_time(spec, cfg, hw, _steady_shape(micro, PROMPT_LEN, OUTPUT_LEN, prefix_hit))
    tpot = st.seconds
    left = max(cfg.max_num_batched_tokens - batch, 1)
    ttft = (1 + math.ceil(PROMPT_LEN * (1 - prefix_hit) / left)) * tpot
    return ServingPoint(batch, tpot, ttft, batch / tpot)


def best_point(
    spec: ModelSpec, cfg: PlanConfig, hw: Hardware, prefix_hit: float = 0.0
) -> ServingPoint | None:
    """The largest batch meeting both SLOs within the KV cache (bisection: TPOT and
    TTFT rise with batch)."""
    cap = capacity(spec, cfg, hw)
    limit = min(cfg.max_num_seqs, cap.max_batch(PROMPT_LEN + OUTPUT_LEN))
    budget_limit = int(
        cfg.max_num_batched_tokens / (1 + PROMPT_LEN * (1 - prefix_hit) / OUTPUT_LEN)
    )
    limit = min(limit, budget_limit)

    def ok(b: int) -> bool:
        p = serving_point(spec, cfg, hw, b, prefix_hit)
        return p.tpot_s <= TPOT_SLO_S and p.ttft_s <= TTFT_SLO_S

    if limit < 1 or not ok(1):
        return None
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return serving_point(spec, cfg, hw, lo, prefix_hit)


def static_batching_point(spec: ModelSpec, cfg: PlanConfig, hw: Hardware, batch: int) -> float:
    """Output tokens/s of static batching (a batch is admitted together and runs to its
    longest output; outputs U[OUTPUT_LEN/2, 3 OUTPUT_LEN/2]): the expected longest of
    ``batch`` outputs, a + (b - a) B / (B + 1), sets the decode steps."""
    a, b = OUTPUT_LEN // 2, 3 * OUTPUT_LEN // 2
    longest = a + (b - a) * batch / (batch + 1)
    prefill = step_time(spec, cfg, hw, StepShape.prefill(PROMPT_LEN, batch)).seconds
    decode = step_time(
        spec, cfg, hw, StepShape.decode(batch, PROMPT_LEN + int(longest) // 2)
    ).seconds
    return batch * OUTPUT_LEN / (prefill + longest * decode)


def _cfg(tp: int, pp: int, quant: str) -> PlanConfig:
    return PlanConfig(
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        quantization=quant,
        kv_cache_dtype="fp8" if quant == "fp8" else "auto",
        max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
        max_num_seqs=1024,
        max_model_len=8192,
    )


def _f(x: float | None, nd: int = 2) -> str:
    if x is None:
        return "—"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{nd}f}"


def _md(header: list[str], rows: list[list[str]]) -> str:
    out = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|",
    ]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def build(plot_dir: str | None = None, plot_prefix: str = "tco-llama-3-70b") -> str:
    """The markdown of the case study (and its figures, if ``plot_dir``)."""
    spec = load_model_spec(MODEL)
    lines = [
        "# Llama-3-70B as an interactive chatbot: H100 or L40S?",
        "",
        "Generated by `kvasir plan casestudy` (kvasir/plan/casestudy.py); do not edit by hand. "
        "`tests/plan/test_casestudy.py` regenerates it and checks that it matches.",
        "",
        "## The service",
        "",
        f"Each conversation turn sends a {PROMPT_LEN}-token prompt (system prompt and history) and "
        f"gets a {OUTPUT_LEN}-token answer. SLO: time to first token ≤ {TTFT_SLO_S:g} s and time per "
        f"output token ≤ {TPOT_SLO_S * 1e3:g} ms (20 tokens/s, faster than anyone reads). A user "
        f"reads {TOKENS_PER_USER_PER_DAY:,} output tokens a day. Utilisation (the fraction of hours "
        f"the fleet serves at the modelled load) is {UTILIZATION:.0%}.",
        "",
        "Method: the replica's steady state (`kvasir/plan/casestudy.py`). With `B` conversations "
        f"in flight, each step decodes `B` tokens and prefills `B × {PROMPT_LEN}/{OUTPUT_LEN}` prompt "
        "tokens of new conversations; the step time (kvasir's performance model: roofline per "
        "operator, efficiency factors from `benchmarks/RESULTS.md`, tensor-parallel all-reduces) is "
        "the TPOT. The best batch is the largest meeting both SLOs inside the KV cache; under "
        "pipeline parallelism `B` is split into one micro-batch per stage. Engine "
        f"settings: `--max-num-batched-tokens {MAX_NUM_BATCHED_TOKENS} --max-model-len 8192`, FP8 "
        "weights with an FP8 KV cache where quantised.",
        "",
        "## Configurations",
        "",
    ]
    rows = []
    best: dict[str, tuple[float, str, PlanConfig, ServingPoint]] = {}
    for hw_name, tp, pp, quant in CANDIDATES:
        hw = CATALOGUE[hw_name]
        cfg = _cfg(tp, pp, quant)
        label = (
            f"{hw_name} TP{tp}"
            + (f" PP{pp}" if pp > 1 else "")
            + f" {'FP8' if quant == 'fp8' else 'BF16'}"
        )
        try:
            cap = capacity(spec, cfg, hw)
        except ValueError as e:
            rows.append(
                [
                    label,
                    str(tp * pp),
                    "does not fit: " + str(e).split(":")[1].strip(),
                    "",
                    "",
                    "",
                    "",
                    "",
                ]
            )
            continue
        pt = best_point(spec, cfg, hw)
        if pt is None:
            rows.append(
                [
                    label,
                    str(tp * pp),
                    _f(cap.kv_bytes_per_block * cap.usable_blocks / GIB, 1),
                    "misses the SLO",
                    "",
                    "",
                    "",
                    "",
                ]
            )
            continue
        n = tp * pp
        res = tco(
            inputs_for(hw_name, n, hw.price_usd, hw.tdp_w, utilization=UTILIZATION), pt.output_tok_s
        )
        rows.append(
            [
                label,
                str(n),
                _f(cap.kv_budget_bytes / GIB, 1),
                str(pt.batch),
                _f(pt.tpot_s * 1e3, 1),
                _f(pt.ttft_s * 1e3, 0),
                _f(pt.output_tok_s, 0),
                _f(res.on_prem_usd_per_mtok),
            ]
        )
        key = hw_name
        if key not in best or res.on_prem_usd_per_mtok < best[key][0]:
            best[key] = (res.on_prem_usd_per_mtok, label, cfg, pt)
    lines.append(
        _md(
            [
                "configuration",
                "GPUs",
                "KV GiB/GPU",
                "best batch",
                "TPOT ms",
                "TTFT ms",
                "out tok/s",
                "$/M out tok (on-prem)",
            ],
            rows,
        )
    )
    lines += ["", "## The best configuration of each cluster", ""]
    brow = []
    tco_rows = []
    for hw_name, (_, label, cfg, pt) in sorted(best.items()):
        hw = CATALOGUE[hw_name]
        n = cfg.world_size
        t = inputs_for(hw_name, n, hw.price_usd, hw.tdp_w, utilization=UTILIZATION)
        res = tco(t, pt.output_tok_s)
        od = res.on_demand_usd_per_mtok
        brow.append(
            [
                label,
                _f(pt.output_tok_s / n, 0),
                _f(res.on_prem_usd_per_mtok),
                _f(res.reserved_usd_per_mtok),
                _f(od),
                _f(cost_per_user_month(res.on_prem_usd_per_mtok, TOKENS_PER_USER_PER_DAY)),
                _f(pt.output_tok_s * 86400 * UTILIZATION / TOKENS_PER_USER_PER_DAY, 0),
                _f(res.break_even_utilization_vs_on_demand),
                _f(res.break_even_months_vs_on_demand, 1),
                _f(res.break_even_months_vs_reserved, 1),
            ]
        )
        h = res.hourly
        tco_rows.append(
            [
                label,
                _f(res.capex_usd, 0),
                _f(h.capex),
                _f(h.energy),
                _f(h.colocation),
                _f(h.staff),
                _f(h.total),
            ]
        )
    lines.append(
        _md(
            [
                "configuration",
                "out tok/s per GPU",
                "$/M on-prem",
                "$/M reserved",
                "$/M on demand",
                "$/user-month (on-prem)",
                "users per replica",
                "break-even utilisation vs on demand",
                "break-even months vs on demand",
                "vs reserved",
            ],
            brow,
        )
    )
    lines += [
        "",
        "On-premises cost per replica-hour (US$):",
        "",
        _md(
            [
                "configuration",
                "CapEx",
                "depreciation/h",
                "energy/h",
                "colocation/h",
                "staff/h",
                "total/h",
            ],
            tco_rows,
        ),
        "",
        "Assumptions (each a flag of `kvasir plan tco`): 4-year straight-line depreciation; an 8-GPU "
        "server without GPUs US$80,000, networking US$25,000 and storage US$5,000 per server; "
        "average draw 30 % of TDP idle to 80 % flat out, plus 2 kW per server, PUE 1.3, "
        "US$0.10/kWh; colocation US$150/kW-month of provisioned power; one operations engineer "
        "(US$200,000/year) per 50 servers. GPU prices: `kvasir/plan/hardware.py` (reported street "
        "prices, 2024); cloud prices: `kvasir/plan/tco.py` ("
        + "; ".join(f"{k}: {v[2]}" for k, v in CLOUD_PRICES.items() if k in best)
        + f"); reserved = on demand less {RESERVED_DISCOUNT:.0%}. On-demand capacity is "
        "assumed elastic (paid only while busy), the others are paid every hour, so at "
        f"{UTILIZATION:.0%} utilisation a {RESERVED_DISCOUNT:.0%} reservation costs what on demand "
        "does.",
        "",
        "## Sensitivity to utilisation",
        "",
    ]
    utils = [0.2, 0.4, 0.6, 0.8, 1.0]
    srows = []
    series: dict[str, tuple[list[float], list[float]]] = {}
    for hw_name, (_, label, cfg, pt) in sorted(best.items()):
        hw = CATALOGUE[hw_name]
        ys = []
        row = [label]
        for u in utils:
            r = tco(
                inputs_for(hw_name, cfg.world_size, hw.price_usd, hw.tdp_w, utilization=u),
                pt.output_tok_s,
            )
            ys.append(r.on_prem_usd_per_mtok)
            row.append(_f(r.on_prem_usd_per_mtok))
        row.append(_f(r.on_demand_usd_per_mtok))
        srows.append(row)
        series[f"{label} on-prem"] = ([u * 100 for u in utils], ys)
        if r.on_demand_usd_per_mtok:
            series[f"{label} on demand"] = (
                [u * 100 for u in utils],
                [r.on_demand_usd_per_mtok] * len(utils),
            )
    lines.append(_md(["configuration"] + [f"{u:.0%}" for u in utils] + ["on demand (any)"], srows))
    lines += ["", "$ per million output tokens on premises, by utilisation.", ""]
    lines += ["## Prefix caching and continuous batching", ""]
    prow = []
    for hw_name, (_, label, cfg, _) in sorted(best.items()):
        hw = CATALOGUE[hw_name]
        for hit in (0.0, 0.25, 0.5, 0.75):
            p = best_point(spec, cfg, hw, hit)
            if p is None:
                continue
            r = tco(
                inputs_for(
                    hw_name, cfg.world_size, hw.price_usd, hw.tdp_w, utilization=UTILIZATION
                ),
                p.output_tok_s,
            )
            prow.append(
                [
                    label,
                    f"{hit:.0%}",
                    str(p.batch),
                    _f(p.output_tok_s, 0),
                    _f(r.on_prem_usd_per_mtok),
                ]
            )
    lines.append(
        _md(
            ["configuration", "prefix-cache hit rate", "best batch", "out tok/s", "$/M on-prem"],
            prow,
        )
    )
    lines += [""]
    crow = []
    for hw_name, (_, label, cfg, pt) in sorted(best.items()):
        hw = CATALOGUE[hw_name]
        static = static_batching_point(spec, cfg, hw, pt.batch)
        t = inputs_for(hw_name, cfg.world_size, hw.price_usd, hw.tdp_w, utilization=UTILIZATION)
        r_c, r_s = tco(t, pt.output_tok_s), tco(t, static)
        crow.append(
            [
                label,
                str(pt.batch),
                _f(pt.output_tok_s, 0),
                _f(static, 0),
                _f(r_c.on_prem_usd_per_mtok),
                _f(r_s.on_prem_usd_per_mtok),
            ]
        )
    lines.append(
        _md(
            [
                "configuration",
                "batch",
                "continuous out tok/s",
                "static out tok/s",
                "$/M continuous",
                "$/M static",
            ],
            crow,
        )
    )
    lines += [
        "",
        "Static batching admits a batch together and runs it to its longest answer (answers "
        f"U[{OUTPUT_LEN // 2}, {3 * OUTPUT_LEN // 2}] tokens), so finished rows idle and new "
        "conversations wait for the whole batch (its TTFT alone breaks the SLO); continuous "
        "batching refills each slot at once.",
        "",
        "## KV cache of the chosen configurations",
        "",
    ]
    krow = []
    for hw_name, (_, label, cfg, _pt) in sorted(best.items()):
        cap = capacity(spec, cfg, CATALOGUE[hw_name])
        krow.append(
            [
                label,
                _f(cap.weights_bytes / GIB, 1),
                _f(cap.kv_budget_bytes / GIB, 1),
                str(cap.num_blocks),
                _f(cap.max_concurrency, 1),
                str(cap.max_batch(PROMPT_LEN + OUTPUT_LEN)),
            ]
        )
    lines.append(
        _md(
            [
                "configuration",
                "weights GiB/GPU",
                "KV GiB/GPU",
                "KV blocks (engine)",
                "concurrency at 8k",
                f"conversations of {PROMPT_LEN + OUTPUT_LEN} tokens",
            ],
            krow,
        )
    )
    lines += [""]
    if plot_dir:
        from kvasir.plan.plots import lines_plot

        os.makedirs(plot_dir, exist_ok=True)
        p1 = os.path.join(plot_dir, f"{plot_prefix}-utilization.png")
        lines_plot(
            series,
            p1,
            "utilisation (%)",
            "$ per million output tokens",
            "Llama-3-70B chatbot: cost vs utilisation",
            logy=True,
        )
        bseries = {}
        for hw_name, (_, label, cfg, _) in sorted(best.items()):
            hw = CATALOGUE[hw_name]
            bs = [1, 2, 4, 8, 16, 32, 64, 128, 256]
            bs = [
                b
                for b in bs
                if b
                <= min(cfg.max_num_seqs, capacity(spec, cfg, hw).max_batch(PROMPT_LEN + OUTPUT_LEN))
            ]
            pts = [serving_point(spec, cfg, hw, b) for b in bs]
            bseries[label] = (
                [p.tpot_s * 1e3 for p in pts],
                [p.output_tok_s / cfg.world_size for p in pts],
            )
        p2 = os.path.join(plot_dir, f"{plot_prefix}-tpot-throughput.png")
        lines_plot(
            bseries, p2, "TPOT (ms)", "output tokens/s per GPU", "Throughput vs TPOT (batch 1..256)"
        )
    lines += [
        "## Figures",
        "",
        f"![cost per million tokens against utilisation]({plot_prefix}-utilization.png)",
        "",
        f"![throughput per GPU against TPOT]({plot_prefix}-tpot-throughput.png)",
        "",
        "Regenerate with `kvasir plan casestudy --output docs/tco-llama-3-70b.md --plot-dir docs` "
        "(figures need matplotlib).",
        "",
    ]
    return "\n".join(lines)


def write_case_study(path: str, plot_dir: str | None = None) -> str:
    text = build(plot_dir)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


__all__ = ["best_point", "build", "serving_point", "static_batching_point", "write_case_study"]
