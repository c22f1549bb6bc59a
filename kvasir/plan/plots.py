"""Figures (matplotlib, imported only when a figure is asked for): the roofline with each
operator of a step placed on it, throughput and TPOT against batch, cost per million
tokens against utilisation."""

from __future__ import annotations

from typing import Any

from kvasir.plan.config import PlanConfig
from kvasir.plan.efficiency import Efficiency
from kvasir.plan.hardware import Hardware
from kvasir.plan.perf import StepTime


def _plt() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ValueError("--plot needs matplotlib: pip install matplotlib") from e
    return plt


def roofline_plot(
    st: StepTime, hw: Hardware, cfg: PlanConfig, eff: Efficiency, path: str, title: str = ""
) -> None:
    """Log-log attainable FLOP/s against operational intensity: the datasheet roofline,
    kvasir's (efficiency-scaled) roofline, and each operator at (FLOPs/byte, FLOP/s it
    attains in the model)."""
    plt = _plt()
    peak = hw.peak(cfg.gemm_dtype(hw.kind))
    bw = hw.memory_bandwidth_gbs * 1e9
    xs = [2.0**i for i in range(-4, 16)]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.loglog(xs, [min(peak, bw * x) for x in xs], "k-", label=f"{hw.name} datasheet")
    kp, kb = peak * eff.gemm_compute, bw * eff.gemm_memory
    ax.loglog(xs, [min(kp, kb * x) for x in xs], "k--", label="kvasir (efficiency factors)")
    markers = {"gemm": "o", "attention": "s", "elementwise": "^", "ssm": "D", "sampler": "v"}
    for t in st.ops:
        op = t.op
        if op.kind == "comm" or op.bytes == 0 or op.flops == 0 or t.seconds == 0:
            continue
        ax.scatter(op.intensity, op.flops / t.seconds, marker=markers.get(op.kind, "x"), s=40)
        ax.annotate(op.name, (op.intensity, op.flops / t.seconds), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")  # fmt: skip
    ax.set_xlabel("operational intensity (FLOP/byte)")
    ax.set_ylabel("attained FLOP/s")
    ax.set_title(title or hw.name)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def batch_plot(rows: list[dict], path: str, tpot_slo_ms: float | None, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    b = [r["batch"] for r in rows]
    ax.semilogx(b, [r["tok_s"] for r in rows], "o-", label="decode tok/s")
    ax.set_xlabel("decode batch")
    ax.set_ylabel("tokens/s")
    ax2 = ax.twinx()
    ax2.semilogx(b, [r["tpot_ms"] for r in rows], "s--", color="tab:red", label="TPOT (ms)")
    if tpot_slo_ms:
        ax2.axhline(tpot_slo_ms, color="tab:red", alpha=0.4)
    ax2.set_ylabel("TPOT (ms)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def lines_plot(
    series: dict[str, tuple[list[float], list[float]]], path: str, xlabel: str, ylabel: str,
    title: str, logy: bool = False,
) -> None:  # fmt: skip
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (x, y) in series.items():
        ax.plot(x, y, "o-", label=label)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bar_plot(labels: list[str], values: list[float], path: str, ylabel: str, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.bar(labels, values)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
