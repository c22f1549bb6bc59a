"""The 4-bit (and 8-bit) weight quantisers of ``kvasir quantize``: round-to-nearest,
GPTQ and AWQ, on plain tensors (no model here: ``kvasir.quantization.int4_writer``
feeds them calibration activations layer by layer).

Every quantiser returns ``IntWeights``: integer values ``q [N, K]`` in ``[0, 2^bits)``,
per-group ``scales`` and integer ``zeros`` ``[G, N]`` and the group of each input column
``g_idx [K]``, with ``W ~ (q - zeros[g_idx]) * scales[g_idx]``.

* ``rtn``: min-max scale and zero per group of ``group_size`` input columns.
* ``gptq`` (Frantar et al. 2022): columns quantised one at a time in ``BLOCK``-column
  blocks, each one's rounding error spread over the columns not yet quantised through
  the inverse Hessian ``H = 2 X^T X / n`` of the calibration inputs (Cholesky form, damped
  by ``damp`` times its mean diagonal); updates to later blocks applied lazily, once per
  block; with ``act_order`` the columns go by decreasing ``diag(H)`` and the groups
  follow that order (``g_idx`` then maps each column to its group).
* ``awq`` (Lin et al. 2023): per input channel scales ``s = mean|x|^alpha``, ``alpha`` on a
  grid, the one whose quantised ``(W * s) / s`` reproduces the layer group's outputs best
  on the calibration inputs; then, per output row and group, the clipping of the weight
  range whose quantisation error on the inputs is smallest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BLOCK = 128  # GPTQ's lazy-update block of columns
AWQ_GRID = 20  # alpha in {0, 1/20, ..., 19/20}
CLIP_GRID = 20  # clip ratios 1, 0.975, ..., 0.5
CLIP_MIN = 0.5


@dataclass
class IntWeights:
    q: torch.Tensor  # [N, K] int32 in [0, 2^bits)
    scales: torch.Tensor  # [G, N] float32
    zeros: torch.Tensor  # [G, N] int32
    g_idx: torch.Tensor  # [K] int32
    bits: int

    def dequantize(self) -> torch.Tensor:  # [N, K] float32
        g = self.g_idx.long()
        return (self.q.float() - self.zeros.float()[g].T) * self.scales[g].T


def minmax_params(
    w: torch.Tensor, bits: int, sym: bool, clip: torch.Tensor | float = 1.0, min_zero: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero over the last axis of ``w [..., n]`` (the range always
    holding 0; ``clip`` shrinks it). Scales are rounded to fp16, as the formats store them."""
    maxq = 2**bits - 1
    lo = torch.minimum(w.amin(-1), torch.zeros(())) * clip
    hi = torch.maximum(w.amax(-1), torch.zeros(())) * clip
    if sym:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    scale = (hi - lo) / maxq
    scale = torch.where(scale == 0, torch.ones_like(scale), scale).half().float()
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-lo / scale).clamp(min_zero, maxq)
    return scale, zero


