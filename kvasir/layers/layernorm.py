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

    def __init__(self, hidden_size: int, eps: float = 1e-6, pdl: bool = True) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.pdl = pdl  # KernelConfig.pdl: the CUDA kernel launches with PDL where supported
        self.variance_epsilon = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # x, residual: [..., hidden_size]
        if x.is_cuda and x.dtype != torch.float32:
            # One Triton pass (add + norm) instead of ~8 elementwise kernels; it rounds
            # the residual sum to x's dtype before normalising, exactly like HF.
            from kvasir.kernels.rmsnorm import fused_add_rms_norm, rms_norm

            x2 = x.reshape(-1, self.hidden_size)
            if residual is None:
                return rms_norm(x2, self.weight, self.variance_epsilon, pdl=self.pdl).view_as(x)
            out, res = fused_add_rms_norm(
                x2,
                residual.reshape(-1, self.hidden_size),
                self.weight,
                self.variance_epsilon,
                pdl=self.pdl,
            )
            return out.view_as(x), res.view_as(x)
        if x.dtype == torch.float32:  # torch.rms_norm: torch >= 2.4 (pyproject)
            # One fused op (bit-identical to the steps below in float32 on the CPU)
            # instead of ~6 small ones per norm: a decode step runs 60 of them.
            if residual is not None:
                x = residual = x + residual
            y = torch.rms_norm(x, (self.hidden_size,), self.weight, self.variance_epsilon)
            return y if residual is None else (y, residual)
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
