"""The ``kvasir plan`` subcommands: each reads its parsed flags, runs the models and
prints a table, or one JSON object with ``--json`` (``kvasir/plan/cli.py`` parses)."""

from __future__ import annotations

import argparse
import json
import logging
import math
from typing import Any

logger = logging.getLogger(__name__)

# -- helpers ---------------------------------------------------------------------------


def plan_config(args: argparse.Namespace):  # -> PlanConfig
    from kvasir.plan.config import PlanConfig

    return PlanConfig(
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        dtype=args.dtype,
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
        kv_cache_gb=args.kv_cache_gb,
        gpu_memory_utilization=args.gpu_memory_utilization,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        enable_chunked_prefill=not args.no_enable_chunked_prefill,
        allreduce=args.allreduce,
        num_speculative_tokens=args.num_speculative_tokens,
        acceptance_rate=args.acceptance_rate,
        draft_model=args.draft_model,
    )


def _setup(args: argparse.Namespace, default_hw: str = "h100-sxm"):
    from kvasir.plan.hardware import get_hardware
    from kvasir.plan.model_spec import load_model_spec
    from kvasir.plan.validate import validate

    spec = load_model_spec(args.model)
    cfg = plan_config(args)
    hw = get_hardware(args.hardware or default_hw, args.calibration_file)
    validate(spec, cfg, hw)
    return spec, cfg, hw


def _table(rows: list[dict], cols: list[str] | None = None) -> str:
    if not rows:
        return "(none)"
    cols = cols or list(rows[0])

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if v != v or math.isinf(v):
                return str(v)
            a = abs(v)
            return f"{v:.4g}" if a < 1e4 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _emit(args: argparse.Namespace, result: dict, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(result, default=_json_default))
    else:
        print(text)


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and (math.isinf(o) or o != o):
        return None
    return str(o)


def _context(spec, cfg, hw) -> dict:  # noqa: ANN001
    from kvasir.plan.efficiency import efficiency_for

    return {
        "model": spec.name,
        "hardware": hw.name,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "pipeline_parallel_size": cfg.pipeline_parallel_size,
        "dtype": cfg.model_dtype(hw.kind),
        "quantization": cfg.quantization,
        "kv_cache_dtype": cfg.kv_dtype_name(hw.kind),
        # what the prediction rests on: RESULTS.md factors, a calibration, or the bare
        # roofline (devices kvasir never ran on)
        "efficiency_source": efficiency_for(hw).source,
    }


# -- commands --------------------------------------------------------------------------


def cmd_roofline(args: argparse.Namespace) -> int:
    from kvasir.plan.efficiency import efficiency_for
    from kvasir.plan.perf import breakdown, step_time
    from kvasir.plan.roofline import StepShape

    spec, cfg, hw = _setup(args)
    chunks = ((args.prompt_len, 0),) if args.prompt_len else ()
    shape = StepShape((args.context_len,) * args.batch_size, chunks)
    eff = efficiency_for(hw)
    st = step_time(spec, cfg, hw, shape, eff)
    rows = breakdown(st)
    ridge = (
        hw.peak(cfg.gemm_dtype(hw.kind))
        * eff.gemm_compute
        / (hw.memory_bandwidth_gbs * 1e9 * eff.gemm_memory)
    )
    result = {
        **_context(spec, cfg, hw),
        "batch_size": args.batch_size,
        "context_len": args.context_len,
        "prompt_len": args.prompt_len,
        "ridge_flops_per_byte": ridge,
        "step_ms": st.seconds * 1e3,
        "efficiency_source": eff.source,
        "operators": rows,
    }
    if args.plot:
        from kvasir.plan.plots import roofline_plot

        roofline_plot(st, hw, cfg, eff, args.plot, title=f"{spec.name} on {hw.name}")
        result["plot"] = args.plot
    text = (
        f"{spec.name} on {hw.description}: {args.batch_size} decode rows at context "
        f"{args.context_len}"
        + (f" + a {args.prompt_len}-token prompt" if args.prompt_len else "")
        + f"; ridge {ridge:.1f} FLOP/byte; step {st.seconds * 1e3:.3f} ms (stage 0 below)\n"
        + _table(rows, ["op", "kind", "gflops", "mbytes", "intensity", "bound", "ms"])
        + f"\nefficiency: {eff.source}"
    )
    _emit(args, result, text)
    return 0


