"""``kvasir plan verify``: run ``kvasir bench latency`` and ``kvasir bench throughput``
for a configuration on this machine and put the model's predictions beside them.

The benchmarks run as subprocesses of the ``kvasir`` CLI (a fresh process each, as an
operator would run them); their JSON summaries and the engine's start-up line (KV
blocks) are read back. Predictions use the calibrated entry of this machine unless
another ``--hardware`` is named.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from kvasir.plan.config import PlanConfig
from kvasir.plan.hardware import Hardware
from kvasir.plan.memory import capacity, resolve_max_model_len
from kvasir.plan.model_spec import ModelSpec
from kvasir.plan.perf import predict_latency, prefill_time
from kvasir.plan.workload import Request, simulate

logger = logging.getLogger(__name__)
_KV_LINE = re.compile(r"KV cache (\d+) blocks x (\d+) tokens")


@dataclass(frozen=True)
class VerifySettings:
    """The benchmark shapes (``kvasir bench`` flags)."""

    latency_input_len: int = 64
    latency_output_len: int = 32
    latency_num_iters: int = 3
    num_prompts: int = 32
    input_len: str = "16:128"
    output_len: str = "16:64"
    workload_seed: int = 0
    prefill_len: int = 0  # also time one prompt of this many tokens (bench --prefill-len)


def _engine_flags(model: str | None, cfg: PlanConfig, dummy: bool) -> list[str]:
    flags = []
    if model is not None and model != "default":
        flags += ["--model", model]
    if dummy:
        flags += ["--load-format", "dummy"]
    if cfg.max_model_len is not None:
        flags += ["--max-model-len", str(cfg.max_model_len)]
    if cfg.kv_cache_gb is not None:
        flags += ["--kv-cache-gb", str(cfg.kv_cache_gb)]
    flags += [
        "--block-size",
        str(cfg.block_size),
        "--max-num-seqs",
        str(cfg.max_num_seqs),
        "--max-num-batched-tokens",
        str(cfg.max_num_batched_tokens),
        "--tensor-parallel-size",
        str(cfg.tensor_parallel_size),
        "--pipeline-parallel-size",
        str(cfg.pipeline_parallel_size),
    ]
    if cfg.dtype != "auto":
        flags += ["--dtype", cfg.dtype]
    return flags


def _run_bench(args: list[str], threads: int | None = None) -> tuple[dict, int | None]:
    """Run ``kvasir bench ...``; (its JSON summary, the usable KV blocks it logged).
    ``threads``: OMP_NUM_THREADS of the benchmark process (None: inherited)."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.json")
        cmd = [sys.executable, "-m", "kvasir.entrypoints.cli", "bench", *args, "--output-json", out]
        logger.info("running: %s", " ".join(cmd[2:]))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout)[-2000:]
            raise RuntimeError(f"`kvasir bench {args[0]}` failed ({proc.returncode}):\n{tail}")
        with open(out, encoding="utf-8") as f:
            result = json.load(f)
    m = _KV_LINE.search(proc.stderr)
    return result, int(m.group(1)) if m else None


def workload_lengths(settings: VerifySettings, vocab_size: int) -> list[tuple[int, int]]:
    """The (prompt, output) lengths ``kvasir bench throughput`` draws for these flags
    (its own generator, read-only)."""
    from kvasir.bench.throughput import make_workload

    work = make_workload(
        settings.num_prompts,
        settings.input_len,
        settings.output_len,
        vocab_size,
        settings.workload_seed,
    )
    return [(len(p), o) for p, o in work]


