"""Gated activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """``silu(x[..., :d]) * x[..., d:]`` for ``x`` of last dimension ``2 * d``: the SwiGLU
    of Llama's MLP applied to the fused ``gate_up_proj`` output (gate first, then up)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, 2 * intermediate_size] -> [num_tokens, intermediate_size]
        if x.is_cuda and x.dim() == 2:
            from kvasir.kernels.activation import silu_and_mul

            return silu_and_mul(x)  # one Triton pass, no [T, d] temporaries
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]
