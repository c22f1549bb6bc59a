"""Kernel benchmarks on one CUDA GPU, against ceilings measured on the same card.

Ceilings first: device-to-device copy bandwidth (bytes read + written) and a bf16
8192^3 matmul through torch. Then each kernel, timed with ``triton.testing.do_bench``
(median, events):
  decode attention   32 seqs x 8k context, bf16, 32 q / 8 kv heads, head_dim 128,
                     page 16, scattered pages -> fraction of copy bandwidth
  prefill attention  one 8k-token causal prompt, same heads -> TFLOP/s
  rmsnorm / silu     fused add+RMSNorm, RMSNorm, SiLU-and-mul -> fraction of copy bw
  cache write        reshape_and_cache and fused RoPE + cache -> fraction of copy bw
``--sweep`` also times tile-shape / split-count variants. Prints a table, then a
one-line JSON summary last.

    PYTHONPATH=. python benchmarks/bench_kernels.py [--sweep] [--out results.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from collections.abc import Callable

import torch
import triton
from triton.testing import do_bench

from kvasir.kernels.activation import silu_and_mul
from kvasir.kernels.decode_attention import (
    DecodeConfig,
    choose_num_splits,
    paged_decode_attention,
)
from kvasir.kernels.kv_cache import reshape_and_cache, rotary_embedding_and_cache
from kvasir.kernels.prefill_attention import PrefillConfig, paged_prefill_attention
from kvasir.kernels.rmsnorm import fused_add_rms_norm, rms_norm


class Report:
    """Rows of the final table, printed as they come too."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, str]] = []  # (name, ms, metric)

    def __call__(self, name: str, ms: float, metric: str) -> None:
        self.rows.append((name, ms, metric))
        print(f"{name:<48} {ms * 1e3:>10.1f} us  {metric}", flush=True)


def _ms(fn: Callable[[], object]) -> float:
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _try(what: str, fn: Callable[[], object]) -> None:
    """Run one optional variant; a failure (e.g. out of shared memory) is reported, and
    the remaining measurements still run."""
    try:
        fn()
    except Exception as e:
        print(f"  {what}: failed: {type(e).__name__}: {str(e)[:160]}", flush=True)


def ceilings(_row: Report) -> tuple[float, float]:
    n = 1 << 29  # 1 GiB of bf16 per buffer: far past L2
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = _ms(lambda: dst.copy_(src))
    copy_gbps = 2 * src.numel() * 2 / ms / 1e6
    _row("copy 1 GiB (read + write)", ms, f"{copy_gbps:.0f} GB/s")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = _ms(lambda: a @ b)
    tflops = 2 * 8192**3 / ms / 1e9
    _row("matmul bf16 8192^3 (torch)", ms, f"{tflops:.0f} TFLOP/s")
    return copy_gbps, tflops


def _paged_cache(num_seqs: int, ctx: int, num_kv_heads: int, head_dim: int, page: int):
    num_blocks = num_seqs * ctx // page
    kv_cache = torch.randn(
        2, num_blocks, page, num_kv_heads, head_dim, device="cuda", dtype=torch.bfloat16
    )
    # Pages scattered at random, as after a while of serving.
    block_table = torch.randperm(num_blocks, device="cuda").view(num_seqs, -1).int()
    return kv_cache, block_table