def predict_latency_metrics(
    spec: ModelSpec, cfg: PlanConfig, hw: Hardware, settings: VerifySettings
) -> dict[str, tuple[float, str]]:
    """metric -> (predicted value, unit) for what ``kvasir bench latency`` measures."""
    cap = capacity(spec, cfg, hw)
    lat = predict_latency(spec, cfg, hw, settings.latency_input_len, settings.latency_output_len)
    out = {
        "decode_tok_s_batch1": (lat.decode_tok_s, "tok/s"),
        "ttft_ms_batch1": (lat.ttft_s * 1e3, "ms"),
        "kv_usable_blocks": (float(cap.usable_blocks), "blocks"),
    }
    if settings.prefill_len:
        # the bench clamps the prompt to max_model_len - 1 (its one new token must fit)
        n = min(settings.prefill_len, resolve_max_model_len(spec, cfg) - 1)
        out["prefill_s"] = (prefill_time(spec, cfg, hw, n), f"s ({n}-token prompt)")
    return out


def predict_throughput_metrics(
    spec: ModelSpec, cfg: PlanConfig, hw: Hardware, settings: VerifySettings
) -> dict[str, tuple[float, str]]:
    """metric -> (predicted value, unit) for ``kvasir bench throughput``: its own
    requests through the scheduler model."""
    cap = capacity(spec, cfg, hw)
    reqs = [Request(0.0, p, o) for p, o in workload_lengths(settings, spec.vocab_size)]
    sim = simulate(spec, cfg, hw, reqs, cap.num_blocks or 10**9)
    return {f"throughput_{settings.num_prompts}_requests": (sim.output_tok_s, "output tok/s")}


def verify(
    model: str | None,
    spec: ModelSpec,
    cfg: PlanConfig,
    hw: Hardware,
    settings: VerifySettings,
    dummy: bool = False,
    threads: int | None = None,
    recalibrate: Callable[[], Hardware] | None = None,
) -> list[dict]:
    """Predicted vs measured, one row per metric: error = predicted / measured - 1.
    ``recalibrate``: on a machine shared with other work, whose load drifts within
    minutes, measure it again after each benchmark; each benchmark is then predicted
    for the mean of the calibrations before and after it (``hw`` is the one before the
    latency benchmark)."""
    from kvasir.plan.calibrate import mean_calibration

    flags = _engine_flags(model, cfg, dummy)
    lat_args = [
        "latency",
        *flags,
        "--input-len",
        str(settings.latency_input_len),
        "--output-len",
        str(settings.latency_output_len),
        "--num-iters",
        str(settings.latency_num_iters),
    ]
    if settings.prefill_len:
        lat_args += ["--prefill-len", str(settings.prefill_len)]
    lat, blocks = _run_bench(lat_args, threads)
    between = recalibrate() if recalibrate is not None else hw
    pred = predict_latency_metrics(spec, cfg, mean_calibration(hw, between), settings)
    thr, _ = _run_bench(
        [
            "throughput",
            *flags,
            "--num-prompts",
            str(settings.num_prompts),
            "--input-len",
            settings.input_len,
            "--output-len",
            settings.output_len,
            "--workload-seed",
            str(settings.workload_seed),
        ],
        threads,
    )
    after = recalibrate() if recalibrate is not None else between
    pred.update(predict_throughput_metrics(spec, cfg, mean_calibration(between, after), settings))
    measured = {
        "decode_tok_s_batch1": lat["decode_tok_s"],
        "ttft_ms_batch1": lat["ttft_ms"],
        "prefill_s": lat.get("prefill_s"),
        f"throughput_{settings.num_prompts}_requests": thr["output_tok_s"],
        "kv_usable_blocks": float(blocks) if blocks is not None else None,
    }
    rows = []
    for metric, (p, unit) in pred.items():
        m = measured.get(metric)
        rows.append(
            {
                "metric": metric,
                "predicted": round(p, 4),
                "measured": m,
                "unit": unit,
                "error": round(p / m - 1, 4) if m else None,
            }
        )
    rows.append(
        {
            "metric": "bench_copy_bandwidth_gbs",
            "predicted": hw.extra.get("copy_bandwidth_gbs"),
            "measured": thr.get("copy_bandwidth_gbs"),
            "unit": "GB/s (calibration vs the bench's own ceiling; context, not a prediction)",
            "error": None,
        }
    )
    return rows
