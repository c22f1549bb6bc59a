"""GGUF (llama.cpp) block formats kept packed: dequantisation in plain torch for every
supported type, and a Triton GEMM / GEMV that dequantises the 32-element block types in
registers.

A packed weight is ``[N, K / B * S]`` uint8: row ``n`` is the ``K / B`` blocks of output
row ``n`` as the file stores them (``B`` elements in ``S`` bytes per block, ggml's
``GGML_QUANT_SIZES``). The torch dequantisers restate ``gguf.quants``' numpy reference
with the same float32 operations in the same order, so they agree bit for bit
(``tests/kernels/test_gguf_kernels.py`` checks every type on random blocks).

Block layouts (``d``, ``m``: fp16 scale and minimum; ``qs``: packed values; ``qh``: high
bits), element ``j`` of a 32-element block:

* ``Q4_0`` ``d, qs[16]``: ``(nibble(j) - 8) * d``, nibble ``j < 16`` low, else high half
  of ``qs[j % 16]``;
* ``Q4_1`` ``d, m, qs[16]``: ``nibble(j) * d + m``;
* ``Q5_0`` ``d, qh[4], qs[16]``: ``((nibble(j) | bit j of qh << 4) - 16) * d``;
* ``Q5_1`` ``d, m, qh[4], qs[16]``: ``(nibble(j) | bit j of qh << 4) * d + m``;
* ``Q8_0`` ``d, qs[32]`` int8: ``qs[j] * d``;
* the K-quants (``Q2_K`` .. ``Q6_K``): 256-element super-blocks with 6- or 8-bit
  sub-block scales (the Triton kernel covers Q4_K, Q5_K and Q6_K; Q2_K and Q3_K are
  dequantised by the torch code on every device).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

Q = GGMLQuantizationType
QK_K = 256
# Types the Triton kernel dequantises in registers, and its TYPE code for each.
TRITON_TYPES = {
    Q.Q4_0: 0, Q.Q4_1: 1, Q.Q5_0: 2, Q.Q5_1: 3, Q.Q8_0: 4, Q.Q4_K: 5, Q.Q5_K: 6, Q.Q6_K: 7,
}  # fmt: skip


def _f16(b: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 at bytes [start, start + 2) of each block as float32 ``[nb, 1]``."""
    return b[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """Low nibbles of each ``group`` bytes, then their high nibbles (ggml's order):
    ``[nb, num_bytes]`` -> ``[nb, num_bytes // group, 2, group]`` uint8."""
    qs = qs.reshape(qs.shape[0], -1, 1, group)
    return torch.cat([qs & 0x0F, qs >> 4], dim=2)


def _bits(qh: torch.Tensor, group: int, num_planes: int, width: int) -> torch.Tensor:
    """Plane ``p`` of each byte is ``(b >> p * width) & mask``:
    ``[nb, num_bytes]`` -> ``[nb, num_bytes // group, num_planes, group]`` uint8."""
    qh = qh.reshape(qh.shape[0], -1, 1, group)
    shifts = torch.arange(0, num_planes * width, width, dtype=torch.uint8, device=qh.device)
    return (qh >> shifts.reshape(1, 1, -1, 1)) & ((1 << width) - 1)


def _q5_high(b: torch.Tensor, start: int) -> torch.Tensor:
    """Bit ``j`` of the little-endian uint32 at bytes [start, start + 4) moved to bit 4,
    ``j = 0..31``: ``[nb, 32]`` uint8."""
    qh = b[:, start : start + 4].reshape(-1, 4, 1)
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device).reshape(1, 1, 8)
    return (((qh >> shifts) & 1) << 4).reshape(-1, 32)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K 6-bit scales and mins of the 8 sub-blocks as float32 ``[nb, 8]``."""
    s = scales.reshape(-1, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 2:], 16).reshape(-1, 32).view(torch.int8) - 8
    return _f16(b, 0) * q.float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    return _f16(b, 0) * _nibbles(b[:, 4:], 16).reshape(-1, 32).float() + _f16(b, 2)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 6:], 16).reshape(-1, 32) | _q5_high(b, 2)
    return _f16(b, 0) * (q.view(torch.int8) - 16).float()


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 8:], 16).reshape(-1, 32) | _q5_high(b, 4)
    return _f16(b, 0) * q.float() + _f16(b, 2)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b, 0)


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b, 80), _f16(b, 82)
    dl = (d * (scales & 0xF).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    q = _bits(qs, 32, 4, 2).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, scales = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = _f16(b, 108)
    low, high = scales[:, :8], scales[:, 8:]
    lsc = _bits(low, 8, 2, 4).reshape(n, 16)  # nibbles: bytes 0..7 low, then high
    hsc = _bits(high, 4, 4, 2).reshape(n, 16)  # 2-bit planes of bytes 8..11
    sc = ((lsc & 0x0F) | ((hsc & 0x03) << 4)).view(torch.int8) - 32
    dl = (d * sc.float()).reshape(n, 16, 1)
    ql = _bits(qs, 32, 4, 2).reshape(n, 16, 16)
    qh = _bits(hmask, 32, 8, 1).reshape(n, 16, 16) ^ 1  # the offset is 4 where the bit is 0
    q = (ql.view(torch.int8) - (qh << 2).view(torch.int8)).float()
    return (dl * q).reshape(n, QK_K)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b, 0) * sc).reshape(n, 8, 1)
    dm = (_f16(b, 2) * mn).reshape(n, 8, 1)
    return (d * _nibbles(b[:, 16:], 32).reshape(n, 8, 32).float() - dm).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b, 0) * sc).reshape(n, 8, 1)
    dm = (_f16(b, 2) * mn).reshape(n, 8, 1)
    qh = _bits(b[:, 16:48], 32, 8, 1).reshape(n, 8, 32) << 4
    q = _nibbles(b[:, 48:], 32).reshape(n, 8, 32) | qh
    return (d * q.float() - dm).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(b, 208) * scales).reshape(n, 16, 1)
    qh = _bits(b[:, 128:192], 32, 4, 2).reshape(n, 8, 32) << 4
    q = (_nibbles(b[:, :128], 64).reshape(n, 8, 32) | qh).view(torch.int8) - 32
    return (d * q.reshape(n, 16, 16).float()).reshape(n, QK_K)


BLOCK_DEQUANT = {
    Q.Q4_0: _q4_0,
    Q.Q4_1: _q4_1,
    Q.Q5_0: _q5_0,
    Q.Q5_1: _q5_1,
    Q.Q8_0: _q8_0,
    Q.Q2_K: _q2_k,
    Q.Q3_K: _q3_k,
    Q.Q4_K: _q4_k,
    Q.Q5_K: _q5_k,
    Q.Q6_K: _q6_k,
}
PACKED_TYPES = tuple(BLOCK_DEQUANT)


def row_bytes(kind: GGMLQuantizationType, k: int) -> int:
    block, size = GGML_QUANT_SIZES[kind]
    return k // block * size


def dequantize_gguf(packed: torch.Tensor, kind: GGMLQuantizationType, k: int) -> torch.Tensor:
    """``[N, K / B * S]`` uint8 blocks -> ``[N, K]`` float32."""
    block, size = GGML_QUANT_SIZES[kind]
    n = packed.shape[0]
    return BLOCK_DEQUANT[kind](packed.reshape(-1, size)).reshape(n, k)


# ---------------------------------------------------------------------- Triton
@triton.jit
def _f16_at(p, mask):
    """The little-endian fp16 at byte pointers ``p`` as float32."""
    lo = tl.load(p, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(p + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _kquant_tile(w_ptr, offs_k, offs_n, mask, stride_wn, TYPE: tl.constexpr):
    """Q4_K (5), Q5_K (6), Q6_K (7): 256-element super-blocks (layouts: ``_q4_k`` etc.)."""
    SIZE: tl.constexpr = 144 if TYPE == 5 else (176 if TYPE == 6 else 210)
    j = (offs_k % 256)[:, None]
    base = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + (offs_k // 256 * SIZE)[:, None]
    if TYPE == 7:
        g, r = j // 128, j % 128
        ql = tl.load(base + g * 64 + r % 64, mask=mask, other=0).to(tl.int32)
        lo = tl.where(r < 64, ql & 0x0F, ql >> 4)
        qh = tl.load(base + 128 + g * 32 + j % 32, mask=mask, other=0).to(tl.int32)
        hi = (qh >> (2 * (r // 32))) & 3
        sc = tl.load(base + 192 + j // 16, mask=mask, other=0).to(tl.int8, bitcast=True)
        d = _f16_at(base + 208, mask)
        w = d * sc.to(tl.float32) * ((lo | (hi << 4)) - 32).to(tl.float32)
    else:
        sub = j // 32  # the 6-bit scale / min of this 32-element sub-block
        low = sub < 4
        s4 = sub % 4
        b_d = tl.load(base + 4 + s4, mask=mask, other=0).to(tl.int32)
        b_m = tl.load(base + 8 + s4, mask=mask, other=0).to(tl.int32)
        b_md = tl.load(base + 12 + s4, mask=mask, other=0).to(tl.int32)
        sc = tl.where(low, b_d & 0x3F, (b_md & 0x0F) | ((b_d >> 2) & 0x30))
        mn = tl.where(low, b_m & 0x3F, (b_md >> 4) | ((b_m >> 2) & 0x30))
        QS: tl.constexpr = 16 if TYPE == 5 else 48
        c, l64 = j // 64, j % 64
        byte = tl.load(base + QS + c * 32 + l64 % 32, mask=mask, other=0).to(tl.int32)
        q = tl.where(l64 < 32, byte & 0x0F, byte >> 4)
        if TYPE == 6:
            qh = tl.load(base + 16 + j % 32, mask=mask, other=0).to(tl.int32)
            q = q | (((qh >> sub) & 1) << 4)
        d = _f16_at(base, mask) * sc.to(tl.float32)
        dm = _f16_at(base + 2, mask) * mn.to(tl.float32)
        w = d * q.to(tl.float32) - dm
    return w


@triton.jit
def _gguf_tile(
    w_ptr,  # [N, row_bytes] uint8
    offs_k,  # [BLOCK_K]
    offs_n,  # [BLOCK_N]
    mask_k,
    mask_n,
    stride_wn,
    TYPE: tl.constexpr,
):
    """The ``[BLOCK_K, BLOCK_N]`` float32 tile ``W^T[offs_k, offs_n]``."""
    if TYPE >= 5:
        return _kquant_tile(w_ptr, offs_k, offs_n, mask_k[:, None] & mask_n[None, :],
                            stride_wn, TYPE)  # fmt: skip
    # bytes per block and the offsets of qs / qh in it, per TYPE (Q4_0 Q4_1 Q5_0 Q5_1 Q8_0)
    SIZE: tl.constexpr = 18 if TYPE == 0 else (20 if TYPE == 1 else (22 if TYPE == 2 else (
        24 if TYPE == 3 else 34)))  # fmt: skip
    QS: tl.constexpr = 2 if TYPE == 0 else (4 if TYPE == 1 else (6 if TYPE == 2 else 8))
    QH: tl.constexpr = 2 if TYPE == 2 else 4
    mask = mask_k[:, None] & mask_n[None, :]
    j = (offs_k % 32)[:, None]
    base = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + (offs_k // 32 * SIZE)[:, None]
    d = _f16_at(base, mask)
    if TYPE == 4:
        q8 = tl.load(base + 2 + j, mask=mask, other=0).to(tl.int8, bitcast=True)
        w = q8.to(tl.float32) * d
    else:
        byte = tl.load(base + QS + j % 16, mask=mask, other=0).to(tl.int32)
        q = tl.where(j < 16, byte & 0x0F, byte >> 4)
        if TYPE >= 2:
            hb = tl.load(base + QH + j // 8, mask=mask, other=0).to(tl.int32)
            q = q | (((hb >> (j % 8)) & 1) << 4)
        if TYPE == 0:
            w = (q - 8).to(tl.float32) * d
        elif TYPE == 2:
            w = (q - 16).to(tl.float32) * d
        else:
            w = q.to(tl.float32) * d + _f16_at(base + 2, mask)
    return w


@triton.jit
def _gguf_matmul_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, row_bytes] uint8
    bias_ptr,  # [N] (HAS_BIAS)
    out_ptr,  # [M, N]
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    TYPE: tl.constexpr,
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
        w = _gguf_tile(w_ptr, offs_k, offs_n, mask_k, mask_n, stride_wn, TYPE)
        acc += tl.dot(x, w.to(x.dtype), out_dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _gguf_gemv_kernel(
    x_ptr,  # [K]
    w_ptr,  # [N_TOTAL, row_bytes] uint8
    bias_ptr,
    out_ptr,  # [N_OUT]
    N_OUT,
    K,
    stride_wn,
    TYPE: tl.constexpr,
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
        acc += _gguf_tile(w_ptr, offs_k, offs_n, mask_k, mask_n, stride_wn, TYPE) * xk
        if FUSION == 1:
            u = _gguf_tile(w_ptr, offs_k, N_OUT + offs_n, mask_k, mask_n, stride_wn, TYPE)
            acc_u += u * xk
    y = tl.sum(acc, axis=0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if FUSION == 1:
        up = tl.sum(acc_u, axis=0)
        if HAS_BIAS:
            up += tl.load(bias_ptr + N_OUT + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        g = y.to(act_ty).to(tl.float32)
        up = up.to(act_ty).to(tl.float32)
        y = g / (1.0 + tl.exp(-g)) * up
    tl.store(out_ptr + offs_n, y.to(act_ty), mask=mask_n)


def gguf_matmul(
    x: torch.Tensor,  # [M, K]
    packed: torch.Tensor,  # [N, K / B * S] uint8
    kind: GGMLQuantizationType,
    bias: torch.Tensor | None = None,
    config: tuple[int, int, int, int] | None = None,  # BLOCK_M, BLOCK_N, BLOCK_K, warps
) -> torch.Tensor:  # [M, N], x's dtype
    """``x @ dequant(W)^T + bias`` for a type of ``TRITON_TYPES``."""
    m, k = x.shape
    n = packed.shape[0]
    assert kind in TRITON_TYPES, f"no Triton kernel for {kind.name}"
    assert packed.dtype == torch.uint8 and packed.shape[1] == row_bytes(kind, k)
    assert x.stride(1) == 1 and packed.stride(1) == 1
    block_m, block_n, block_k, num_warps = config or (16 if m <= 16 else 64, 64, 64, 4)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _gguf_matmul_kernel[grid](
        x, packed, bias if bias is not None else x, out, m, n, k,
        x.stride(0), packed.stride(0), out.stride(0),
        TYPE=TRITON_TYPES[kind], HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
    )  # fmt: skip
    return out


def gguf_gemv(
    x: torch.Tensor,  # [1, K]
    packed: torch.Tensor,  # [N, ...] uint8 ([2N, ...] for FUSE_SILU_MUL_OUT)
    kind: GGMLQuantizationType,
    bias: torch.Tensor | None = None,
    fusion: int = 0,
    config: tuple[int, int, int] | None = None,  # BLOCK_N, BLOCK_K, warps
) -> torch.Tensor:  # [1, N]
    """``dequant(W) x + bias`` for one row (``fusion`` as ``kvasir.kernels.gemv``)."""
    assert x.dim() == 2 and x.shape[0] == 1 and x.stride(1) == 1
    k = x.shape[1]
    assert kind in TRITON_TYPES, f"no Triton kernel for {kind.name}"
    assert packed.dtype == torch.uint8 and packed.shape[1] == row_bytes(kind, k)
    n_out = packed.shape[0] // 2 if fusion == 1 else packed.shape[0]
    block_n, block_k, num_warps = config or (32, 64, 4)
    out = torch.empty((1, n_out), dtype=x.dtype, device=x.device)
    _gguf_gemv_kernel[(triton.cdiv(n_out, block_n),)](
        x, packed, bias if bias is not None else x, out, n_out, k, packed.stride(0),
        TYPE=TRITON_TYPES[kind], HAS_BIAS=bias is not None, FUSION=fusion,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
    )  # fmt: skip
    return out


def gguf_matmul_ref(
    x: torch.Tensor,
    packed: torch.Tensor,
    kind: GGMLQuantizationType,
    bias: torch.Tensor | None = None,
    fusion: int = 0,
) -> torch.Tensor:
    """Dequantise (torch), multiply in float64, round once to ``x.dtype``."""
    w = dequantize_gguf(packed, kind, x.shape[1]).double()
    y = x.double() @ w.T
    if bias is not None:
        y = y + bias.double()
    y = y.to(x.dtype)
    if fusion == 1:
        n = y.shape[1] // 2
        y = (torch.nn.functional.silu(y[:, :n].float()) * y[:, n:].float()).to(x.dtype)
    return y


__all__ = [
    "BLOCK_DEQUANT",
    "PACKED_TYPES",
    "TRITON_TYPES",
    "dequantize_gguf",
    "gguf_gemv",
    "gguf_matmul",
    "gguf_matmul_ref",
    "row_bytes",
]
