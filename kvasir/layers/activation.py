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
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]