def cmd_latency(args: argparse.Namespace) -> int:
    from kvasir.plan.perf import predict_latency

    spec, cfg, hw = _setup(args)
    lat = predict_latency(spec, cfg, hw, args.input_len, args.output_len, args.batch_size)
    result = {**_context(spec, cfg, hw), "input_len": args.input_len, "output_len": args.output_len,
              "batch_size": args.batch_size, **lat.as_dict()}  # fmt: skip
    rows = [{"metric": k, "value": v} for k, v in lat.as_dict().items()]
    if args.plot:
        from kvasir.plan.efficiency import efficiency_for
        from kvasir.plan.perf import step_time
        from kvasir.plan.plots import roofline_plot
        from kvasir.plan.roofline import StepShape

        ctx = args.input_len + args.output_len // 2
        st = step_time(spec, cfg, hw, StepShape.decode(args.batch_size, ctx))
        title = f"{spec.name} on {hw.name}: decode step, batch {args.batch_size}, context {ctx}"
        roofline_plot(st, hw, cfg, efficiency_for(hw), args.plot, title)
        result["plot"] = args.plot
    _emit(args, result, f"{spec.name} on {hw.name}\n" + _table(rows))
    return 0


def _workload(args: argparse.Namespace, spec, cfg, hw):  # noqa: ANN001
    from kvasir.plan.memory import capacity
    from kvasir.plan.workload import make_requests, simulate

    reqs = make_requests(
        args.num_prompts, args.input_len, args.output_len, args.request_rate, args.workload_seed,
        args.prefix_hit_rate,
    )  # fmt: skip
    cap = capacity(spec, cfg, hw)
    return simulate(spec, cfg, hw, reqs, cap.num_blocks or 10**9), cap


def cmd_throughput(args: argparse.Namespace) -> int:
    spec, cfg, hw = _setup(args)
    sim, cap = _workload(args, spec, cfg, hw)
    summary = sim.summary()
    result = {**_context(spec, cfg, hw), "num_prompts": args.num_prompts, **summary,
              "num_blocks": cap.num_blocks}  # fmt: skip
    text = f"{spec.name} on {hw.name}, {args.num_prompts} requests\n" + _table(
        [{"metric": k, "value": v} for k, v in summary.items()]
    )
    if args.tpot_slo_ms:
        from kvasir.plan.studies import best_batch_under_slo
        from kvasir.plan.workload import parse_range

        (ilo, ihi), (olo, ohi) = parse_range(args.input_len), parse_range(args.output_len)
        ctx = (ilo + ihi) // 2 + (olo + ohi) // 4
        best = best_batch_under_slo(spec, cfg, hw, ctx, args.tpot_slo_ms / 1e3)
        result["best_batch_under_slo"] = best
        text += f"\nbest decode batch under TPOT {args.tpot_slo_ms} ms at context {ctx}: {best}"
    if args.plot:
        from kvasir.plan.plots import batch_plot
        from kvasir.plan.studies import batch_sweep

        rows = batch_sweep(spec, cfg, hw, 1024, [1, 2, 4, 8, 16, 32, 64, 128, 256])
        batch_plot(rows, args.plot, args.tpot_slo_ms, f"{spec.name} on {hw.name}")
        result["plot"] = args.plot
    _emit(args, result, text)
    return 0


