"""Fused SiLU-and-mul: ``[num_tokens, 2 * d] -> [num_tokens, d]``, ``silu(gate) * up`` with
the gate in the first half (Llama's fused ``gate_up_proj`` output). Math in float32,
one rounding to the output dtype; a single pass over memory."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,  # [num_tokens, 2 * d]
    out_ptr,  # [num_tokens, d]
    stride_x,
    stride_o,
    D: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + D + offs, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(
    x: torch.Tensor,  # [num_tokens, 2 * d]
    out: torch.Tensor | None = None,  # [num_tokens, d]
) -> torch.Tensor:  # [num_tokens, d], x's dtype
    """``silu(x[:, :d]) * x[:, d:]``."""
    assert x.dim() == 2 and x.shape[1] % 2 == 0 and x.stride(1) == 1
    num_tokens, d = x.shape[0], x.shape[1] // 2
    out = torch.empty((num_tokens, d), dtype=x.dtype, device=x.device) if out is None else out
    if num_tokens == 0:
        return out
    block = min(1024, triton.next_power_of_2(d))
    _silu_and_mul_kernel[(num_tokens, triton.cdiv(d, block))](
        x, out, x.stride(0), out.stride(0), D=d, BLOCK=block, num_warps=4
    )
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:  # [num_tokens, 2 * d] -> [.., d]
    """Plain-torch reference in float32, rounded once to x's dtype."""
    d = x.shape[-1] // 2
    gate, up = x[..., :d].float(), x[..., d:].float()
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)


__all__ = ["silu_and_mul", "silu_and_mul_ref"]
