"""Single-row GEMV (batch-1 decode), optionally with SiLU-and-mul fused in.

At one token per step every linear layer is a matrix-vector product that only streams
its weight from memory. cuBLAS falls short of the copy bandwidth there at M = 1 (worst on
the narrow o_proj, and with a separate split-K reduce kernel on some shapes); this kernel
comes closer on the same shapes (benchmarks/bench_gemv.py, KERNELS_NOTES.md):

* ``FUSE_NONE``: ``y = W x``;
* with ``scale`` (one float32 per weight row), ``W`` is 8-bit (FP8 E4M3 or INT8) and
  ``y = scale * (W x)``: the quantised linear methods' batch-1 path, reading one byte per
  weight (the row's scale is applied once, after the row's reduction);
* ``FUSE_SILU_MUL_OUT``: ``W = [gate; up]`` of ``2N`` rows, ``y = silu(gate x) * (up x)``
  (Llama's ``gate_up_proj`` and the activation in one kernel, ``N`` outputs). Each
  program reads the same rows of both halves. ``gate x`` and ``up x`` are rounded to the
  input dtype first and ``silu(g) * u`` once more, exactly as the unfused
  ``linear`` + ``kvasir.kernels.activation.silu_and_mul`` round.
  (The activation fused in front of ``down_proj`` instead was measured slower and
  dropped: every program recomputed the whole activation; KERNELS_NOTES.md.)

Each program owns ``BLOCK_N`` output rows and reads them whole (no split-K, no atomics,
deterministic), accumulating ``W * x`` elementwise in float32 and reducing once at the
end. (Fusing the RMSNorm before qkv/gate_up the same way was measured slower than the
separate norm kernel: every program must first reduce the whole vector before its first
weight load, and reloads three vectors per tile.) Under programmatic dependent launch
(``kvasir.kernels.pdl``) each program loads its first weight tile before it waits for
the kernel in front.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kvasir.kernels.pdl import gdc_launch_dependents, gdc_wait, launch_kwargs, use_pdl

FUSE_NONE = 0
FUSE_SILU_MUL_OUT = 1


@triton.jit
def _gemv_kernel(
    x_ptr,  # [K]
    w_ptr,  # [N, K] (or [2N, K] for FUSE_SILU_MUL_OUT), rows contiguous
    bias_ptr,  # [N] (or [2N]) (HAS_BIAS)
    scale_ptr,  # [N] (or [2N]) float32 per-row weight scales (HAS_SCALE)
    out_ptr,  # [N]
    N,
    stride_wn,
    K: tl.constexpr,
    FUSION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    if USE_PDL:
        gdc_launch_dependents()
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k0 = tl.arange(0, BLOCK_K)
    mk0 = offs_k0 < K
    act_ty = out_ptr.dtype.element_ty
    # The tile's first row in 64 bits (N * K may pass 2^31 elements); offsets inside the
    # tile stay 32-bit: a 64-bit offset per element was measured to slow batch-1 decode
    # (benchmarks/RESULTS.md, the GEMV regression).
    rows = tl.arange(0, BLOCK_N)[:, None] * stride_wn
    w_rows = w_ptr + (pid * BLOCK_N).to(tl.int64) * stride_wn + rows
    # The first weight tile is loaded before waiting for the kernel in front (PDL: the
    # weights are never written, so this read may overlap that kernel's tail).
    w0 = tl.load(w_rows + offs_k0[None, :], mask=mask_n[:, None] & mk0[None, :], other=0.0)
    if FUSION == 1:
        u_rows = w_ptr + (N + pid * BLOCK_N).to(tl.int64) * stride_wn + rows
        u0 = tl.load(u_rows + offs_k0[None, :], mask=mask_n[:, None] & mk0[None, :], other=0.0)
    if USE_PDL:
        gdc_wait()
    xk = tl.load(x_ptr + offs_k0, mask=mk0, other=0.0).to(tl.float32)[None, :]
    acc = w0.to(tl.float32) * xk
    if FUSION == 1:
        acc_u = u0.to(tl.float32) * xk
    for k0 in range(BLOCK_K, K, BLOCK_K):
        offs_k = k0 + offs_k0
        mk = mask_n[:, None] & (offs_k < K)[None, :]
        xk = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)[None, :]
        acc += tl.load(w_rows + offs_k[None, :], mask=mk, other=0.0).to(tl.float32) * xk
        if FUSION == 1:
            acc_u += tl.load(u_rows + offs_k[None, :], mask=mk, other=0.0).to(tl.float32) * xk
    y = tl.sum(acc, axis=1)
    if HAS_SCALE:
        y *= tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if FUSION == 1:
        u = tl.sum(acc_u, axis=1)
        if HAS_SCALE:
            u *= tl.load(scale_ptr + N + offs_n, mask=mask_n, other=0.0)
        if HAS_BIAS:
            u += tl.load(bias_ptr + N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        g = y.to(act_ty).to(tl.float32)
        u = u.to(act_ty).to(tl.float32)
        y = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + offs_n, y.to(act_ty), mask=mask_n)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_gemv_config(
    n: int, k: int, num_sms: int = 132, pdl: bool = False, weight_bytes: int = 2
) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps). 8 rows x 1024 columns per tile and 4 warps: the best
    (or near it) on every 8B projection in the H100 and H200 sweeps of KERNELS_NOTES.md.
    Without PDL, where N / 8 programs make one and a bit waves (about 4 programs fit an
    SM at once), 16-row tiles make it a single wave instead. Under PDL the next kernel's
    programs fill the last wave's idle SMs, and 8-row tiles win there too.

    8-bit weights (``weight_bytes`` 1): 8 rows x 4096 columns and 4 warps up to K = 4096,
    8 x 2048 and 8 warps past it, from ``kvasir tune`` on the H200 (benchmarks/RESULTS.md:
    the 8B shapes' best were 4-8 rows x 4096 / 2048; the bf16 tiles' 8 x 2048 bytes were
    1.6-2.3x slower there)."""
    if weight_bytes == 1:
        wide = k <= 4096
        return 8, min(4096 if wide else 2048, triton.next_power_of_2(k)), 4 if wide else 8
    block_k = min(1024, triton.next_power_of_2(k))
    resident = 4 * num_sms
    block_n = 16 if not pdl and resident < triton.cdiv(n, 8) <= 2 * resident else 8
    return block_n, block_k, 4