def cmd_capacity(args: argparse.Namespace) -> int:
    from kvasir.plan.memory import capacity

    spec, cfg, hw = _setup(args)
    cap = capacity(spec, cfg, hw)
    d = cap.as_dict()
    if args.seq_len:
        d["max_batch_at_seq_len"] = cap.max_batch(args.seq_len)
        d["seq_len"] = args.seq_len
    result = {**_context(spec, cfg, hw), **d}
    if args.plot:
        from kvasir.plan.memory import GIB, kv_bytes_per_seq
        from kvasir.plan.plots import lines_plot

        lens = [2**i for i in range(8, 18) if 2**i <= cap.max_model_len] or [cap.max_model_len]
        series = {
            f"batch {b}": (
                [float(n) for n in lens],
                [b * kv_bytes_per_seq(spec, cfg, hw.kind, n) / GIB for n in lens],
            )
            for b in (1, 8, 32, 128)
        }
        budget = cap.kv_budget_bytes * cfg.world_size / GIB
        series["KV budget (all ranks)"] = ([float(n) for n in lens], [budget] * len(lens))
        lines_plot(series, args.plot, "sequence length (tokens)", "KV cache (GiB, all ranks)",
                   f"{spec.name} on {hw.name}: KV memory", logy=True)  # fmt: skip
        result["plot"] = args.plot
    _emit(
        args,
        result,
        f"{spec.name} on {hw.name} (per rank)\n"
        + _table([{"field": k, "value": v} for k, v in d.items()]),
    )
    return 0


def _tco_for(args, spec, cfg, hw, tokens_per_s: float):  # noqa: ANN001
    from kvasir.plan.tco import inputs_for, tco

    n = args.num_accelerators or cfg.world_size
    t = inputs_for(
        hw.name,
        n,
        hw.price_usd,
        hw.tdp_w,
        accelerator_price_usd=args.accelerator_price,
        depreciation_years=args.depreciation_years,
        usd_per_kwh=args.usd_per_kwh,
        pue=args.pue,
        colocation_usd_per_kw_month=args.colocation_usd_per_kw_month,
        cloud_on_demand_usd_per_hour=args.cloud_on_demand,
        cloud_reserved_usd_per_hour=args.cloud_reserved,
        utilization=args.utilization,
    )
    return tco(t, tokens_per_s), t


def cmd_tco(args: argparse.Namespace) -> int:
    from kvasir.plan.tco import cost_per_user_month, users_per_deployment

    spec, cfg, hw = _setup(args)
    sim, _ = _workload(args, spec, cfg, hw)
    res, t = _tco_for(args, spec, cfg, hw, sim.output_tok_s)
    d = res.as_dict()
    d["cost_per_user_month_on_prem"] = cost_per_user_month(
        res.on_prem_usd_per_mtok, args.tokens_per_user_per_day
    )
    d["users_per_deployment"] = users_per_deployment(
        sim.output_tok_s, t.utilization, args.tokens_per_user_per_day
    )
    from dataclasses import replace as _replace

    from kvasir.plan.tco import tco as _tco

    utils = [0.1, 0.2, 0.4, 0.6, 0.8, 1.0]
    sens = [_tco(_replace(t, utilization=u), sim.output_tok_s) for u in utils]
    d["sensitivity"] = [
        {"utilization": u, "on_prem_usd_per_mtok": r.on_prem_usd_per_mtok,
         "reserved_usd_per_mtok": r.reserved_usd_per_mtok,
         "on_demand_usd_per_mtok": r.on_demand_usd_per_mtok}
        for u, r in zip(utils, sens)
    ]  # fmt: skip
    result = {
        **_context(spec, cfg, hw),
        "utilization": t.utilization,
        "num_accelerators": t.num_accelerators,
        **d,
    }
    if args.plot:
        from kvasir.plan.plots import lines_plot

        xs = [u * 100 for u in utils]
        series = {"on premises": (xs, [r.on_prem_usd_per_mtok for r in sens])}
        if sens[0].reserved_usd_per_mtok:
            series["reserved"] = (xs, [r.reserved_usd_per_mtok or 0.0 for r in sens])
        if sens[0].on_demand_usd_per_mtok:
            series["on demand"] = (xs, [r.on_demand_usd_per_mtok or 0.0 for r in sens])
        lines_plot(series, args.plot, "utilisation (%)", "$ per million output tokens",
                   f"{spec.name} on {t.num_accelerators} x {hw.name}", logy=True)  # fmt: skip
        result["plot"] = args.plot
    flat = {k: v for k, v in d.items() if not isinstance(v, (dict, list))}
    _emit(args, result, f"{spec.name} on {t.num_accelerators} x {hw.name} (output tokens)\n"
          + _table([{"field": k, "value": v} for k, v in flat.items()]))  # fmt: skip
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from kvasir.plan.hardware import get_hardware
    from kvasir.plan.memory import capacity
    from kvasir.plan.model_spec import load_model_spec
    from kvasir.plan.perf import predict_latency
    from kvasir.plan.validate import validate

    spec = load_model_spec(args.model)
    cfg = plan_config(args)
    rows = []
    for name in args.hardware_list.split(","):
        hw = get_hardware(name, args.calibration_file)
        try:
            validate(spec, cfg, hw)
            cap = capacity(spec, cfg, hw)
            lat = predict_latency(spec, cfg, hw, 512, 128)
            sim, _ = _workload(args, spec, cfg, hw)
            row: dict[str, Any] = {"hardware": hw.name, "fits": True, "ttft_ms": lat.ttft_s * 1e3,
                   "tpot_ms": lat.tpot_s * 1e3, "out_tok_s": sim.output_tok_s,
                   "kv_tokens": cap.kv_tokens}  # fmt: skip
            if hw.price_usd or name in _cloud_names():
                res, _ = _tco_for(args, spec, cfg, hw, sim.output_tok_s)
                row["usd_per_mtok_on_prem"] = res.on_prem_usd_per_mtok if hw.price_usd else None
                row["usd_per_mtok_on_demand"] = res.on_demand_usd_per_mtok
        except ValueError as e:
            row = {"hardware": hw.name, "fits": False, "error": str(e)}
        rows.append(row)
    result = {
        **_context(spec, cfg, get_hardware(args.hardware_list.split(",")[0])),
        "results": rows,
    }
    if args.plot:
        from kvasir.plan.plots import bar_plot

        fit = [r for r in rows if r["fits"]]
        bar_plot([r["hardware"] for r in fit], [r["out_tok_s"] for r in fit], args.plot,
                 "output tokens/s", f"{spec.name}, {cfg.world_size} device(s) per replica")  # fmt: skip
        result["plot"] = args.plot
    _emit(args, result, _table(rows, ["hardware", "fits", "ttft_ms", "tpot_ms", "out_tok_s", "kv_tokens",
                                      "usd_per_mtok_on_prem", "usd_per_mtok_on_demand"]))  # fmt: skip
    return 0


