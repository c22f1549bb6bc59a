"""Fused mixture-of-experts: every expert's gated MLP for the tokens routed to it, in two
Triton launches, beside the plain-torch reference the CPU runs.

A token routed to ``top_k`` experts makes ``top_k`` *assignments*, numbered
``token * top_k + j``. ``moe_align`` sorts the assignments by expert and pads each
expert's run to a multiple of ``BLOCK_M``, so every block of ``BLOCK_M`` sorted rows
belongs to one expert (experts with no tokens get no block; padding rows carry the
sentinel ``num_assignments`` and are masked). Then

1. ``gate_up``: ``act[a] = silu(x[t] @ w13[e, :I]^T) * (x[t] @ w13[e, I:]^T)`` for each
   assignment ``a`` of token ``t`` to expert ``e`` — a grouped GEMM whose programs each
   read one expert's weight tile, gate and up halves together, SiLU-and-mul in the
   epilogue;
2. ``down``: ``y[a] = w[a] * (act[a] @ w2[e]^T)``, the routing weight applied in the
   epilogue;

and ``out[t] = sum_j y[t * top_k + j]``. Everything is sized by the worst case
(``num_assignments + num_experts * (BLOCK_M - 1)`` sorted rows), so there is no host
sync and the launch shapes depend on the token count only (CUDA-graph friendly);
blocks past the used ones have expert id -1 and return at once.

Expert ids may be local: with expert parallelism an id of -1 in ``topk_ids`` marks an
assignment to an expert another rank holds, which contributes nothing here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def moe_align(
    topk_ids: torch.Tensor,  # [T, top_k] int, expert id in [0, E) or -1 (not here)
    num_experts: int,
    block_m: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_ids [num_blocks * block_m] int32: assignment ids grouped by expert, each
    expert's run padded to ``block_m`` with the sentinel ``T * top_k``;
    block_expert [num_blocks] int32: each block's expert, -1 for unused blocks)."""
    flat = topk_ids.reshape(-1).to(torch.int64)
    n = flat.numel()
    device = flat.device
    num_blocks = triton.cdiv(n + num_experts * (block_m - 1), block_m)
    size = num_blocks * block_m
    # Only fixed-shape tensor ops below (no bincount, no boolean indexing): no host
    # sync, so the whole layer can be captured in a CUDA graph.
    key = torch.where(flat >= 0, flat, num_experts)
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    counts = counts[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    padded_start = torch.cumsum(padded, 0) - padded
    start = torch.cumsum(counts, 0) - counts
    kept = sorted_key < num_experts
    e = torch.where(kept, sorted_key, 0)
    dest = padded_start[e] + torch.arange(n, device=device) - start[e]
    # Assignments to other ranks' experts go to one spare slot past the end.
    dest = torch.where(kept, dest, size)
    sorted_ids = torch.full((size + 1,), n, dtype=torch.int64, device=device)
    sorted_ids.scatter_(0, dest, order)
    sorted_ids = sorted_ids[:size]
    block_start = torch.arange(num_blocks, device=device) * block_m
    ends = torch.cumsum(padded, 0)
    block_expert = torch.searchsorted(ends, block_start, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1)
    return sorted_ids.to(torch.int32), block_expert.to(torch.int32)


@triton.jit
def _moe_gemm_kernel(
    a_ptr,  # [rows, K]
    w_ptr,  # [E, N (x2 if GATED), K]
    ws_ptr,  # [E, N (x2 if GATED)] float32 per-channel weight scales (SCALED)
    out_ptr,  # [num_assignments, N]
    sorted_ids_ptr,  # [num_blocks * BLOCK_M] int32
    block_expert_ptr,  # [num_blocks] int32
    topk_w_ptr,  # [num_assignments] float32 (MUL_WEIGHT)
    num_assignments,
    N,
    K,
    a_row_div,  # assignment id // a_row_div = row of a
    stride_am,
    stride_we,
    stride_wn,
    stride_om,
    stride_se,
    GATED: tl.constexpr,
    SCALED: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ids = tl.load(sorted_ids_ptr + offs_m)
    valid = ids < num_assignments
    rows = tl.where(valid, ids // a_row_div, 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        a = tl.load(
            a_ptr + rows[:, None].to(tl.int64) * stride_am + kk[None, :],
            mask=valid[:, None] & mask_k[None, :],
            other=0.0,
        )
        w = tl.load(
            w_base + offs_n[None, :] * stride_wn + kk[:, None],
            mask=mask_n[None, :] & mask_k[:, None],
            other=0.0,
        ).to(a.dtype)  # [BLOCK_K, BLOCK_N]; 8-bit weights widen exactly
        if IEEE:  # float32 weights: exact products, not TF32
            acc += tl.dot(a, w, input_precision="ieee")
        else:
            acc += tl.dot(a, w)
        if GATED:
            w_up = tl.load(
                w_base + (offs_n[None, :] + N) * stride_wn + kk[:, None],
                mask=mask_n[None, :] & mask_k[:, None],
                other=0.0,
            ).to(a.dtype)
            if IEEE:
                acc_up += tl.dot(a, w_up, input_precision="ieee")
            else:
                acc_up += tl.dot(a, w_up)
    if SCALED:  # per-output-channel scales factor out of the K sum
        s_base = ws_ptr + expert.to(tl.int64) * stride_se
        acc *= tl.load(s_base + offs_n, mask=mask_n, other=0.0)[None, :]
        if GATED:
            acc_up *= tl.load(s_base + N + offs_n, mask=mask_n, other=0.0)[None, :]
    if GATED:
        # Round gate and up to the input dtype first, as the unfused linear + SiLU do.
        g = acc.to(a_ptr.dtype.element_ty).to(tl.float32)
        u = acc_up.to(a_ptr.dtype.element_ty).to(tl.float32)
        acc = g * tl.sigmoid(g) * u
    if MUL_WEIGHT:
        acc = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
        wt = tl.load(topk_w_ptr + ids, mask=valid, other=0.0)
        acc = acc * wt[:, None]
    tl.store(
        out_ptr + ids[:, None].to(tl.int64) * stride_om + offs_n[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=valid[:, None] & mask_n[None, :],
    )


def _launch(
    a: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor | None,
    out: torch.Tensor,
    sorted_ids: torch.Tensor,
    block_expert: torch.Tensor,
    topk_w: torch.Tensor | None,
    a_row_div: int,
    n: int,
    gated: bool,
    block_m: int,
) -> None:
    num_assignments = out.shape[0]
    k = a.shape[1]
    block_n = 64 if n >= 64 else max(16, triton.next_power_of_2(n))
    block_k = 64 if k >= 64 else max(16, triton.next_power_of_2(k))
    grid = (block_expert.shape[0], triton.cdiv(n, block_n))
    _moe_gemm_kernel[grid](
        a,
        w,
        w_scale if w_scale is not None else out,
        out,
        sorted_ids,
        block_expert,
        topk_w if topk_w is not None else out,
        num_assignments,
        n,
        k,
        a_row_div,
        a.stride(0),
        w.stride(0),
        w.stride(1),
        out.stride(0),
        w_scale.stride(0) if w_scale is not None else 0,
        GATED=gated,
        SCALED=w_scale is not None,
        MUL_WEIGHT=topk_w is not None,
        IEEE=a.dtype == torch.float32,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )


def fused_moe(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H]: gate rows then up rows
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, top_k]
    topk_ids: torch.Tensor,  # [T, top_k] local expert ids, -1: not on this rank
    block_m: int = 16,
    w13_scale: torch.Tensor | None = None,  # [E, 2I] float32: w13 is 8-bit (W8A16)
    w2_scale: torch.Tensor | None = None,  # [E, H]
) -> torch.Tensor:  # [T, H]
    """The Triton path: ``sum_j w[t, j] * expert_{ids[t, j]}(x[t])`` for every token.
    With scales, the 8-bit weights are widened in the kernel and their per-channel
    scales applied to the accumulators."""
    t, h = x.shape
    top_k = topk_ids.shape[1]
    num_experts, two_i, _ = w13.shape
    inter = two_i // 2
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    sorted_ids, block_expert = moe_align(topk_ids, num_experts, block_m)
    n = t * top_k
    act = torch.empty(n, inter, dtype=x.dtype, device=x.device)
    _launch(x, w13, w13_scale, act, sorted_ids, block_expert, None, top_k, inter, True, block_m)
    # Assignments to other ranks' experts are never written: start from zeros.
    y = torch.zeros(n, h, dtype=x.dtype, device=x.device)
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    _launch(act, w2, w2_scale, y, sorted_ids, block_expert, weights, 1, h, False, block_m)
    return y.view(t, top_k, h).sum(dim=1)


def fused_moe_torch(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H]
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, top_k]
    topk_ids: torch.Tensor,  # [T, top_k], -1: not on this rank
    w13_scale: torch.Tensor | None = None,  # [E, 2I]: 8-bit weights, dequantised per expert
    w2_scale: torch.Tensor | None = None,  # [E, H]
) -> torch.Tensor:  # [T, H]
    """The reference (and the CPU path): one gated MLP per expert that has tokens, over
    just those tokens, summed back with the routing weights (HF transformers' order)."""
    t, h = x.shape
    top_k = topk_ids.shape[1]
    inter = w13.shape[1] // 2
    out = torch.zeros(t, h, dtype=x.dtype, device=x.device)
    flat = topk_ids.reshape(-1)
    weights = topk_weights.reshape(-1)
    for e in torch.unique(flat[flat >= 0]).tolist():
        idx = torch.nonzero(flat == e).squeeze(1)
        tok = idx // top_k
        we13, we2 = w13[e], w2[e]
        if w13_scale is not None and w2_scale is not None:
            we13 = (we13.float() * w13_scale[e][:, None]).to(x.dtype)
            we2 = (we2.float() * w2_scale[e][:, None]).to(x.dtype)
        gu = F.linear(x[tok], we13)
        act = F.silu(gu[:, :inter]) * gu[:, inter:]
        y = F.linear(act, we2) * weights[idx, None].to(x.dtype)
        out.index_add_(0, tok, y)
    return out