def gemv(
    x: torch.Tensor,  # [1, K]
    weight: torch.Tensor,  # [N, K] ([2N, K] for FUSE_SILU_MUL_OUT)
    bias: torch.Tensor | None = None,  # one per weight row
    fusion: int = FUSE_NONE,
    config: tuple[int, ...] | None = None,  # BLOCK_N, BLOCK_K, num_warps[, num_stages]
    pdl: bool = True,  # launch with PDL where supported (kvasir.kernels.pdl)
    scale: torch.Tensor | None = None,  # [rows] float32: ``weight`` is 8-bit
) -> torch.Tensor:  # [1, N], x's dtype
    """``weight @ x (+ bias)`` with the ``fusion`` of the module docstring; with
    ``scale``, ``(scale * weight) @ x (+ bias)`` for an FP8 / INT8 ``weight``."""
    rows, k = weight.shape
    assert x.dim() == 2 and x.shape[0] == 1 and x.stride(-1) == 1 and weight.stride(1) == 1
    assert fusion in (FUSE_NONE, FUSE_SILU_MUL_OUT), f"unknown fusion {fusion}"
    assert x.shape[1] == k, "x/weight mismatch"
    assert fusion != FUSE_SILU_MUL_OUT or rows % 2 == 0, "[gate; up] needs an even row count"
    if scale is not None:
        assert weight.element_size() == 1, "a per-row scale goes with an 8-bit weight"
        assert scale.shape == (rows,) and scale.dtype == torch.float32 and scale.is_contiguous()
    n = rows // 2 if fusion == FUSE_SILU_MUL_OUT else rows
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    pdl = use_pdl(x, pdl)
    if config is None:
        config = gemv_config(rows, k, fusion, weight.element_size(), pdl, x.device)
    block_n, block_k, num_warps, *stages = config  # (num_stages: tuned configs only)
    extra = {"num_stages": stages[0]} if stages else {}
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x,
        weight,
        bias if bias is not None else x,
        scale if scale is not None else x,
        out,
        n,
        weight.stride(0),
        K=k,
        FUSION=fusion,
        HAS_BIAS=bias is not None,
        HAS_SCALE=scale is not None,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        USE_PDL=pdl,
        num_warps=num_warps,
        **extra,
        **launch_kwargs(pdl),
    )
    return out


def gemv_config(
    rows: int,
    k: int,
    fusion: int = FUSE_NONE,
    weight_bytes: int = 2,
    pdl: bool = False,
    device: torch.device | None = None,
) -> tuple[int, ...]:
    """The launch config ``gemv`` uses: a tuned one for this device and shape where
    ``kvasir tune`` recorded one (``kvasir.kernels.tuning``), else the default."""
    from kvasir.kernels.tuning import tuned_config

    tuned = tuned_config("gemv", gemv_shape_key(rows, k, fusion, weight_bytes), device)
    if tuned is not None:
        return tuned
    cuda = device is not None and device.type == "cuda"
    sms = _num_sms(device.index or 0) if cuda else 132  # type: ignore[union-attr]
    config = default_gemv_config(rows, k, sms, pdl, weight_bytes)
    if fusion == FUSE_SILU_MUL_OUT:  # the tile spans both halves: same bytes per program
        config = (max(1, config[0] // 2), *config[1:])
    return config


def gemv_shape_key(rows: int, k: int, fusion: int, weight_bytes: int) -> str:
    """The tuning table's key of one GEMV shape (exact: a model has a handful)."""
    return f"rows={rows},k={k},fusion={fusion},wbytes={weight_bytes}"


def gemv_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    fusion: int = FUSE_NONE,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch reference: ``F.linear`` in float32 (on the dequantised weight when
    ``scale`` is given), then the unfused activation, each rounded to the input dtype as
    the unfused layers are."""
    b = None if bias is None else bias.float()
    w = weight.float() if scale is None else weight.float() * scale.float()[:, None]
    y = torch.nn.functional.linear(x.float(), w, b).to(x.dtype)
    if fusion == FUSE_SILU_MUL_OUT:
        n = y.shape[1] // 2
        y = (torch.nn.functional.silu(y[:, :n].float()) * y[:, n:].float()).to(x.dtype)
    return y


__all__ = [
    "FUSE_NONE",
    "FUSE_SILU_MUL_OUT",
    "default_gemv_config",
    "gemv",
    "gemv_config",
    "gemv_shape_key",
    "gemv_ref",
]