def _cloud_names() -> set[str]:
    from kvasir.plan.tco import CLOUD_PRICES

    return set(CLOUD_PRICES)


def cmd_study(args: argparse.Namespace) -> int:
    from kvasir.plan import studies
    from kvasir.plan.memory import best_block_size

    spec, cfg, hw = _setup(args)
    rows: list[dict]
    extra: dict[str, Any] = {}
    if args.name == "block-size":
        rows = studies.block_size_study(spec, cfg, hw.kind, range(64, 4097))
        extra["best_block_size"] = best_block_size(rows)
    elif args.name == "chunk-size":
        rows = studies.chunk_size_study(spec, cfg, hw, args.prompt_len, args.num_decodes, args.context_len,
                                        [256, 512, 1024, 2048, 4096, 8192])  # fmt: skip
        extra["best_chunk_size"] = studies.best_chunk_size(rows, args.tpot_slo_ms / 1e3)
    elif args.name == "kv-memory":
        rows = studies.kv_memory_table(
            spec, cfg, hw.kind, [1024, 4096, 16384, 65536], [1, 8, 32, 128]
        )
    elif args.name == "batch":
        rows = studies.batch_sweep(
            spec, cfg, hw, args.context_len, [1, 2, 4, 8, 16, 32, 64, 128, 256]
        )
        extra["best"] = studies.best_batch_under_slo(
            spec, cfg, hw, args.context_len, args.tpot_slo_ms / 1e3
        )
    else:
        from kvasir.plan.model_spec import load_model_spec

        models = [spec] if spec.num_mamba_layers else [spec, load_model_spec("mamba-2.8b")]
        rows = studies.transformer_vs_ssm(models, cfg, hw, [1024, 8192, 32768], 16)
    result = {**_context(spec, cfg, hw), "study": args.name, "rows": rows, **extra}
    _emit(args, result, _table(rows) + ("\n" + json.dumps(extra) if extra else ""))
    return 0


