"""Symmetric 8-bit quantisation of weights and activations (plain torch).

Scales are float32 and map the largest magnitude onto the format's largest value:
448 for FP8 E4M3, 57344 for E5M2, 127 for INT8 (``[-127, 127]``, as llm-compressor's
symmetric int8). Weights are per output channel (``[N]``), per tensor (stored as ``[N]``
equal values so every layer applies one shape), or per 128 x 128 block
(``[ceil(N / 128), ceil(K / 128)]``).
"""

from __future__ import annotations

import torch

from kvasir.kernels.quant_gemm import QUANT_BLOCK

FP8_E4M3 = torch.float8_e4m3fn
FP8_E5M2 = torch.float8_e5m2
WEIGHT_STRATEGIES = ("channel", "tensor", "block")
ACTIVATION_STRATEGIES = ("token", "group", "tensor")
_EPS = 1e-12


def qmax(qdtype: torch.dtype) -> float:
    if qdtype == torch.int8:
        return 127.0
    return float(torch.finfo(qdtype).max)


def _cast(x: torch.Tensor, qdtype: torch.dtype) -> torch.Tensor:
    m = qmax(qdtype)
    if qdtype == torch.int8:
        return torch.round(x).clamp_(-m, m).to(torch.int8)
    return x.clamp(-m, m).to(qdtype)


def quantize_weight(
    weight: torch.Tensor,  # [N, K] float
    qdtype: torch.dtype,
    strategy: str = "channel",
) -> tuple[torch.Tensor, torch.Tensor]:  # [N, K] qdtype, [N] or [N/128, K/128] float32
    if strategy not in WEIGHT_STRATEGIES:
        raise ValueError(f"weight strategy must be one of {WEIGHT_STRATEGIES}, got {strategy!r}")
    w = weight.float()
    n, k = w.shape
    m = qmax(qdtype)
    if strategy == "channel":
        scale = w.abs().amax(dim=1).clamp_min(_EPS) / m  # [N]
        return _cast(w / scale[:, None], qdtype), scale
    if strategy == "tensor":
        scale = (w.abs().amax().clamp_min(_EPS) / m).expand(n).contiguous()
        return _cast(w / scale[:, None], qdtype), scale
    b = QUANT_BLOCK
    nb, kb = -(-n // b), -(-k // b)
    padded = torch.zeros(nb * b, kb * b, dtype=torch.float32, device=w.device)
    padded[:n, :k] = w
    blocks = padded.view(nb, b, kb, b)
    scale = blocks.abs().amax(dim=(1, 3)).clamp_min(_EPS) / m  # [nb, kb]
    q = blocks / scale[:, None, :, None]
    return _cast(q.view(nb * b, kb * b)[:n, :k], qdtype).contiguous(), scale


def quantize_activation(
    x: torch.Tensor,  # [M, K]
    qdtype: torch.dtype,
    strategy: str = "token",
    static_scale: torch.Tensor | None = None,  # [] or [1]: a calibrated per-tensor scale
) -> tuple[torch.Tensor, torch.Tensor]:  # [M, K] qdtype, [M] or [M, K/128] float32
    """Dynamic per-token (or per token and 128-column group, or per-tensor) scales, or
    the static one; the scale tensor always has one entry per row (per row and group)."""
    xf = x.float()
    num_rows, k = xf.shape
    m = qmax(qdtype)
    if static_scale is not None:
        scale = static_scale.float().reshape(1).expand(num_rows)
        return _cast(xf / scale[:, None], qdtype), scale.contiguous()
    if strategy == "token":
        scale = xf.abs().amax(dim=1).clamp_min(_EPS) / m  # [M]
        return _cast(xf / scale[:, None], qdtype), scale
    if strategy == "tensor":
        scale = (xf.abs().amax().clamp_min(_EPS) / m).expand(num_rows).contiguous()
        return _cast(xf / scale[:, None], qdtype), scale
    if strategy != "group":
        raise ValueError(
            f"activation strategy must be one of {ACTIVATION_STRATEGIES}, got {strategy!r}"
        )
    b = QUANT_BLOCK
    g = -(-k // b)
    padded = torch.zeros(num_rows, g * b, dtype=torch.float32, device=xf.device)
    padded[:, :k] = xf
    groups = padded.view(num_rows, g, b)
    scale = groups.abs().amax(dim=2).clamp_min(_EPS) / m  # [M, G]
    q = (groups / scale[:, :, None]).view(num_rows, g * b)[:, :k]
    return _cast(q, qdtype).contiguous(), scale


__all__ = [
    "ACTIVATION_STRATEGIES",
    "FP8_E4M3",
    "FP8_E5M2",
    "WEIGHT_STRATEGIES",
    "qmax",
    "quantize_activation",
    "quantize_weight",
]
