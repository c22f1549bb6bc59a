"""Linear layers as the decoder calls them, with the batch-1 decode fast path.

At one token per step (batch-1 decode, a static shape inside its CUDA graph) on a GPU in
bf16/fp16, each projection runs as the single-row Triton GEMV of ``kvasir.kernels.gemv``
(closer to the copy bandwidth than cuBLAS at M = 1, no split-K reduce kernel), and the
SiLU-and-mul before ``down_proj`` is fused into that GEMV. Any other shape, device or
dtype takes ``F.linear``; both paths round the activation fed to the matrix the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Module switch for the fast path (benchmarks flip it to measure the path's gain).
FUSED_GEMV_ENABLED = True


def use_fused_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        FUSED_GEMV_ENABLED
        and x.is_cuda
        and x.dim() == 2
        and x.shape[0] == 1
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
    )


def linear(
    x: torch.Tensor,  # [num_tokens, in_features]
    weight: torch.Tensor,  # [out_features, in_features]
    bias: torch.Tensor | None = None,
) -> torch.Tensor:  # [num_tokens, out_features]
    if use_fused_gemv(x, weight):
        from kvasir.kernels.gemv import gemv

        return gemv(x, weight, bias)
    return F.linear(x, weight, bias)


def silu_and_mul_linear(act: nn.Module, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(act(x))`` for the fused gate/up output ``x`` ``[num_tokens, 2 * d]``."""
    if use_fused_gemv(x, layer.weight):
        from kvasir.kernels.gemv import PROLOGUE_SILU_MUL, gemv

        return gemv(x, layer.weight, layer.bias, PROLOGUE_SILU_MUL)
    return layer(act(x))