def cmd_casestudy(args: argparse.Namespace) -> int:
    from kvasir.plan.casestudy import write_case_study

    path = write_case_study(args.output, args.plot_dir)
    _emit(args, {"output": path, "plots": args.plot_dir}, f"wrote {path}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from kvasir.plan.calibrate import calibrate
    from kvasir.plan.hardware import get_hardware, load_calibrated, save_calibrated
    from kvasir.plan.model_spec import load_model_spec
    from kvasir.plan.validate import validate
    from kvasir.plan.verify import VerifySettings, verify

    spec = load_model_spec(args.model)
    calibrated = args.hardware in (None, "this-machine", "calibrated", "local")
    if calibrated:
        hw = None if args.recalibrate else load_calibrated(args.calibration_file)
        if hw is not None and (
            (args.threads is not None and hw.extra.get("threads") != args.threads)
            or hw.extra.get("profiled_model") != spec.name
        ):
            hw = None  # calibrated with another thread count, or for another model
        if hw is None:
            logger.info("calibrating this machine first")
            hw = calibrate(threads=args.threads, model=spec)
            save_calibrated(hw, args.calibration_file)
    else:
        hw = get_hardware(args.hardware, args.calibration_file)
    cfg = plan_config(args)
    validate(spec, cfg, hw)
    settings = VerifySettings(
        latency_input_len=args.latency_input_len,
        latency_output_len=args.latency_output_len,
        latency_num_iters=args.latency_num_iters,
        num_prompts=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        prefill_len=args.prefill_len,
    )

    def again():  # noqa: ANN202
        logger.info("calibrating again")
        return calibrate(threads=args.threads, model=spec)

    rows = verify(
        args.model,
        spec,
        cfg,
        hw,
        settings,
        dummy=args.load_format == "dummy",
        threads=args.threads,
        recalibrate=again if calibrated and args.calibrate_each else None,
    )
    result = {**_context(spec, cfg, hw), "results": rows}
    _emit(args, result, f"{spec.name} on {hw.description}\n"
          + _table(rows, ["metric", "predicted", "measured", "unit", "error"]))  # fmt: skip
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from kvasir.plan.calibrate import calibrate
    from kvasir.plan.hardware import save_calibrated
    from kvasir.plan.model_spec import load_model_spec

    spec = load_model_spec(args.model) if args.model else None
    hw = calibrate(threads=args.threads, model=spec)
    path = save_calibrated(hw, args.calibration_file)
    d = hw.as_dict()
    _emit(args, {"calibration_file": path, **d},
          f"calibrated {hw.description} -> {path}\n" + _table([{"field": k, "value": v} for k, v in d.items()]))  # fmt: skip
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from kvasir.plan.hardware import CATALOGUE, load_calibrated

    hws = list(CATALOGUE.values())
    cal = load_calibrated(args.calibration_file)
    if cal is not None:
        hws.append(cal)
    rows = [
        {
            "name": h.name,
            "kind": h.kind,
            "bf16_tflops": h.peak_tflops.get("bf16", h.peak_tflops.get("fp32")),
            "fp8_tflops": h.peak_tflops.get("fp8"),
            "memory_gib": h.memory_gib,
            "bandwidth_gbs": h.memory_bandwidth_gbs,
            "link_gbs": h.link_gbs,
            "tdp_w": h.tdp_w,
            "price_usd": h.price_usd,
        }
        for h in hws
    ]
    _emit(args, {"hardware": [h.as_dict() for h in hws]}, _table(rows))
    return 0


_COMMANDS = {
    "roofline": cmd_roofline,
    "latency": cmd_latency,
    "throughput": cmd_throughput,
    "capacity": cmd_capacity,
    "tco": cmd_tco,
    "compare": cmd_compare,
    "study": cmd_study,
    "casestudy": cmd_casestudy,
    "verify": cmd_verify,
}


def run(args: argparse.Namespace) -> int:
    """Run the subcommand of ``args`` (or ``--calibrate`` / ``--list-hardware``)."""
    if args.plan_command is None:
        return cmd_calibrate(args) if args.calibrate else cmd_list(args)
    return _COMMANDS[args.plan_command](args)