def _round(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def _groups(k: int, group_size: int) -> int:
    return 1 if group_size == -1 else math.ceil(k / group_size)


def rtn(
    w: torch.Tensor, bits: int, group_size: int, sym: bool = False, min_zero: int = 0
) -> IntWeights:
    """Round to nearest with min-max group parameters."""
    w = w.float()
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    num_groups = _groups(k, group_size)
    g_idx = (torch.arange(k) // gs).int()
    scales = torch.empty(num_groups, n)
    zeros = torch.empty(num_groups, n)
    q = torch.empty(n, k)
    for g in range(num_groups):
        cols = slice(g * gs, min(k, (g + 1) * gs))
        scales[g], zeros[g] = minmax_params(w[:, cols], bits, sym, min_zero=min_zero)
        q[:, cols] = _round(w[:, cols], scales[g][:, None], zeros[g][:, None], bits)
    return IntWeights(q.int(), scales, zeros.int(), g_idx, bits)


def gptq(
    w: torch.Tensor,  # [N, K]
    hessian: torch.Tensor,  # [K, K]: 2 X^T X / n
    bits: int,
    group_size: int,
    sym: bool = False,
    act_order: bool = False,
    damp: float = 0.01,
    min_zero: int = 0,
) -> IntWeights:
    """GPTQ with lazy block updates (module docstring)."""
    w = w.float().clone()
    h = hessian.double().clone()
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype)
    # Upper Cholesky factor of H^-1: row i holds the update of columns i.. from column i.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    hinv = hinv.float()
    num_groups = _groups(k, group_size)
    scales = torch.empty(num_groups, n)
    zeros = torch.empty(num_groups, n)
    q = torch.empty(n, k)
    for i1 in range(0, k, BLOCK):
        i2 = min(i1 + BLOCK, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % gs == 0:  # a new group: its parameters from the weights as updated so far
                g = col // gs
                cols = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :gs]
                scales[g], zeros[g] = minmax_params(cols, bits, sym, min_zero=min_zero)
            g = col // gs
            s, z = scales[g], zeros[g]
            wi = w1[:, i]
            qi = _round(wi, s, z, bits)
            q[:, col] = qi
            e = (wi - (qi - z) * s) / h1[i, i]
            w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    inverse = torch.argsort(perm)
    g_idx = (torch.arange(k) // gs)[inverse].int()  # column perm[j] sits in group j // gs
    return IntWeights(q[:, inverse].int(), scales, zeros.int(), g_idx, bits)


def _fake_quant(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    return rtn(w, bits, group_size).dequantize()


def awq_scales(
    weights: list[torch.Tensor],  # each [N_i, K]: the linears sharing one input
    x: torch.Tensor,  # [T, K] calibration inputs
    bits: int,
    group_size: int,
    max_tokens: int = 1024,
) -> torch.Tensor:  # [K] float32: multiply the weights' columns, divide the input by it
    """AWQ's activation-aware scale search (module docstring), on every
    ``T / max_tokens``-th input token."""
    w = torch.cat([t.float() for t in weights])
    x_mean = x.float().abs().mean(0)
    x = x.float()[:: max(1, x.shape[0] // max_tokens)]
    ref = x @ w.T
    best, best_loss = torch.ones_like(x_mean), float("inf")
    for step in range(AWQ_GRID):
        alpha = step / AWQ_GRID
        s = x_mean.pow(alpha).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        wq = _fake_quant(w * s[None, :], bits, group_size) / s[None, :]
        loss = float((x @ wq.T - ref).pow(2).mean())
        if loss < best_loss:
            best, best_loss = s, loss
    return best


def awq_clip(
    w: torch.Tensor,  # [N, K], already scaled
    x: torch.Tensor,  # [T, K] inputs (scaled the same way)
    bits: int,
    group_size: int,
    max_tokens: int = 512,
) -> torch.Tensor:  # [N, G] clip ratio per output row and group
    """AWQ's clipping search: per row and group, the shrink of the min-max range whose
    quantised weights give the smallest output error on (a sample of) the inputs."""
    w = w.float()
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    x = x.float()[:: max(1, x.shape[0] // max_tokens)]
    num_groups = _groups(k, group_size)
    ratios = torch.ones(n, num_groups)
    for g in range(num_groups):
        cols = slice(g * gs, min(k, (g + 1) * gs))
        wg, xg = w[:, cols], x[:, cols]  # [N, gs], [T, gs]
        ref = xg @ wg.T  # [T, N]
        best = torch.full((n,), float("inf"))
        for step in range(CLIP_GRID):
            r = 1.0 - step * (1.0 - CLIP_MIN) / CLIP_GRID
            s, z = minmax_params(wg, bits, sym=False, clip=r)
            wq = (_round(wg, s[:, None], z[:, None], bits) - z[:, None]) * s[:, None]
            err = (xg @ wq.T - ref).pow(2).mean(0)  # [N]
            better = err < best
            best = torch.where(better, err, best)
            ratios[better, g] = r
    return ratios


def awq_quantize(
    w: torch.Tensor, bits: int, group_size: int, clip: torch.Tensor | None
) -> IntWeights:
    """Zero-point quantisation of the (scaled) weight with per-row, per-group clipping."""
    if clip is None:
        return rtn(w, bits, group_size)
    w = w.float()
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    num_groups = _groups(k, group_size)
    scales = torch.empty(num_groups, n)
    zeros = torch.empty(num_groups, n)
    q = torch.empty(n, k)
    for g in range(num_groups):
        cols = slice(g * gs, min(k, (g + 1) * gs))
        scales[g], zeros[g] = minmax_params(w[:, cols], bits, sym=False, clip=clip[:, g])
        q[:, cols] = _round(w[:, cols], scales[g][:, None], zeros[g][:, None], bits)
    return IntWeights(q.int(), scales, zeros.int(), (torch.arange(k) // gs).int(), bits)
