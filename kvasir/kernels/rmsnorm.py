"""RMSNorm and fused residual-add + RMSNorm (vLLM semantics), float32 accumulation.

``fused_add_rms_norm(x, residual, weight, eps)`` returns ``(out, new_residual)`` with
``new_residual = x + residual`` (rounded to the input dtype, as HF's bf16 residual add
is) and ``out = rms_norm(new_residual) * weight``. As in HF, the normalised row is
rounded to the input dtype before the weight multiplies it, so bf16 results match HF's
``LlamaRMSNorm`` bit for bit. One program per row; the whole row lives in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvasir.kernels.pdl import gdc_launch_dependents, gdc_wait, launch_kwargs, use_pdl


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [num_tokens, hidden]
    residual_ptr,  # [num_tokens, hidden] (HAS_RESIDUAL)
    weight_ptr,  # [hidden]
    out_ptr,  # [num_tokens, hidden]
    residual_out_ptr,  # [num_tokens, hidden] (HAS_RESIDUAL)
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    eps,
    HIDDEN: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    if USE_PDL:  # see kvasir.kernels.pdl: nothing is read or written before the wait
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < HIDDEN
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        # Round the sum to the stream's dtype first: the next layer sees that value.
        h = (x + r).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_ro + offs, h, mask=mask)
        x = h.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / HIDDEN + eps)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32) * w
    tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor,
    residual_out: torch.Tensor | None,
    pdl: bool,
) -> None:
    hidden = x.shape[-1]
    num_tokens = x.shape[0]
    if num_tokens == 0:
        return
    assert x.dim() == 2 and x.stride(1) == 1 and out.stride(1) == 1, "rows must be contiguous"
    block = triton.next_power_of_2(hidden)
    pdl = use_pdl(x, pdl)
    num_warps = min(16, max(1, block // 512))  # ~16 B per thread per load
    _rms_norm_kernel[(num_tokens,)](
        x,
        residual if residual is not None else x,
        weight,
        out,
        residual_out if residual_out is not None else out,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        out.stride(0),
        residual_out.stride(0) if residual_out is not None else 0,
        eps,
        HIDDEN=hidden,
        BLOCK=block,
        HAS_RESIDUAL=residual is not None,
        USE_PDL=pdl,
        num_warps=num_warps,
        **launch_kwargs(pdl),
    )


def rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    out: torch.Tensor | None = None,  # [num_tokens, hidden]; may be x itself
    pdl: bool = True,  # launch with PDL where supported (kvasir.kernels.pdl)
) -> torch.Tensor:  # [num_tokens, hidden], x's dtype
    """``x * rsqrt(mean(x^2) + eps) * weight`` per row."""
    out = torch.empty_like(x) if out is None else out
    _launch(x, None, weight, eps, out, None, pdl)
    return out


def fused_add_rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    residual: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    out: torch.Tensor | None = None,  # may be x itself (in place, as vLLM)
    residual_out: torch.Tensor | None = None,  # may be residual itself
    pdl: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:  # (out, new_residual), each [num_tokens, hidden]
    """``new_residual = x + residual``; ``out = rms_norm(new_residual) * weight``. Each
    program reads its row fully before writing it, so in-place use is safe."""
    out = torch.empty_like(x) if out is None else out
    residual_out = torch.empty_like(residual) if residual_out is None else residual_out
    _launch(x, residual, weight, eps, out, residual_out, pdl)
    return out, residual_out


def rms_norm_ref(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden]
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch reference, written as HF's ``LlamaRMSNorm`` after a residual add in
    the input dtype."""
    if residual is not None:
        x = x + residual  # in x's dtype, like the decoder layer's `residual + hidden`
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = (weight.float() * h.to(x.dtype).float()).to(x.dtype)
    return out if residual is None else (out, x)


__all__ = ["fused_add_rms_norm", "rms_norm", "rms_norm_ref"]
