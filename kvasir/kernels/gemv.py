"""Single-row GEMV (batch-1 decode), optionally with SiLU-and-mul fused in front.

At one token per step every linear layer is a matrix-vector product that only streams
its weight from memory. cuBLAS reaches 70-98 % of the copy bandwidth on the Llama-3-8B
projections at M = 1 (worst on the narrow o_proj, 4096 x 4096, and with a separate
split-K reduce kernel on two of them); this kernel reaches 81-101 % on the same shapes
(benchmarks/bench_gemv.py, KERNELS_NOTES.md):

* ``PROLOGUE_NONE``: ``y = W x``;
* ``PROLOGUE_SILU_MUL``: ``x = [gate, up]`` of length 2K, ``y = W (silu(gate) * up)``,
  rounding ``silu(gate) * up`` once to the input dtype exactly as
  ``kvasir.kernels.activation.silu_and_mul`` does (one kernel fewer per layer).

Each program owns ``BLOCK_N`` output rows and reads them whole (no split-K, no atomics,
deterministic), accumulating ``W * x`` elementwise in float32 and reducing once at the
end. (Fusing the RMSNorm before qkv/gate_up the same way was measured slower than the
separate norm kernel: every program must first reduce the whole vector before its first
weight load, and reloads three vectors per tile.)
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

PROLOGUE_NONE = 0
PROLOGUE_SILU_MUL = 1


@triton.jit
def _gemv_kernel(
    x_ptr,  # [K] (or [2K] for SILU_MUL)
    w_ptr,  # [N, K], rows contiguous
    bias_ptr,  # [N] (HAS_BIAS)
    out_ptr,  # [N]
    N,
    stride_wn,
    K: tl.constexpr,
    PROLOGUE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k0 = tl.arange(0, BLOCK_K)
    act_ty = out_ptr.dtype.element_ty
    # The tile's first row in 64 bits (N * K may pass 2^31 elements); offsets inside the
    # tile stay 32-bit: a 64-bit offset per element cost 18 % of batch-1 decode on an H100
    # (138.8 vs 168.2 tok/s, Llama-3-8B shape).
    w_tile = w_ptr + (pid * BLOCK_N).to(tl.int64) * stride_wn
    w_rows = w_tile + tl.arange(0, BLOCK_N)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + offs_k0
        mk = offs_k < K
        if PROLOGUE == 1:
            g = tl.load(x_ptr + offs_k, mask=mk, other=0.0).to(tl.float32)
            u = tl.load(x_ptr + K + offs_k, mask=mk, other=0.0).to(tl.float32)
            xk = (g / (1.0 + tl.exp(-g)) * u).to(act_ty).to(tl.float32)
        else:
            xk = tl.load(x_ptr + offs_k, mask=mk, other=0.0).to(tl.float32)
        w = tl.load(
            w_rows + offs_k[None, :],
            mask=mask_n[:, None] & mk[None, :],
            other=0.0,
        )
        acc += w.to(tl.float32) * xk[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_n, y.to(act_ty), mask=mask_n)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_gemv_config(n: int, k: int, num_sms: int = 132) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps). 8 rows x 1024 columns per tile and 4 warps was the
    best or within 1 % of it on every 8B projection (H100 sweep, KERNELS_NOTES.md), except
    where N / 8 programs make one and a bit waves (about 4 programs fit an SM at once):
    there 16-row tiles make it a single wave (qkv: 84 % of copy vs 78 %)."""
    block_k = min(1024, triton.next_power_of_2(k))
    resident = 4 * num_sms
    block_n = 16 if resident < triton.cdiv(n, 8) <= 2 * resident else 8
    return block_n, block_k, 4


def gemv(
    x: torch.Tensor,  # [1, K] ([1, 2K] for PROLOGUE_SILU_MUL)
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    prologue: int = PROLOGUE_NONE,
    config: tuple[int, int, int] | None = None,
) -> torch.Tensor:  # [1, N], x's dtype
    """``weight @ f(x) (+ bias)``; see the module docstring."""
    n, k = weight.shape
    assert x.dim() == 2 and x.shape[0] == 1 and x.stride(-1) == 1 and weight.stride(1) == 1
    assert x.shape[1] == (2 * k if prologue == PROLOGUE_SILU_MUL else k), "x/weight mismatch"
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    if config is None:
        sms = _num_sms(x.device.index or 0) if x.is_cuda else 132
        config = default_gemv_config(n, k, sms)
    block_n, block_k, num_warps = config
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x,
        weight,
        bias if bias is not None else x,
        out,
        n,
        weight.stride(0),
        K=k,
        PROLOGUE=prologue,
        HAS_BIAS=bias is not None,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return out


def gemv_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    prologue: int = PROLOGUE_NONE,
) -> torch.Tensor:
    """Plain-torch reference: the unfused activation, then ``F.linear`` in float32."""
    v = x
    if prologue == PROLOGUE_SILU_MUL:
        k = x.shape[1] // 2
        v = (torch.nn.functional.silu(x[:, :k].float()) * x[:, k:].float()).to(x.dtype)
    b = None if bias is None else bias.float()
    return torch.nn.functional.linear(v.float(), weight.float(), b).to(x.dtype)


__all__ = [
    "PROLOGUE_NONE",
    "PROLOGUE_SILU_MUL",
    "default_gemv_config",
    "gemv",
    "gemv_ref",
]