def bench_decode(_row: Report, copy_gbps: float, sweep: bool) -> float:
    seqs, ctx, heads, kv_heads, dim, page = 32, 8192, 32, 8, 128, 16
    kv_cache, block_table = _paged_cache(seqs, ctx, kv_heads, dim, page)
    seq_lens = torch.full((seqs,), ctx, device="cuda", dtype=torch.int32)
    q = torch.randn(seqs, heads, dim, device="cuda", dtype=torch.bfloat16)
    nbytes = kv_cache.numel() * 2 + 2 * q.numel() * 2
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    auto = choose_num_splits(seqs, kv_heads, sms)
    ref = paged_decode_attention(q, kv_cache, block_table, seq_lens, dim**-0.5)

    def run(splits: int | None, cfg: DecodeConfig | None) -> float:
        fn = lambda: paged_decode_attention(  # noqa: E731
            q, kv_cache, block_table, seq_lens, dim**-0.5, num_splits=splits, config=cfg,
        )  # fmt: skip
        err = float((fn().float() - ref.float()).norm() / ref.float().norm())
        assert err < 1e-2, f"decode variant {splits} {cfg} disagrees: {err}"
        return _ms(fn)

    best = math.inf
    ms = run(None, None)
    _row(f"decode 32x8k GQA4 d128 (splits={auto}, default)", ms,
         f"{nbytes / ms / 1e6:.0f} GB/s = {nbytes / ms / 1e6 / copy_gbps:.1%} of copy")  # fmt: skip
    ms2 = run(None, None)
    _row("decode default, again (spread)", ms2, f"{nbytes / ms2 / 1e6 / copy_gbps:.1%} of copy")
    best = min(ms, ms2)

    def variant(splits: int | None, cfg: DecodeConfig | None) -> None:
        ms = run(splits, cfg)
        name = "default" if cfg is None else f"n{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}"
        _row(f"  decode {name} splits={splits or auto}", ms,
             f"{nbytes / ms / 1e6 / copy_gbps:.1%} of copy")  # fmt: skip

    if sweep:
        for splits in (1, 2, 4, 6, 8):
            _try(f"decode splits={splits}", lambda s=splits: variant(s, None))
        for cfg in (
            DecodeConfig(64, 4, 2), DecodeConfig(64, 4, 5), DecodeConfig(32, 4, 5),
            DecodeConfig(64, 4, 3), DecodeConfig(128, 8, 3), DecodeConfig(64, 8, 3),
            DecodeConfig(32, 2, 5), DecodeConfig(128, 4, 5), DecodeConfig(64, 2, 3),
        ):  # fmt: skip
            for splits in (None, 6):
                _try(f"decode {cfg} {splits}", lambda s=splits, c=cfg: variant(s, c))
    # Other batch shapes at the default config (informative; all far past L2).
    for n_seqs, n_ctx in ((4, 8192), (128, 2048)):
        kv2, bt2 = _paged_cache(n_seqs, n_ctx, kv_heads, dim, page)
        sl2 = torch.full((n_seqs,), n_ctx, device="cuda", dtype=torch.int32)
        q2 = torch.randn(n_seqs, heads, dim, device="cuda", dtype=torch.bfloat16)
        ms = _ms(lambda: paged_decode_attention(q2, kv2, bt2, sl2, dim**-0.5))  # noqa: B023
        nb = kv2.numel() * 2
        _row(f"decode {n_seqs}x{n_ctx}", ms, f"{nb / ms / 1e6 / copy_gbps:.1%} of copy")
    return nbytes / best / 1e6 / copy_gbps


def bench_prefill(_row: Report, mm_tflops: float, sweep: bool) -> float:
    s, heads, kv_heads, dim, page = 8192, 32, 8, 128, 16
    kv_cache, block_table = _paged_cache(1, s, kv_heads, dim, page)
    q = torch.randn(s, heads, dim, device="cuda", dtype=torch.bfloat16)
    qsl = torch.tensor([0, s], device="cuda", dtype=torch.int32)
    seq_lens = torch.tensor([s], device="cuda", dtype=torch.int32)
    flops = 4 * dim * heads * s * (s + 1) / 2  # QK^T and PV over the causal half
    ref = paged_prefill_attention(q, kv_cache, qsl, seq_lens, block_table, dim**-0.5, s)

    def run(cfg: PrefillConfig | None) -> float:
        fn = lambda: paged_prefill_attention(  # noqa: E731
            q, kv_cache, qsl, seq_lens, block_table, dim**-0.5, s, config=cfg
        )
        err = float((fn().float() - ref.float()).norm() / ref.float().norm())
        assert err < 1e-2, f"prefill variant {cfg} disagrees: {err}"
        return _ms(fn)

    ms = run(None)
    _row("prefill 8k causal GQA4 d128 (default)", ms,
         f"{flops / ms / 1e9:.0f} TFLOP/s = {flops / ms / 1e9 / mm_tflops:.1%} of matmul")  # fmt: skip
    ms2 = run(None)
    _row("prefill default, again (spread)", ms2, f"{flops / ms2 / 1e9:.0f} TFLOP/s")
    best = min(ms, ms2)

    def variant(cfg: PrefillConfig) -> None:
        ms = run(cfg)
        _row(f"  prefill m{cfg.block_m} n{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}",
             ms, f"{flops / ms / 1e9:.0f} TFLOP/s")  # fmt: skip

    if sweep:
        for cfg in (
            PrefillConfig(128, 64, 8, 3), PrefillConfig(128, 64, 8, 4),
            PrefillConfig(128, 64, 8, 2), PrefillConfig(64, 64, 4, 3),
            PrefillConfig(128, 128, 8, 2), PrefillConfig(64, 128, 4, 3),
            PrefillConfig(128, 32, 4, 3), PrefillConfig(64, 64, 4, 4),
        ):  # fmt: skip
            _try(f"prefill {cfg}", lambda c=cfg: variant(c))

    def sdpa() -> None:
        # Contiguous, non-paged attention through torch, for scale (FlashAttention-2).
        qt = q.view(1, s, heads, dim).transpose(1, 2)
        kt = torch.randn(1, kv_heads, s, dim, device="cuda", dtype=torch.bfloat16)
        vt = torch.randn_like(kt)
        f = torch.nn.functional.scaled_dot_product_attention
        ms = _ms(lambda: f(qt, kt, vt, is_causal=True, enable_gqa=True))
        _row("  torch sdpa causal (contiguous, for scale)", ms, f"{flops / ms / 1e9:.0f} TFLOP/s")

    _try("torch sdpa", sdpa)
    return flops / best / 1e9


