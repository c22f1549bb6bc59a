"""Gated activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]``; one Triton pass on CUDA (no [T, d] temporaries)."""
    # x: [num_tokens, 2 * intermediate_size] -> [num_tokens, intermediate_size]
    if x.is_cuda and x.dim() == 2:
        from kvasir.kernels.activation import silu_and_mul as silu_and_mul_kernel

        return silu_and_mul_kernel(x)
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


class SiluAndMul(nn.Module):
    """``silu(x[..., :d]) * x[..., d:]`` for ``x`` of last dimension ``2 * d``: the SwiGLU
    of Llama's MLP applied to the fused ``gate_up_proj`` output (gate first, then up)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)
