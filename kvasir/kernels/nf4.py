"""4-bit NormalFloat / FP4 weights in bitsandbytes' layout (the QLoRA base format):
dequantisation in plain torch, and a Triton GEMM / GEMV that dequantises in registers.

The ``[N, K]`` weight flattened row-major is cut into blocks of ``BLOCK = 64`` values;
each value is a 4-bit index into a 16-entry code (NF4 or FP4, ``code [16]`` float32),
two per byte with the first in the high nibble (``packed [N * K / 2]`` uint8). Each
block's absmax is double-quantised: ``absmax[b] = nested_code[absmax_q[b]] *
nested_absmax[b // 256] + offset`` (``absmax_q`` uint8, ``nested_code [256]``,
``nested_absmax [blocks / 256]`` float32, ``offset`` one float), and the weight is
``W = code[index] * absmax[block]``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

BLOCK = 64
NESTED_BLOCK = 256
# QLoRA's NormalFloat4 (the quantiles of N(0, 1) normalised to [-1, 1], 0 exact).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
# bitsandbytes' FP4 (e2m1 without infinities), normalised to [-1, 1].
FP4_CODE = (
    0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5,
    0.1666666716337204, 0.25, 0.0, -0.0052083334885537624, -0.6666666865348816, -1.0,
    -0.3333333432674408, -0.5, -0.1666666716337204, -0.25,
)  # fmt: skip


class NF4Weight(NamedTuple):
    packed: torch.Tensor  # [N * K / 2] uint8
    code: torch.Tensor  # [16] float32
    absmax_q: torch.Tensor  # [blocks] uint8
    nested_code: torch.Tensor  # [256] float32
    nested_absmax: torch.Tensor  # [ceil(blocks / 256)] float32
    offset: float
    shape: tuple[int, int]  # (N, K)

    def nbytes(self) -> int:
        ts = (self.packed, self.code, self.absmax_q, self.nested_code, self.nested_absmax)
        return sum(t.numel() * t.element_size() for t in ts)


def absmax(w: NF4Weight) -> torch.Tensor:
    """The blocks' absmax ``[blocks]`` float32 from the double quantisation."""
    blocks = torch.arange(w.absmax_q.numel(), device=w.absmax_q.device)
    return w.nested_code[w.absmax_q.long()] * w.nested_absmax[blocks // NESTED_BLOCK] + w.offset


def dequantize_nf4(w: NF4Weight) -> torch.Tensor:
    """``[N, K]`` float32."""
    n, k = w.shape
    idx = torch.stack([w.packed >> 4, w.packed & 0x0F], dim=1).reshape(-1)[: n * k]
    values = w.code[idx.long()]
    nb = w.absmax_q.numel()
    padded = torch.zeros(nb * BLOCK, device=values.device)
    padded[: n * k] = values
    return (padded.view(nb, BLOCK) * absmax(w)[:, None]).reshape(-1)[: n * k].view(n, k)


def _dynamic_code() -> torch.Tensor:
    """The 256-entry signed code of the nested absmax: linear over [-1, 1] (any code is
    valid in the format: it is stored with the weight)."""
    return torch.linspace(-1.0, 1.0, 256)


def quantize_nf4(weight: torch.Tensor, code: tuple[float, ...] = NF4_CODE) -> NF4Weight:
    """Blockwise 4-bit quantisation with double-quantised absmax (nearest code entry)."""
    n, k = weight.shape
    flat = weight.float().reshape(-1)
    nb = -(-flat.numel() // BLOCK)
    padded = torch.zeros(nb * BLOCK, device=flat.device)
    padded[: flat.numel()] = flat
    blocks = padded.view(nb, BLOCK)
    amax = blocks.abs().amax(1).clamp_min(1e-12)  # [nb]
    table = torch.tensor(code, device=flat.device)
    idx = (blocks / amax[:, None])[..., None].sub(table).abs().argmin(-1).reshape(-1)
    idx = idx[: n * k] if (n * k) % 2 == 0 else torch.cat([idx[: n * k], idx.new_zeros(1)])
    packed = ((idx[0::2] << 4) | idx[1::2]).to(torch.uint8)
    offset = float(amax.mean())
    centred = amax - offset
    nn = -(-nb // NESTED_BLOCK)
    cpad = torch.zeros(nn * NESTED_BLOCK, device=flat.device)
    cpad[:nb] = centred
    nested_absmax = cpad.view(nn, NESTED_BLOCK).abs().amax(1).clamp_min(1e-12)
    ncode = _dynamic_code().to(flat.device)
    scaled = (cpad.view(nn, NESTED_BLOCK) / nested_absmax[:, None]).reshape(-1)[:nb]
    absmax_q = (scaled[:, None] - ncode).abs().argmin(-1).to(torch.uint8)
    return NF4Weight(packed, table, absmax_q, ncode, nested_absmax, offset, (n, k))


# ---------------------------------------------------------------------- Triton
@triton.jit
def _nf4_tile(
    p_ptr, code_ptr, aq_ptr, ncode_ptr, nabs_ptr, offset, offs_k, offs_n, mask_k, mask_n, K
):
    """The ``[BLOCK_K, BLOCK_N]`` float32 tile ``W^T[offs_k, offs_n]``."""
    mask = mask_k[:, None] & mask_n[None, :]
    flat = offs_n.to(tl.int64)[None, :] * K + offs_k[:, None]
    byte = tl.load(p_ptr + flat // 2, mask=mask, other=0).to(tl.int32)
    idx = tl.where(flat % 2 == 0, byte >> 4, byte & 0x0F)
    v = tl.load(code_ptr + idx, mask=mask, other=0.0)
    block = flat // 64
    aq = tl.load(aq_ptr + block, mask=mask, other=0).to(tl.int32)
    a = tl.load(ncode_ptr + aq, mask=mask, other=0.0) * tl.load(
        nabs_ptr + block // 256, mask=mask, other=0.0
    )
    return v * (a + offset)


@triton.jit
def _nf4_matmul_kernel(
    x_ptr, p_ptr, code_ptr, aq_ptr, ncode_ptr, nabs_ptr, offset, out_ptr,
    M, N, K, stride_xm, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(
            x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :],
            mask=mask_m[:, None] & mask_k[None, :], other=0.0,
        )  # fmt: skip
        w = _nf4_tile(p_ptr, code_ptr, aq_ptr, ncode_ptr, nabs_ptr, offset, offs_k, offs_n,
                      mask_k, mask_n, K)  # fmt: skip
        acc += tl.dot(x, w.to(x.dtype), out_dtype=tl.float32)
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _nf4_gemv_kernel(
    x_ptr, p_ptr, code_ptr, aq_ptr, ncode_ptr, nabs_ptr, offset, out_ptr, N, K,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        xk = tl.load(x_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)[:, None]
        w = _nf4_tile(p_ptr, code_ptr, aq_ptr, ncode_ptr, nabs_ptr, offset, offs_k, offs_n,
                      mask_k, mask_n, K)  # fmt: skip
        acc += w * xk
    tl.store(out_ptr + offs_n, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=mask_n)


def nf4_matmul(x: torch.Tensor, w: NF4Weight) -> torch.Tensor:  # [M, K] -> [M, N]
    """``x @ dequant(W)^T`` with the weight dequantised in registers (GEMV at one row)."""
    m, k = x.shape
    n = w.shape[0]
    assert w.shape[1] == k and x.stride(1) == 1
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    args = (w.packed, w.code, w.absmax_q, w.nested_code, w.nested_absmax, float(w.offset))
    if m == 1:
        _nf4_gemv_kernel[(triton.cdiv(n, 32),)](x, *args, out, n, k, BLOCK_N=32, BLOCK_K=64)
        return out
    block_m = 16 if m <= 16 else 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, 64))
    _nf4_matmul_kernel[grid](
        x, *args, out, m, n, k, x.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=64,
    )  # fmt: skip
    return out


def nf4_matmul_ref(x: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """Dequantise, multiply in float64, round once to ``x.dtype``."""
    return (x.double() @ dequantize_nf4(w).double().T).to(x.dtype)


__all__ = [
    "BLOCK",
    "FP4_CODE",
    "NF4_CODE",
    "NF4Weight",
    "dequantize_nf4",
    "nf4_matmul",
    "nf4_matmul_ref",
    "quantize_nf4",
]
