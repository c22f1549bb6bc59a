"""GEMM and GEMV over 8-bit weights (FP8 E4M3 or INT8), each beside its plain-torch
reference that dequantises first.

Weights are ``[N, K]`` in ``float8_e4m3fn`` or ``int8`` with float32 scales, either
per output channel (``w_scale [N]``; a per-tensor scale is stored as N equal values) or
per 128 x 128 block (``w_scale [ceil(N / 128), ceil(K / 128)]``, DeepSeek / Qwen3 FP8).

* ``w8_gemv``: one row of activations (batch-1 decode) against 8-bit weights, the
  weights dequantised in the kernel (``W x`` streams 1 byte per weight instead of 2);
* ``quant_matmul``: ``[M, K] x [N, K]^T`` tiles, either weight-only (float activations,
  the weight tile converted in registers: the fallback on GPUs without FP8 units) or
  W8A8 (activations quantised per token, ``a_scale [M]``; per token and 128-column
  group, ``a_scale [M, ceil(K / 128)]``, with block weight scales): 8-bit dot products
  accumulated in int32 / float32 and scaled once per tile.

Block scales need ``BLOCK_K`` to divide 128 (each K tile sits in one scale group).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

QUANT_BLOCK = 128  # the block-scale granularity (rows and columns)


@triton.jit
def _w8_gemv_kernel(
    x_ptr,  # [K] float
    w_ptr,  # [N, K] fp8/int8, rows contiguous
    s_ptr,  # [N] (channel) or [cdiv(N, 128), cdiv(K, 128)] (block) float32
    bias_ptr,  # [N] (HAS_BIAS)
    out_ptr,  # [N]
    N,
    K,
    stride_wn,
    stride_sn,
    BLOCK_SCALES: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k0 = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + offs_k0
        mk = offs_k < K
        xk = tl.load(x_ptr + offs_k, mask=mk, other=0.0).to(tl.float32)
        w = tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None] & mk[None, :], other=0.0)
        prod = w.to(tl.float32) * xk[None, :]  # [BLOCK_N, BLOCK_K]
        if BLOCK_SCALES:
            # One scale per (row block, column block): this tile's column block is k0 // 128.
            s = tl.load(s_ptr + (offs_n // 128) * stride_sn + k0 // 128, mask=mask_n, other=0.0)
            prod = prod * s[:, None]
        acc += prod
    y = tl.sum(acc, axis=1)  # [BLOCK_N]
    if not BLOCK_SCALES:
        y = y * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=mask_n)


def w8_gemv(
    x: torch.Tensor,  # [1, K] float
    weight: torch.Tensor,  # [N, K] float8_e4m3fn / int8
    w_scale: torch.Tensor,  # [N] or [cdiv(N, 128), cdiv(K, 128)] float32
    bias: torch.Tensor | None = None,  # [N]
    block_n: int = 8,
    block_k: int = 128,
) -> torch.Tensor:  # [1, N], x's dtype
    """``(W * scale) x + bias`` for one row, W dequantised in the kernel."""
    n, k = weight.shape
    assert x.dim() == 2 and x.shape == (1, k) and x.stride(-1) == 1 and weight.stride(1) == 1
    block_scales = w_scale.dim() == 2
    if block_scales:
        assert QUANT_BLOCK % block_k == 0, "block scales need BLOCK_K to divide 128"
        assert w_scale.shape == (triton.cdiv(n, QUANT_BLOCK), triton.cdiv(k, QUANT_BLOCK))
    else:
        assert w_scale.shape == (n,)
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    _w8_gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, w_scale, bias if bias is not None else x, out, n, k,
        weight.stride(0), w_scale.stride(0) if block_scales else 0,
        BLOCK_SCALES=block_scales, HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    return out


@triton.jit
def _quant_matmul_kernel(
    a_ptr,  # [M, K] float (weight-only) or fp8/int8 (W8A8)
    w_ptr,  # [N, K] fp8/int8
    ws_ptr,  # [N] or [cdiv(N, 128), cdiv(K, 128)] float32
    as_ptr,  # [M] or [M, cdiv(K, 128)] float32 (A_QUANT)
    bias_ptr,  # [N] (HAS_BIAS)
    out_ptr,  # [M, N]
    M,
    N,
    K,
    stride_am,
    stride_wn,
    stride_om,
    stride_wsn,
    stride_asm,
    A_QUANT: tl.constexpr,  # 0: float A; 1: per-token scales; 2: per token and 128-group
    BLOCK_SCALES: tl.constexpr,
    INT_DOT: tl.constexpr,  # int8 x int8 -> int32
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k0 = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    w_rows = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + offs_k0
        mk = offs_k < K
        a = tl.load(a_rows + offs_k[None, :], mask=mask_m[:, None] & mk[None, :], other=0.0)
        w = tl.load(w_rows + offs_k[:, None], mask=mk[:, None] & mask_n[None, :], other=0.0)
        if A_QUANT == 0:
            # Weight-only: the 8-bit tile becomes the activation dtype (exact for
            # E4M3 and for int8 in bf16/fp16/fp32).
            part = tl.dot(a, w.to(a.dtype), out_dtype=tl.float32)  # [BLOCK_M, BLOCK_N]
        elif INT_DOT:
            part = tl.dot(a, w, out_dtype=tl.int32).to(tl.float32)
        else:
            part = tl.dot(a, w, out_dtype=tl.float32)
        if BLOCK_SCALES:
            kb = k0 // 128
            ws = tl.load(ws_ptr + (offs_n // 128) * stride_wsn + kb, mask=mask_n, other=0.0)
            part = part * ws[None, :]
            if A_QUANT == 2:
                sa = tl.load(as_ptr + offs_m * stride_asm + kb, mask=mask_m, other=0.0)
                part = part * sa[:, None]
        acc += part
    if not BLOCK_SCALES:
        acc = acc * tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    if A_QUANT == 1:
        acc = acc * tl.load(as_ptr + offs_m * stride_asm, mask=mask_m, other=0.0)[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def quant_matmul(
    a: torch.Tensor,  # [M, K]: float, or fp8/int8 with a_scale
    weight: torch.Tensor,  # [N, K] float8_e4m3fn / int8
    w_scale: torch.Tensor,  # [N] or [cdiv(N, 128), cdiv(K, 128)] float32
    a_scale: torch.Tensor | None = None,  # [M] or [M, cdiv(K, 128)] float32
    bias: torch.Tensor | None = None,  # [N]
    out_dtype: torch.dtype | None = None,
    config: tuple[int, int, int, int] | None = None,  # BLOCK_M, BLOCK_N, BLOCK_K, num_warps
) -> torch.Tensor:  # [M, N]
    """``dequant(a) @ dequant(W)^T + bias`` with the 8-bit tiles multiplied directly."""
    m, k = a.shape
    n = weight.shape[0]
    assert weight.shape[1] == k and a.stride(1) == 1 and weight.stride(1) == 1
    block_scales = w_scale.dim() == 2
    a_quant = 0
    if a_scale is not None:
        assert a.dtype == weight.dtype, "W8A8 needs activations in the weight's dtype"
        a_quant = 2 if a_scale.dim() == 2 else 1
        assert a_quant == 1 or block_scales, "per-group activation scales need block weights"
    if out_dtype is None:
        out_dtype = a.dtype if a_scale is None else torch.bfloat16
    if config is None:
        from kvasir.kernels.tuning import tuned_config

        key = quant_matmul_shape_key(m, n, k, a_quant, weight.dtype, block_scales)
        config = tuned_config("quant_matmul", key, a.device)
        if config is None:
            config = default_quant_matmul_config(m, block_scales)
    block_m, block_n, block_k, num_warps = config
    if block_scales:
        assert QUANT_BLOCK % block_k == 0, "block scales need BLOCK_K to divide 128"
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _quant_matmul_kernel[grid](
        a, weight, w_scale, a_scale if a_scale is not None else w_scale,
        bias if bias is not None else w_scale, out, m, n, k,
        a.stride(0), weight.stride(0), out.stride(0),
        w_scale.stride(0) if block_scales else 0,
        a_scale.stride(0) if a_scale is not None else 0,
        A_QUANT=a_quant, BLOCK_SCALES=block_scales, INT_DOT=weight.dtype == torch.int8,
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps,
    )  # fmt: skip
    return out


M_BUCKETS = (16, 64, 256, 1024)  # the row counts ``kvasir tune`` tunes quant_matmul at


def default_quant_matmul_config(m: int, block_scales: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) when no tuned config is recorded."""
    return (16 if m <= 16 else 64, 64, 64 if block_scales else 128, 4)


