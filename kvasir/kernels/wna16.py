"""W4A16 / W8A16 GEMM and GEMV over integer weights packed into int32, with group
scales and zero points, each beside its plain-torch reference that dequantises first.

One layout for every integer-weight checkpoint format (GPTQ, AWQ; their loaders in
``kvasir.quantization`` convert to it once, at load):

* ``qweight [K / P, N] int32``, ``P = 32 / bits`` values per word, packed along the
  input dimension: value ``k`` of column ``n`` is bits ``[bits * (k % P), bits * (k % P +
  1))`` of ``qweight[k // P, n]`` (AutoGPTQ's ``qweight``, unsigned);
* ``scales [G, N]`` and ``zeros [G, N]`` float32, ``G = ceil(K / group_size)``: the
  weight is ``W[n, k] = (q[k, n] - zeros[g, n]) * scales[g, n]`` with ``g = k //
  group_size`` (input rows already sorted by group: act-order checkpoints permute the
  activations instead, ``kvasir.quantization.wna16_linear``), or ``g = g_idx[k]`` where
  the groups are not equally sized.

The kernels read each packed word once per tile row of ``P`` weights, shift out the
values in registers and multiply in float32; the GEMV has the unquantised GEMV's
SiLU-and-mul epilogue for a ``[gate; up]`` layer (``FUSE_SILU_MUL_OUT``; the columns
``[0, N)`` are gate, ``[N, 2N)`` up).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvasir.kernels.gemv import FUSE_NONE, FUSE_SILU_MUL_OUT

SUPPORTED_BITS = (4, 8)


@triton.jit
def _dequant_tile(
    q_ptr,  # [K / P, N] int32
    s_ptr,  # [G, N] float32
    z_ptr,  # [G, N] float32
    g_ptr,  # [K] int32 (HAS_GIDX)
    offs_k,  # [BLOCK_K]
    offs_n,  # [BLOCK_N]
    mask_k,
    mask_n,
    N,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    HAS_GIDX: tl.constexpr,
):
    """The ``[BLOCK_K, BLOCK_N]`` float32 weight tile ``W^T[offs_k, offs_n]``."""
    PACK: tl.constexpr = 32 // BITS
    mask = mask_k[:, None] & mask_n[None, :]
    words = tl.load(q_ptr + (offs_k // PACK)[:, None] * N + offs_n[None, :], mask=mask, other=0)
    shift = ((offs_k % PACK) * BITS)[:, None]
    q = (words >> shift) & ((1 << BITS) - 1)  # arithmetic shift: the mask drops sign bits
    if HAS_GIDX:
        g = tl.load(g_ptr + offs_k, mask=mask_k, other=0)
    else:
        g = offs_k // GROUP_SIZE
    sz = g[:, None] * N + offs_n[None, :]
    s = tl.load(s_ptr + sz, mask=mask, other=0.0)
    z = tl.load(z_ptr + sz, mask=mask, other=0.0)
    return (q.to(tl.float32) - z) * s


@triton.jit
def _wna16_matmul_kernel(
    x_ptr,  # [M, K]
    q_ptr,
    s_ptr,
    z_ptr,
    g_ptr,
    bias_ptr,  # [N] (HAS_BIAS)
    out_ptr,  # [M, N]
    M,
    N,
    K,
    stride_xm,
    stride_om,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    HAS_GIDX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = _dequant_tile(
            q_ptr, s_ptr, z_ptr, g_ptr, offs_k, offs_n, mask_k, mask_n, N,
            BITS, GROUP_SIZE, HAS_GIDX,
        )  # fmt: skip
        # The weight tile in the activation dtype (what a bf16 tensor core takes).
        acc += tl.dot(x, w.to(x.dtype), out_dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _wna16_gemv_kernel(
    x_ptr,  # [K]
    q_ptr,
    s_ptr,
    z_ptr,
    g_ptr,
    bias_ptr,  # [N_total] (HAS_BIAS)
    out_ptr,  # [N_out]
    N_OUT,
    N_TOTAL,
    K,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    HAS_GIDX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FUSION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N_OUT
    act_ty = out_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    if FUSION == 1:
        acc_u = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        xk = tl.load(x_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)[:, None]
        w = _dequant_tile(
            q_ptr, s_ptr, z_ptr, g_ptr, offs_k, offs_n, mask_k, mask_n, N_TOTAL,
            BITS, GROUP_SIZE, HAS_GIDX,
        )  # fmt: skip
        acc += w * xk
        if FUSION == 1:
            u = _dequant_tile(
                q_ptr, s_ptr, z_ptr, g_ptr, offs_k, N_OUT + offs_n, mask_k, mask_n, N_TOTAL,
                BITS, GROUP_SIZE, HAS_GIDX,
            )  # fmt: skip
            acc_u += u * xk
    y = tl.sum(acc, axis=0)  # [BLOCK_N]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if FUSION == 1:
        up = tl.sum(acc_u, axis=0)
        if HAS_BIAS:
            up += tl.load(bias_ptr + N_OUT + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        # Rounded as the unfused linear + silu_and_mul round (kvasir.kernels.gemv).
        g = y.to(act_ty).to(tl.float32)
        up = up.to(act_ty).to(tl.float32)
        y = g / (1.0 + tl.exp(-g)) * up
    tl.store(out_ptr + offs_n, y.to(act_ty), mask=mask_n)


def _check(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, k: int, bits: int
) -> int:
    assert bits in SUPPORTED_BITS, f"bits must be one of {SUPPORTED_BITS}, got {bits}"
    pack = 32 // bits
    n = qweight.shape[1]
    assert qweight.dtype == torch.int32 and qweight.shape[0] == triton.cdiv(k, pack)
    assert scales.shape == zeros.shape and scales.shape[1] == n
    assert qweight.is_contiguous() and scales.is_contiguous() and zeros.is_contiguous()
    return n


def wna16_matmul(
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,  # [K / P, N] int32
    scales: torch.Tensor,  # [G, N] float32
    zeros: torch.Tensor,  # [G, N] float32
    group_size: int,  # K for one group per column
    bits: int = 4,
    g_idx: torch.Tensor | None = None,  # [K] int32: group of each input row
    bias: torch.Tensor | None = None,  # [N]
    config: tuple[int, int, int, int] | None = None,  # BLOCK_M, BLOCK_N, BLOCK_K, warps
) -> torch.Tensor:  # [M, N], x's dtype
    """``x @ dequant(W)^T + bias``, the weight dequantised tile by tile in registers."""
    m, k = x.shape
    n = _check(qweight, scales, zeros, k, bits)
    assert x.stride(1) == 1
    if config is None:
        config = (16 if m <= 16 else 64, 64, 64, 4)
    block_m, block_n, block_k, num_warps = config
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _wna16_matmul_kernel[grid](
        x, qweight, scales, zeros, g_idx if g_idx is not None else qweight,
        bias if bias is not None else scales, out, m, n, k, x.stride(0), out.stride(0),
        BITS=bits, GROUP_SIZE=group_size, HAS_GIDX=g_idx is not None,
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps,
    )  # fmt: skip
    return out


def wna16_gemv(
    x: torch.Tensor,  # [1, K]
    qweight: torch.Tensor,  # [K / P, N] int32 ([K / P, 2N] for FUSE_SILU_MUL_OUT)
    scales: torch.Tensor,  # [G, N] float32
    zeros: torch.Tensor,  # [G, N] float32
    group_size: int,
    bits: int = 4,
    g_idx: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    fusion: int = FUSE_NONE,
    config: tuple[int, int, int] | None = None,  # BLOCK_N, BLOCK_K, warps
) -> torch.Tensor:  # [1, N], x's dtype
    """``dequant(W) x (+ bias)`` for one row, with the ``fusion`` of ``kvasir.kernels.gemv``."""
    assert x.dim() == 2 and x.shape[0] == 1 and x.stride(1) == 1
    k = x.shape[1]
    n_total = _check(qweight, scales, zeros, k, bits)
    assert fusion in (FUSE_NONE, FUSE_SILU_MUL_OUT), f"unknown fusion {fusion}"
    assert fusion == FUSE_NONE or n_total % 2 == 0, "[gate; up] needs an even column count"
    n_out = n_total // 2 if fusion == FUSE_SILU_MUL_OUT else n_total
    block_n, block_k, num_warps = config or (64, 64, 4)
    out = torch.empty((1, n_out), dtype=x.dtype, device=x.device)
    _wna16_gemv_kernel[(triton.cdiv(n_out, block_n),)](
        x, qweight, scales, zeros, g_idx if g_idx is not None else qweight,
        bias if bias is not None else scales, out, n_out, n_total, k,
        BITS=bits, GROUP_SIZE=group_size, HAS_GIDX=g_idx is not None,
        HAS_BIAS=bias is not None, FUSION=fusion, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps,
    )  # fmt: skip
    return out


# ---------------------------------------------------------------------- references
def unpack_along_k(qweight: torch.Tensor, k: int, bits: int) -> torch.Tensor:
    """``[K / P, N] int32`` -> ``[K, N]`` int32 values in ``[0, 2^bits)``."""
    shifts = torch.arange(0, 32, bits, device=qweight.device, dtype=torch.int32)  # [P]
    q = (qweight[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)  # [K/P, P, N]
    return q.reshape(-1, qweight.shape[1])[:k]


def pack_along_k(q: torch.Tensor, bits: int) -> torch.Tensor:
    """``[K, N]`` integer values in ``[0, 2^bits)`` -> ``[ceil(K / P), N] int32``
    (zero-padded rows at the end)."""
    pack = 32 // bits
    k, n = q.shape
    rows = -(-k // pack)
    padded = torch.zeros(rows * pack, n, dtype=torch.int64, device=q.device)
    padded[:k] = q.to(torch.int64)
    shifts = torch.arange(0, 32, bits, device=q.device, dtype=torch.int64)
    words = (padded.view(rows, pack, n) << shifts[None, :, None]).sum(dim=1)  # [rows, N] < 2^32
    # Reinterpret the unsigned 32-bit words as int32 (two's complement).
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def dequantize_wna16(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    k: int,
    group_size: int,
    bits: int = 4,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:  # [N, K] float32
    """The weight ``W[n, k] = (q - zeros[g, n]) * scales[g, n]``, ``g`` from ``g_idx`` or
    ``k // group_size``."""
    q = unpack_along_k(qweight, k, bits).float()  # [K, N]
    g = g_idx.long() if g_idx is not None else torch.arange(k, device=q.device) // group_size
    return ((q - zeros.float()[g]) * scales.float()[g]).T.contiguous()


def wna16_matmul_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bits: int = 4,
    g_idx: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    fusion: int = FUSE_NONE,
) -> torch.Tensor:
    """Dequantise, multiply in float64, round once to ``x.dtype`` (then the unfused
    activation, rounded as the layers round)."""
    w = dequantize_wna16(qweight, scales, zeros, x.shape[1], group_size, bits, g_idx)
    y = x.double() @ w.double().T
    if bias is not None:
        y = y + bias.double()
    y = y.to(x.dtype)
    if fusion == FUSE_SILU_MUL_OUT:
        n = y.shape[1] // 2
        y = (torch.nn.functional.silu(y[:, :n].float()) * y[:, n:].float()).to(x.dtype)
    return y


__all__ = [
    "SUPPORTED_BITS",
    "dequantize_wna16",
    "pack_along_k",
    "unpack_along_k",
    "wna16_gemv",
    "wna16_matmul",
    "wna16_matmul_ref",
]
