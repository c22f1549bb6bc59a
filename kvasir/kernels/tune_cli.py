"""``kvasir tune``: search the Triton kernels' launch configs for one model's shapes on
this GPU and record the fastest correct one per shape (``kvasir.kernels.tuning``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def add_tune_parser(sub: argparse._SubParsersAction) -> None:
    from kvasir.kernels.tuning import registry

    p = sub.add_parser(
        "tune", help="tune the Triton kernels' launch configs for a model on this GPU",
        description=__doc__,
    )  # fmt: skip
    p.add_argument("--model", default="llama-3-8b", help="built-in config name, HF dir or GGUF")
    p.add_argument("--kernels", nargs="+", default=sorted(registry()), choices=sorted(registry()))
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument(
        "--weight-bytes", type=int, nargs="+", default=[2, 1], choices=[1, 2],
        help="GEMV weights: 2 = bf16, 1 = FP8 with row scales",
    )  # fmt: skip
    p.add_argument(
        "--m-buckets",
        type=int,
        nargs="+",
        default=None,
        help="quant_matmul row buckets to tune (default: all of M_BUCKETS)",
    )
    p.add_argument(
        "--quant-weights",
        nargs="+",
        default=["fp8", "int8"],
        choices=["fp8", "int8"],
        help="quant_matmul weight types to tune",
    )
    p.add_argument("--max-configs", type=int, default=None, help="at most this many per shape")
    p.add_argument(
        "--rotate-mb", type=float, default=512.0,
        help="time over this many MB of input copies (past the L2 cache)",
    )  # fmt: skip
    p.add_argument(
        "--only-missing", action="store_true", help="skip the shapes the table (--out) already has"
    )
    p.add_argument("--out", default=None, help="table file (default: the user's cache dir)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from kvasir.kernels import quant_gemm, tuning
    from kvasir.plan.model_spec import load_model_spec

    if not torch.cuda.is_available():
        raise ValueError(
            "kvasir tune needs a CUDA GPU: launch configs only matter for compiled kernels "
            "(on the CPU they run under Triton's interpreter)"
        )
    if args.tensor_parallel_size < 1:
        raise ValueError("--tensor-parallel-size must be >= 1")
    spec = load_model_spec(args.model)
    if spec.num_heads <= 0 or spec.intermediate_size <= 0:
        raise ValueError(f"--model {args.model!r}: tune needs attention layers and a dense MLP")
    device = torch.device("cuda", torch.cuda.current_device())
    name = torch.cuda.get_device_name(device)
    out = Path(args.out) if args.out else tuning.USER_DIR / tuning.device_file_name(name)
    table = tuning.ConfigTable.load(out) if out.is_file() else tuning.ConfigTable(name)
    table.device = name
    jobs = tuning.model_jobs(
        spec.hidden_size, spec.intermediate_size, spec.q_size, spec.kv_size, args.kernels,
        weight_bytes=args.weight_bytes, m_buckets=args.m_buckets or quant_gemm.M_BUCKETS,
        tp=args.tensor_parallel_size, quant_weights=args.quant_weights, vocab=spec.vocab_size,
    )  # fmt: skip
    if args.only_missing:
        jobs = [(k, s) for k, s in jobs if table.lookup(k.name, k.key(s)) is None]
    tuning.set_table(tuning.ConfigTable(name))  # search against the defaults, not a table

    def show(r: tuning.TuneResult) -> None:
        table.save(out)  # after every shape: a run cut short keeps what it measured
        if not args.json:
            gbs = r.bytes_moved / r.best_s / 1e9
            print(
                f"{r.kernel:13s} {r.key:44s} default {str(r.default):18s} "
                f"{r.default_s * 1e6:8.1f} us  best {str(r.best):18s} {r.best_s * 1e6:8.1f} us "
                f"x{r.speedup:.3f}  {gbs:7.0f} GB/s  ({len(r.rejected)} rejected)",
                flush=True,
            )

    try:
        results = tuning.tune(
            jobs, device, tuning.cuda_timer(), table, args.max_configs,
            int(args.rotate_mb * 1e6), show,
        )  # fmt: skip
    finally:
        tuning.set_table(None)
    table.save(out)
    summary = tuning.summarize(results) | {"device": name, "table": str(out)}
    if args.json:
        rows = [
            {"kernel": r.kernel, "key": r.key, "default": list(r.default),
             "default_us": r.default_s * 1e6, "best": list(r.best), "best_us": r.best_s * 1e6,
             "speedup": r.speedup, "bytes": r.bytes_moved, "rejected": len(r.rejected)}
            for r in results
        ]  # fmt: skip
        json.dump({"summary": summary, "results": rows}, sys.stdout, indent=1)
        print()
    else:
        print(json.dumps(summary))
    return 0
