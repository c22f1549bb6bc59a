"""Batched LoRA shrink and expand (Punica's BGMV and SGMV) in Triton.

``shrink``: ``s[t] = x[t] @ A[slot(t)]^T`` (``[num_tokens, K]``, float32); ``expand``:
``y[t] += s[t] @ B[slot(t)]^T``. A token whose slot is -1 runs the base model: its
shrink row is zero and its output untouched. Every slot is padded to the same K
(``num_sub * max_rank``; a smaller rank is zero rows of A and zero columns of B), so
adapters of mixed ranks run in one launch.

* BGMV: one program per (token, output tile); each token gathers its own slot's rows.
  For decode steps and CUDA graphs (``token_slots`` is a persistent buffer).
* SGMV: one program per (segment, row tile, output tile); a segment is a run of
  tokens with one slot (a prefill chunk), so its weight tile is loaded once per
  ``BLOCK_M`` rows and the product is a ``tl.dot``. Empty segments launch programs
  that return at once.

The references are ``kvasir.lora.ops`` (``bgmv_*_ref``, ``sgmv_*_ref``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _bgmv_shrink_kernel(
    x_ptr,  # [T, IN]
    a_ptr,  # [S, K, IN]
    slots_ptr,  # [T] int32
    out_ptr,  # [T, K] float32
    IN,
    K,
    stride_xt,
    stride_as,
    stride_ak,
    BLOCK_K: tl.constexpr,
    BLOCK_IN: tl.constexpr,
):
    t = tl.program_id(0)
    pid_k = tl.program_id(1)
    slot = tl.load(slots_ptr + t)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    if slot >= 0:
        a_rows = a_ptr + slot.to(tl.int64) * stride_as + offs_k[:, None] * stride_ak
        for i0 in range(0, IN, BLOCK_IN):
            offs_i = i0 + tl.arange(0, BLOCK_IN)
            mask_i = offs_i < IN
            xv = tl.load(x_ptr + t.to(tl.int64) * stride_xt + offs_i, mask=mask_i, other=0.0)
            a = tl.load(a_rows + offs_i[None, :], mask=mask_k[:, None] & mask_i[None, :], other=0.0)
            acc += tl.sum(a.to(tl.float32) * xv.to(tl.float32)[None, :], axis=1)
    tl.store(out_ptr + t.to(tl.int64) * K + offs_k, acc, mask=mask_k)


@triton.jit
def _bgmv_expand_kernel(
    s_ptr,  # [T, K] float32
    b_ptr,  # [S, N, K]
    slots_ptr,  # [T] int32
    y_ptr,  # [T, N], added into
    N,
    K,
    stride_bs,
    stride_bn,
    stride_yt,
    BLOCK_N: tl.constexpr,
    BLOCK_KK: tl.constexpr,  # >= K
):
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.load(slots_ptr + t)
    if slot < 0:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_KK)
    mask_k = offs_k < K
    sv = tl.load(s_ptr + t.to(tl.int64) * K + offs_k, mask=mask_k, other=0.0)
    b = tl.load(
        b_ptr + slot.to(tl.int64) * stride_bs + offs_n[:, None] * stride_bn + offs_k[None, :],
        mask=mask_n[:, None] & mask_k[None, :],
        other=0.0,
    )
    delta = tl.sum(b.to(tl.float32) * sv[None, :], axis=1)  # [BLOCK_N]
    y_ptrs = y_ptr + t.to(tl.int64) * stride_yt + offs_n
    y = tl.load(y_ptrs, mask=mask_n, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y.dtype), mask=mask_n)


@triton.jit
def _sgmv_shrink_kernel(
    x_ptr,  # [T, IN]
    a_ptr,  # [S, K, IN]
    seg_starts_ptr,  # [num_segments + 1] int32
    seg_slots_ptr,  # [num_segments] int32
    out_ptr,  # [T, K] float32, zero-initialised
    IN,
    K,
    stride_xt,
    stride_as,
    stride_ak,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_IN: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seg = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    slot = tl.load(seg_slots_ptr + seg)
    start = tl.load(seg_starts_ptr + seg)
    end = tl.load(seg_starts_ptr + seg + 1)
    row0 = start + pid_m * BLOCK_M
    if slot < 0 or row0 >= end:
        return  # base-model segment, or past this segment's rows (an empty one: all)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    a_base = a_ptr + slot.to(tl.int64) * stride_as
    for i0 in range(0, IN, BLOCK_IN):
        offs_i = i0 + tl.arange(0, BLOCK_IN)
        mask_i = offs_i < IN
        xt = tl.load(
            x_ptr + offs_m[:, None].to(tl.int64) * stride_xt + offs_i[None, :],
            mask=mask_m[:, None] & mask_i[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_IN]
        at = tl.load(
            a_base + offs_k[None, :] * stride_ak + offs_i[:, None],
            mask=mask_k[None, :] & mask_i[:, None],
            other=0.0,
        )  # [BLOCK_IN, BLOCK_K]: A^T
        acc += tl.dot(xt.to(at.dtype), at, input_precision=PRECISION)
    tl.store(
        out_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :],
        acc,
        mask=mask_m[:, None] & mask_k[None, :],
    )


@triton.jit
def _sgmv_expand_kernel(
    s_ptr,  # [T, K] float32
    b_ptr,  # [S, N, K]
    seg_starts_ptr,
    seg_slots_ptr,
    y_ptr,  # [T, N], added into
    N,
    K,
    stride_bs,
    stride_bn,
    stride_yt,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KK: tl.constexpr,  # >= K
    PRECISION: tl.constexpr,
):
    seg = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    slot = tl.load(seg_slots_ptr + seg)
    start = tl.load(seg_starts_ptr + seg)
    end = tl.load(seg_starts_ptr + seg + 1)
    row0 = start + pid_m * BLOCK_M
    if slot < 0 or row0 >= end:
        return
    offs_m = row0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_KK)
    mask_k = offs_k < K
    st = tl.load(
        s_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :],
        mask=mask_m[:, None] & mask_k[None, :],
        other=0.0,
    )  # [BLOCK_M, BLOCK_KK]
    bt = tl.load(
        b_ptr + slot.to(tl.int64) * stride_bs + offs_n[None, :] * stride_bn + offs_k[:, None],
        mask=mask_n[None, :] & mask_k[:, None],
        other=0.0,
    )  # [BLOCK_KK, BLOCK_N]: B^T
    delta = tl.dot(st, bt.to(tl.float32), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_yt + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y.dtype), mask=mask)


def _kk(k: int) -> int:
    return max(16, triton.next_power_of_2(k))


def _precision(x: torch.Tensor) -> str:
    # float32 activations keep float32 products (no TF32 rounding on the GPU).
    return "ieee" if x.dtype == torch.float32 else "tf32"


def bgmv_shrink(
    x: torch.Tensor,  # [T, IN]
    lora_a: torch.Tensor,  # [S, K, IN]
    token_slots: torch.Tensor,  # [T] int32
) -> torch.Tensor:  # [T, K] float32
    t, k = x.shape[0], lora_a.shape[1]
    out = torch.empty(t, k, dtype=torch.float32, device=x.device)
    if t == 0:
        return out
    x = x.contiguous()
    block_k = min(64, _kk(k))
    _bgmv_shrink_kernel[(t, triton.cdiv(k, block_k))](
        x, lora_a, token_slots, out, x.shape[1], k, x.stride(0), lora_a.stride(0),
        lora_a.stride(1), BLOCK_K=block_k, BLOCK_IN=64,
    )  # fmt: skip
    return out


def bgmv_expand(
    s: torch.Tensor,  # [T, K] float32
    lora_b: torch.Tensor,  # [S, N, K]
    token_slots: torch.Tensor,  # [T] int32
    y: torch.Tensor,  # [T, N], added into
) -> torch.Tensor:
    t, n, k = s.shape[0], lora_b.shape[1], lora_b.shape[2]
    if t == 0:
        return y
    assert y.stride(1) == 1 and lora_b.stride(2) == 1
    block_n = 64
    _bgmv_expand_kernel[(t, triton.cdiv(n, block_n))](
        s, lora_b, token_slots, y, n, k, lora_b.stride(0), lora_b.stride(1), y.stride(0),
        BLOCK_N=block_n, BLOCK_KK=_kk(k),
    )  # fmt: skip
    return y


_BLOCK_M = 16


def sgmv_shrink(
    x: torch.Tensor,  # [T, IN]
    lora_a: torch.Tensor,  # [S, K, IN]
    seg_starts: torch.Tensor,  # [G + 1] int32
    seg_slots: torch.Tensor,  # [G] int32
    max_seg_len: int,
) -> torch.Tensor:  # [T, K] float32
    t, k = x.shape[0], lora_a.shape[1]
    out = torch.zeros(t, k, dtype=torch.float32, device=x.device)
    g = seg_slots.shape[0]
    if t == 0 or g == 0 or max_seg_len == 0:
        return out
    x = x.contiguous()
    block_k = min(64, _kk(k))
    grid = (g, triton.cdiv(max_seg_len, _BLOCK_M), triton.cdiv(k, block_k))
    _sgmv_shrink_kernel[grid](
        x, lora_a, seg_starts, seg_slots, out, x.shape[1], k, x.stride(0), lora_a.stride(0),
        lora_a.stride(1), BLOCK_M=_BLOCK_M, BLOCK_K=block_k, BLOCK_IN=32,
        PRECISION=_precision(x),
    )  # fmt: skip
    return out


def sgmv_expand(
    s: torch.Tensor,  # [T, K] float32
    lora_b: torch.Tensor,  # [S, N, K]
    seg_starts: torch.Tensor,
    seg_slots: torch.Tensor,
    max_seg_len: int,
    y: torch.Tensor,  # [T, N], added into
) -> torch.Tensor:
    t, n, k = s.shape[0], lora_b.shape[1], lora_b.shape[2]
    g = seg_slots.shape[0]
    if t == 0 or g == 0 or max_seg_len == 0:
        return y
    assert y.stride(1) == 1 and lora_b.stride(2) == 1
    block_n = 64
    grid = (g, triton.cdiv(max_seg_len, _BLOCK_M), triton.cdiv(n, block_n))
    _sgmv_expand_kernel[grid](
        s, lora_b, seg_starts, seg_slots, y, n, k, lora_b.stride(0), lora_b.stride(1),
        y.stride(0), BLOCK_M=_BLOCK_M, BLOCK_N=block_n, BLOCK_KK=_kk(k),
        PRECISION=_precision(y),
    )  # fmt: skip
    return y