def quant_matmul_shape_key(
    m: int,
    n: int,
    k: int,
    a_quant: int,
    weight_dtype: torch.dtype,
    block_scales: bool = False,
) -> str:
    """The tuning table's key: ``m`` rounded up to a bucket of ``M_BUCKETS``."""
    bucket = next((b for b in M_BUCKETS if m <= b), M_BUCKETS[-1])
    w = "int8" if weight_dtype == torch.int8 else "fp8"
    return f"m<={bucket},n={n},k={k},a={a_quant},w={w},bs={int(block_scales)}"


def dequantize_weight(weight: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` float32: the 8-bit weight times its channel or block scales."""
    w = weight.float()
    if w_scale.dim() == 1:
        return w * w_scale.float()[:, None]
    n, k = w.shape
    s = w_scale.float().repeat_interleave(QUANT_BLOCK, 0).repeat_interleave(QUANT_BLOCK, 1)
    return w * s[:n, :k]


def dequantize_activation(a: torch.Tensor, a_scale: torch.Tensor) -> torch.Tensor:
    """``[M, K]`` float32 from per-token (``[M]``) or per-token-group (``[M, G]``) scales."""
    if a_scale.dim() == 1:
        return a.float() * a_scale.float()[:, None]
    s = a_scale.float().repeat_interleave(QUANT_BLOCK, 1)
    return a.float() * s[:, : a.shape[1]]


def quant_matmul_ref(
    a: torch.Tensor,
    weight: torch.Tensor,
    w_scale: torch.Tensor,
    a_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Dequantise both operands to float64, multiply, round once to ``out_dtype``."""
    x = a.double() if a_scale is None else dequantize_activation(a, a_scale).double()
    y = x @ dequantize_weight(weight, w_scale).double().T
    if bias is not None:
        y = y + bias.double()
    if out_dtype is None:
        out_dtype = a.dtype if a_scale is None else torch.bfloat16
    return y.to(out_dtype)


__all__ = [
    "M_BUCKETS",
    "QUANT_BLOCK",
    "default_quant_matmul_config",
    "quant_matmul_shape_key",
    "dequantize_activation",
    "dequantize_weight",
    "quant_matmul",
    "quant_matmul_ref",
    "w8_gemv",
]
