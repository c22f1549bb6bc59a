"""RMSNorm with an optional fused residual add (vLLM semantics)."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension, computed in float32.

    ``forward(x)`` returns ``norm(x) * weight``. ``forward(x, residual)`` first adds
    ``residual`` into ``x`` and returns ``(norm(x + residual) * weight, x + residual)``,
    so a decoder layer can carry the residual stream without a separate add kernel.
    Output dtype equals ``x``'s dtype.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.variance_epsilon = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # x, residual: [..., hidden_size]
        orig_dtype = x.dtype
        x = x.float()
        if residual is not None:
            x = x + residual.float()
            residual = x.to(orig_dtype)
        variance = x.pow(2).mean(dim=-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        # Cast before scaling, as HF does, so bf16 results match the reference bit for bit.
        x = self.weight * x.to(orig_dtype)
        if residual is None:
            return x
        return x, residual

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.variance_epsilon}"