def bench_elementwise(_row: Report, copy_gbps: float) -> dict[str, float]:
    res: dict[str, float] = {}
    t, hidden, inter = 16384, 8192, 14336
    x = torch.randn(t, hidden, device="cuda", dtype=torch.bfloat16)
    r = torch.randn_like(x)
    w = torch.randn(hidden, device="cuda", dtype=torch.bfloat16)
    nbytes = 4 * x.numel() * 2
    ms = _ms(lambda: fused_add_rms_norm(x, r, w, 1e-6))
    res["fused_add_rmsnorm_frac_copy"] = nbytes / ms / 1e6 / copy_gbps
    _row("fused add+rmsnorm 16k x 8192", ms, f"{res['fused_add_rmsnorm_frac_copy']:.1%} of copy")
    ms = _ms(lambda: rms_norm(x, w, 1e-6))
    res["rmsnorm_frac_copy"] = 2 * x.numel() * 2 / ms / 1e6 / copy_gbps
    _row("rmsnorm 16k x 8192", ms, f"{res['rmsnorm_frac_copy']:.1%} of copy")
    small = x[:64]
    ms = _ms(lambda: fused_add_rms_norm(small, r[:64], w, 1e-6))
    _row("fused add+rmsnorm 64 x 8192 (decode-sized)", ms, "latency")
    g = torch.randn(t // 2, 2 * inter, device="cuda", dtype=torch.bfloat16)
    ms = _ms(lambda: silu_and_mul(g))
    res["silu_and_mul_frac_copy"] = 1.5 * g.numel() * 2 / ms / 1e6 / copy_gbps
    _row("silu_and_mul 8k x 2*14336", ms, f"{res['silu_and_mul_frac_copy']:.1%} of copy")
    # Cache writes for 16k tokens, 32 q / 8 kv heads, d128, page 16.
    heads, kv_heads, dim, page = 32, 8, 128, 16
    qkv = torch.randn(t, (heads + 2 * kv_heads) * dim, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k, v = (z.view(t, -1, dim) for z in (q, k, v))
    cache = torch.empty(2, t // page, page, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    slots = torch.randperm(t, device="cuda")
    ms = _ms(lambda: reshape_and_cache(k, v, cache, slots))
    res["reshape_and_cache_frac_copy"] = 4 * k.numel() * 2 / ms / 1e6 / copy_gbps
    _row("reshape_and_cache 16k tok", ms, f"{res['reshape_and_cache_frac_copy']:.1%} of copy")
    inv = 1.0 / 500000.0 ** (torch.arange(0, dim, 2, device="cuda").float() / dim)
    ang = torch.arange(8192, device="cuda").float()[:, None] * inv[None, :]
    cos_sin = torch.cat((ang.cos(), ang.sin()), dim=-1)
    pos = torch.randint(0, 8192, (t,), device="cuda")
    ms = _ms(lambda: rotary_embedding_and_cache(pos, q, k, v, cos_sin, cache, slots))
    nbytes = (2 * q.numel() + 3 * k.numel() + 2 * v.numel()) * 2
    res["rope_and_cache_frac_copy"] = nbytes / ms / 1e6 / copy_gbps
    _row("rope+cache 16k tok (q,k in place)", ms, f"{res['rope_and_cache_frac_copy']:.1%} of copy")
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time tile variants")
    parser.add_argument("--out", default=None, help="write the JSON summary here too")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")
    props = torch.cuda.get_device_properties(0)
    device = f"{props.name} ({props.multi_processor_count} SMs)"
    print(f"device: {device}; torch {torch.__version__}; triton {triton.__version__}")
    report = Report()
    copy_gbps, mm_tflops = ceilings(report)
    decode_frac = bench_decode(report, copy_gbps, args.sweep)
    prefill_tflops = bench_prefill(report, mm_tflops, args.sweep)
    other: dict[str, float] = {}
    _try("elementwise", lambda: other.update(bench_elementwise(report, copy_gbps)))
    print("\n| kernel | time (us) | result |\n|---|---:|---|")
    for name, ms, metric in report.rows:
        print(f"| {name.strip()} | {ms * 1e3:.1f} | {metric} |")
    summary = {
        "device": device,
        "date": datetime.date.today().isoformat(),
        "triton": triton.__version__,
        "torch": torch.__version__,
        "copy_GBps": round(copy_gbps, 1),
        "matmul_bf16_TFLOPs": round(mm_tflops, 1),
        "decode_32x8k_frac_of_copy": round(decode_frac, 4),
        "prefill_8k_causal_TFLOPs": round(prefill_tflops, 1),
        **{k: round(v, 4) for k, v in other.items()},
    }
    line = json.dumps(summary)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
