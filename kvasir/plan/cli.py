"""``kvasir plan``'s parser: roofline | latency | throughput | capacity | tco | compare |
study | casestudy | verify, and ``--calibrate`` / ``--list-hardware``; the commands
themselves are in ``kvasir/plan/commands.py``.

Tables go to stdout by default; ``--json`` prints one JSON object as the last (only)
line instead; ``--plot out.png`` writes the command's figure (matplotlib).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from typing import Any

logger = logging.getLogger(__name__)

SUBCOMMANDS = (
    "roofline",
    "latency",
    "throughput",
    "capacity",
    "tco",
    "compare",
    "study",
    "casestudy",
    "verify",
)


def add_plan_parser(sub: Any) -> None:
    """Register ``kvasir plan`` on the top-level subparsers ``sub``."""
    p = sub.add_parser("plan", help="predict latency, throughput, memory and cost (roofline model)")
    p.add_argument("--calibrate", action="store_true", help="measure this machine and add it")
    p.add_argument("--threads", type=int, default=None, help="CPU threads to calibrate with")
    p.add_argument(
        "--model",
        default=None,
        help="with --calibrate: also profile this model's projection shapes",
    )
    p.add_argument("--list-hardware", action="store_true", help="print the catalogue")
    p.add_argument("--calibration-file", default=None, help="where the calibration is kept")
    p.add_argument("--json", action="store_true", help="one JSON object on the last line")
    p.set_defaults(func=main, plan_command=None)
    psub = p.add_subparsers(dest="plan_command")
    for name in SUBCOMMANDS:
        sp = psub.add_parser(name, help=_HELP[name])
        _add_common(sp, verify=name == "verify")
        _EXTRA[name](sp)
        sp.set_defaults(func=main)


_HELP = {
    "roofline": "FLOPs, bytes and bound of every operator of one step",
    "latency": "TTFT, TPOT and tokens/s of a batch (kvasir bench latency's shape)",
    "throughput": "a workload through continuous batching; best batch under a TPOT SLO",
    "capacity": "weights, KV blocks (as the engine allocates them), concurrency",
    "tco": "cost per hour, per million tokens, per user; break-even points",
    "compare": "the same model and workload on several devices",
    "study": "block size, chunk size, KV growth, transformer vs SSM",
    "casestudy": "regenerate docs/tco-llama-3-70b.md",
    "verify": "run kvasir bench here and compare with the prediction",
}


def _add_common(p: argparse.ArgumentParser, verify: bool = False) -> None:
    g = p.add_argument_group("model and hardware")
    g.add_argument("--model", default=None, help="config name, HF dir/config.json or .gguf")
    g.add_argument(
        "--hardware",
        default=None,
        help="catalogue name (kvasir plan --list-hardware) or this-machine"
        + (" (default: this machine, calibrated)" if verify else " (default: h100-sxm)"),
    )
    # SUPPRESS: given before the subcommand (``kvasir plan --json latency``) it stays.
    g.add_argument("--calibration-file", default=argparse.SUPPRESS)
    g.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    g.add_argument("--plot", default=None, metavar="OUT.png")
    c = p.add_argument_group("deployment (the engine's flags)")
    c.add_argument("--tensor-parallel-size", "--tp", "-tp", type=int, default=1)
    c.add_argument("--pipeline-parallel-size", "--pp", "-pp", type=int, default=1)
    c.add_argument("--dtype", default="auto")
    c.add_argument("--quantization", "-q", default="none")
    c.add_argument("--kv-cache-dtype", default="auto")
    c.add_argument("--kv-cache-gb", type=float, default=None)
    c.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    c.add_argument("--block-size", type=int, default=16)
    c.add_argument("--max-num-seqs", type=int, default=256)
    c.add_argument("--max-num-batched-tokens", type=int, default=2048)
    c.add_argument("--max-model-len", type=int, default=None)
    c.add_argument("--no-enable-chunked-prefill", action="store_true")
    c.add_argument("--allreduce", default="auto", choices=["auto", "ring", "tree"])
    c.add_argument("--num-speculative-tokens", type=int, default=0)
    c.add_argument("--acceptance-rate", type=float, default=0.7)
    c.add_argument("--draft-model", default=None)


def _add_roofline(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=1, help="decode rows")
    p.add_argument("--context-len", type=int, default=1024, help="decode context length")
    p.add_argument("--prompt-len", type=int, default=0, help="also a prompt chunk of this length")


def _add_latency(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=1)


def _add_workload(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", default="100:1024", help="N or MIN:MAX (uniform)")
    p.add_argument("--output-len", default="100:1024", help="N or MIN:MAX (uniform)")
    p.add_argument("--request-rate", type=float, default=math.inf, help="req/s, Poisson")
    p.add_argument("--prefix-hit-rate", type=float, default=0.0)
    p.add_argument("--workload-seed", type=int, default=0)
    p.add_argument("--tpot-slo-ms", type=float, default=None, help="also the best batch under it")


def _add_capacity(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seq-len", type=int, default=None, help="also the batch of this length")


def _add_tco(p: argparse.ArgumentParser) -> None:
    _add_workload(p)
    p.add_argument("--utilization", type=float, default=0.6)
    p.add_argument("--num-accelerators", type=int, default=None, help="default: tp x pp")
    p.add_argument("--accelerator-price", type=float, default=None)
    p.add_argument("--depreciation-years", type=float, default=None)
    p.add_argument("--usd-per-kwh", type=float, default=None)
    p.add_argument("--pue", type=float, default=None)
    p.add_argument("--colocation-usd-per-kw-month", type=float, default=None)
    p.add_argument("--cloud-on-demand", type=float, default=None, help="$/accelerator-hour")
    p.add_argument("--cloud-reserved", type=float, default=None, help="$/accelerator-hour")
    p.add_argument("--tokens-per-user-per-day", type=float, default=20_000)


def _add_compare(p: argparse.ArgumentParser) -> None:
    _add_tco(p)
    p.add_argument("--hardware-list", default="h100-sxm,h200,b200,a100-80gb,l40s,mi300x")


def _add_study(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=["block-size", "chunk-size", "kv-memory", "ssm", "batch"])
    p.add_argument("--tpot-slo-ms", type=float, default=50.0)
    p.add_argument("--context-len", type=int, default=1024)
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--num-decodes", type=int, default=32)


def _add_casestudy(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", default="docs/tco-llama-3-70b.md")
    p.add_argument("--plot-dir", default=None, help="also write the figures here")


def _add_verify(p: argparse.ArgumentParser) -> None:
    from kvasir.plan.verify import VerifySettings

    d = VerifySettings()
    p.add_argument("--latency-input-len", type=int, default=d.latency_input_len)
    p.add_argument("--latency-output-len", type=int, default=d.latency_output_len)
    p.add_argument("--latency-num-iters", type=int, default=d.latency_num_iters)
    p.add_argument("--num-prompts", type=int, default=d.num_prompts)
    p.add_argument("--input-len", default=d.input_len)
    p.add_argument("--output-len", default=d.output_len)
    p.add_argument("--recalibrate", action="store_true", help="calibrate even if calibrated")
    p.add_argument(
        "--calibrate-each",
        action="store_true",
        help="calibrate again after each benchmark and predict each for the mean of the "
        "calibrations around it (a machine shared with other work)",
    )
    p.add_argument("--prefill-len", type=int, default=0, help="also time one long prompt")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for the calibration and the benchmarks (OMP_NUM_THREADS); one "
        "thread is steadier on a machine shared with other work",
    )
    p.add_argument("--load-format", default="auto", help="dummy: random weights of --model")


_EXTRA = {
    "roofline": _add_roofline,
    "latency": _add_latency,
    "throughput": _add_workload,
    "capacity": _add_capacity,
    "tco": _add_tco,
    "compare": _add_compare,
    "study": _add_study,
    "casestudy": _add_casestudy,
    "verify": _add_verify,
}


def main(args: argparse.Namespace) -> int:
    from kvasir.plan.commands import run

    if args.plan_command is None and not (args.calibrate or args.list_hardware):
        print(
            "kvasir plan: give a subcommand (" + ", ".join(SUBCOMMANDS) + "), --calibrate "
            "or --list-hardware",
            file=sys.stderr,
        )
        return 2
    return run(args)
